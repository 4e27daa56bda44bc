"""Byte-level BPE (GPT-2, Llama 3, Qwen2) written from the algorithm, no tokenizer library at run time.

Byte-level BPE (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners", sec. 2.2;
BPE itself: Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword Units", Alg. 1):
  1. the text is cut into "words" by a pre-tokenizer regex (GPT-2's, or the one in tokenizer.json);
  2. each word's UTF-8 bytes are written as printable unicode characters (one character per byte,
     `bytes_to_unicode`), so every string is covered by a 256-symbol base alphabet;
  3. adjacent symbols are merged greedily, always the pair with the lowest merge rank, until no
     pair has a rank; each final symbol is a vocabulary entry.
Words repeat a lot in real text, so the id sequence of each word is cached.

This module sees ordinary text only: added/special tokens are split out by `minirlhf.tokenizer`.
"""
from __future__ import annotations

import json
import unicodedata
from bisect import bisect_right
from collections.abc import Callable
from itertools import pairwise

import regex

from minirlhf.errors import UserError

# GPT-2's pre-tokenizer (also the default of the `ByteLevel` pre-tokenizer with use_regex=true).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# A piece of a chunk: its text (it may carry a leading space the chunk lacks: ByteLevel's
# add_prefix_space) and the [start, end) character range of the chunk it came from.
Piece = tuple[str, int, int]


class TokenizerError(UserError, ValueError):
    """A tokenizer file that is missing, unreadable, malformed or of a kind minirlhf does not read; the
    message names the file. Defined here, the lowest tokenizer module, and re-exported by minirlhf.tokenizer."""


def read_text(path: str) -> str:
    """A tokenizer file's UTF-8 text; TokenizerError naming it when it is missing, unreadable or not UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read it ({e.strerror or e})") from None


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte -> character table: printable Latin-1 bytes map to themselves, the other 68
    bytes (controls, space, 0x7F-0xA0, 0xAD) to U+0100 onwards in byte order, so no token contains
    whitespace or control characters and every byte string has a printable spelling."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table: dict[int, str] = {}
    shifted = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _normalizer_from_json(spec: dict | None, where: str) -> Callable[[str], str] | None:
    """The subset of `tokenizers` normalizers byte-level models use (NFC for Qwen2, none for Llama 3)."""
    if spec is None:
        return None
    kind = spec.get("type")
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return lambda s, form=kind: unicodedata.normalize(form, s)
    if kind == "Lowercase":
        return str.lower
    if kind == "Sequence":
        steps = [_normalizer_from_json(s, where) for s in spec.get("normalizers", [])]
        steps = [s for s in steps if s is not None]

        def run(s: str) -> str:
            for step in steps:
                s = step(s)
            return s
        return run
    raise TokenizerError(f"{where}: normalizer type {kind!r} is not supported by minirlhf's byte-level BPE "
                         f"(supported: NFC, NFD, NFKC, NFKD, Lowercase, Sequence)")


def _split_pieces(pieces: list[Piece], pattern: regex.Pattern, keep_matches: bool = True) -> list[Piece]:
    """`tokenizers`' Split(behavior="Isolated") (or "Removed" when keep_matches is False): every
    regex match becomes its own piece, and so does each stretch of text between matches."""
    out: list[Piece] = []
    for text, start, end in pieces:
        shift = len(text) - (end - start)  # 1 when a virtual prefix space was prepended
        cuts, pos = [], 0
        for m in pattern.finditer(text):
            if m.start() > pos:
                cuts.append((pos, m.start()))
            if keep_matches and m.end() > m.start():
                cuts.append((m.start(), m.end()))
            pos = m.end()
        if pos < len(text):
            cuts.append((pos, len(text)))
        out.extend((text[a:b], start + max(0, a - shift), start + max(0, b - shift)) for a, b in cuts)
    return out


class ByteLevelBPE:
    """Byte-level BPE model plus its pre-tokenizer and normalizer.

    vocab: token string (in the bytes_to_unicode spelling) -> id. merges: pairs in rank order.
    steps: the pre-tokenizer, a list of ("split", pattern, keep_matches) and ("prefix_space",) steps.
    ignore_merges: emit a whole word directly when it is itself a vocabulary entry (Llama 3).
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], steps: list[tuple],
                 normalizer: Callable[[str], str] | None = None, ignore_merges: bool = False,
                 unk_token: str | None = None, cache_size: int = 100_000):
        self.vocab = vocab
        self.id_to_token = {i: t for t, i in vocab.items()}
        self.ranks = {pair: r for r, pair in enumerate(merges)}
        self.steps = steps
        self.normalizer = normalizer
        self.ignore_merges = ignore_merges
        self.unk_id = vocab.get(unk_token) if unk_token is not None else None
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.cache: dict[str, tuple[int, ...]] = {}
        self.cache_size = cache_size

    # ---- construction from files -------------------------------------------------------------
    @classmethod
    def from_tokenizer_json(cls, data: dict, where: str) -> ByteLevelBPE:
        """Build from a parsed `tokenizer.json` (Hugging Face `tokenizers` format) holding a BPE model
        with a ByteLevel pre-tokenizer/decoder, optionally after Split steps (Llama 3, Qwen2).
        A file of another shape raises TokenizerError naming `where`."""
        try:
            return cls._from_tokenizer_json(data, where)
        except (KeyError, TypeError, AttributeError, IndexError, regex.error) as e:
            raise TokenizerError(f"{where}: malformed tokenizer.json ({type(e).__name__}: {e})") from None

    @classmethod
    def _from_tokenizer_json(cls, data: dict, where: str) -> ByteLevelBPE:
        model = data.get("model") or {}
        if model.get("type", "BPE") != "BPE":
            raise TokenizerError(f"{where}: model.type is {model.get('type')!r}; only byte-level 'BPE' is supported")
        if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise TokenizerError(f"{where}: continuing_subword_prefix/end_of_word_suffix are not byte-level BPE")
        vocab = model.get("vocab")
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise TokenizerError(f"{where}: model.vocab must map each token to an integer id")
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        steps: list[tuple] = []
        saw_byte_level = False

        def add_pre(spec: dict | None) -> None:
            nonlocal saw_byte_level
            if spec is None:
                return
            kind = spec.get("type")
            if kind == "Sequence":
                for s in spec.get("pretokenizers", []):
                    add_pre(s)
            elif kind == "Split":
                pattern = spec.get("pattern", {})
                src = pattern["Regex"] if "Regex" in pattern else regex.escape(pattern["String"])
                behavior = spec.get("behavior", "Isolated")
                if spec.get("invert") or behavior not in ("Isolated", "Removed"):
                    raise TokenizerError(f"{where}: Split pre-tokenizer with behavior={behavior!r}, "
                                         f"invert={spec.get('invert')} is not supported (Isolated/Removed only)")
                steps.append(("split", regex.compile(src), behavior == "Isolated"))
            elif kind == "Digits":
                steps.append(("split", regex.compile(r"\p{N}" if spec.get("individual_digits") else r"\p{N}+"), True))
            elif kind == "ByteLevel":
                saw_byte_level = True
                if spec.get("add_prefix_space"):
                    steps.append(("prefix_space",))
                if spec.get("use_regex", True):
                    steps.append(("split", regex.compile(GPT2_PATTERN), True))
            else:
                raise TokenizerError(f"{where}: pre-tokenizer type {kind!r} is not supported by byte-level BPE")
        add_pre(data.get("pre_tokenizer"))
        if not saw_byte_level:
            raise TokenizerError(f"{where}: no ByteLevel pre-tokenizer; minirlhf reads byte-level BPE "
                                 f"tokenizer.json files only (SentencePiece models should come as tokenizer.model)")
        return cls(vocab, merges, steps, _normalizer_from_json(data.get("normalizer"), where),
                   ignore_merges=bool(model.get("ignore_merges", False)), unk_token=model.get("unk_token"))

    @classmethod
    def from_vocab_merges(cls, vocab_path: str, merges_path: str) -> ByteLevelBPE:
        """Build from GPT-2's vocab.json + merges.txt (first line may be a '#version' header)."""
        try:
            vocab = json.loads(read_text(vocab_path))
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{vocab_path}:{e.lineno}: invalid JSON: {e.msg}") from None
        lines = read_text(merges_path).split("\n")
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise TokenizerError(f"{vocab_path}: must map each token to an integer id")
        merges = []
        for lineno, line in enumerate(lines, 1):
            if not line or (lineno == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise TokenizerError(f"{merges_path}:{lineno}: expected 'left right', got {line!r}")
            merges.append((parts[0], parts[1]))
        return cls(vocab, merges, [("split", regex.compile(GPT2_PATTERN), True)])

    # ---- encoding ------------------------------------------------------------------------------
    def pre_tokenize(self, text: str) -> list[Piece]:
        pieces: list[Piece] = [(text, 0, len(text))] if text else []
        for step in self.steps:
            if step[0] == "split":
                pieces = _split_pieces(pieces, step[1], step[2])
            else:  # ByteLevel add_prefix_space: a space in front of every piece that lacks one
                pieces = [(t if t.startswith(" ") else " " + t, a, b) for t, a, b in pieces]
        return pieces

    def bpe(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-tokenized word (already in bytes_to_unicode spelling), cached."""
        cached = self.cache.get(word)
        if cached is not None:
            return cached
        if self.ignore_merges and word in self.vocab:
            ids: tuple[int, ...] = (self.vocab[word],)
        else:
            symbols = list(word)
            ranks = self.ranks
            while len(symbols) > 1:
                best_rank, best = None, None
                for i in range(len(symbols) - 1):
                    r = ranks.get((symbols[i], symbols[i + 1]))
                    if r is not None and (best_rank is None or r < best_rank):
                        best_rank, best = r, (symbols[i], symbols[i + 1])
                if best is None:
                    break
                left, right = best
                merged, i = [], 0
                while i < len(symbols):
                    if i + 1 < len(symbols) and symbols[i] == left and symbols[i + 1] == right:
                        merged.append(left + right)
                        i += 2
                    else:
                        merged.append(symbols[i])
                        i += 1
                symbols = merged
            ids = tuple(self._symbol_id(s, word) for s in symbols)
        if len(self.cache) >= self.cache_size:
            self.cache.clear()
        self.cache[word] = ids
        return ids

    def _symbol_id(self, symbol: str, word: str) -> int:
        i = self.vocab.get(symbol)
        if i is not None:
            return i
        if self.unk_id is not None:
            return self.unk_id
        raise TokenizerError(f"byte-level BPE: symbol {symbol!r} (in word {word!r}) is not in the vocabulary "
                             f"and the model has no unk_token; the vocabulary lacks part of the 256-byte alphabet")

    def encode(self, text: str) -> list[int]:
        """Ids of ordinary text (no special tokens inside)."""
        if self.normalizer is not None:
            text = self.normalizer(text)
        enc = self.byte_encoder
        ids: list[int] = []
        for piece, _, _ in self.pre_tokenize(text):
            ids.extend(self.bpe("".join(enc[b] for b in piece.encode("utf-8"))))
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids plus each token's [start, end) character range in `text`. A token that holds only part
        of a character's bytes gets that whole character's range."""
        normalized = self.normalizer(text) if self.normalizer is not None else text
        to_original = _alignment(text, normalized, self.normalizer)
        enc = self.byte_encoder
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for piece, start, end in self.pre_tokenize(normalized):
            raw = piece.encode("utf-8")
            word_ids = self.bpe("".join(enc[b] for b in raw))
            shift = len(piece) - (end - start)
            char_starts, pos = [], 0  # byte offset where each character of `piece` starts
            for ch in piece:
                char_starts.append(pos)
                pos += len(ch.encode("utf-8"))
            byte_pos = 0
            for tid in word_ids:
                n = len(self.id_to_token[tid]) if tid != self.unk_id else 1
                first = bisect_right(char_starts, byte_pos) - 1
                last = bisect_right(char_starts, byte_pos + n - 1) - 1
                a = start + max(0, first - shift)
                b = start + max(0, last + 1 - shift)
                ids.append(tid)
                offsets.append((to_original(a), to_original(b, end=True)))
                byte_pos += n
        return ids, offsets

    # ---- decoding ------------------------------------------------------------------------------
    def decode(self, ids: list[int]) -> str:
        """ByteLevel decoder: tokens -> bytes -> UTF-8 (invalid sequences become U+FFFD, as in HF)."""
        try:
            chars = "".join(self.id_to_token[i] for i in ids)
        except KeyError as e:
            raise ValueError(f"byte-level BPE: id {e.args[0]} is not in the vocabulary "
                             f"(size {len(self.vocab)})") from None
        return bytes(self.byte_decoder[c] for c in chars).decode("utf-8", errors="replace")

    @property
    def size(self) -> int:
        return max(self.vocab.values()) + 1 if self.vocab else 0


def _alignment(original: str, normalized: str, normalizer: Callable[[str], str] | None) -> Callable[..., int]:
    """Map a character offset in `normalized` back to `original`. Identity when normalization
    changed nothing; otherwise normalize runs that start at a non-combining character one at a time
    (NFC/NFKC never join across such a boundary, except rare Hangul jamo runs, which fall back to a
    proportional map)."""
    if normalizer is None or original == normalized:
        return lambda i, end=False: i
    seg_starts = [i for i, ch in enumerate(original) if i == 0 or unicodedata.combining(ch) == 0]
    seg_starts.append(len(original))
    norm_to_orig_start, norm_to_orig_end, rebuilt = [], [], []
    for a, b in pairwise(seg_starts):
        piece = normalizer(original[a:b])
        rebuilt.append(piece)
        norm_to_orig_start.extend([a] * len(piece))
        norm_to_orig_end.extend([b] * len(piece))
    if "".join(rebuilt) != normalized:
        scale = len(original) / max(1, len(normalized))
        return lambda i, end=False: min(len(original), round(i * scale))

    def to_original(i: int, end: bool = False) -> int:
        if i >= len(normalized):
            return len(original)
        if end and i > 0:
            return norm_to_orig_end[i - 1]
        return norm_to_orig_start[i]
    return to_original

