"""Tokenizers for minirlhf: a SentencePiece wrapper, our own byte-level BPE, chat templates with an
assistant mask, and a SentencePiece trainer that writes a Hugging Face style tokenizer directory.

    tok = load_tokenizer("out/sft")                      # tokenizer.model | tokenizer.json | vocab+merges
    ids = tok.encode("Hello", add_bos=True)
    enc = tok.apply_chat_template(messages)              # enc.ids, enc.assistant_mask
    tok = train_sentencepiece(texts, "out/tok", vocab_size=2000, chat_template="chatml")

Added/special tokens (bos, eos, chat markers such as <|im_end|>) are cut out of the text first and map
straight to their ids, as in transformers; the text between them goes through the model.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import jinja2

from minirlhf import chat_template as ct
from minirlhf.bpe import ByteLevelBPE, TokenizerError, read_text

__all__ = ["ChatEncoding", "Tokenizer", "TokenizerError", "load_tokenizer", "train_sentencepiece"]

Offsets = list[tuple[int, int]]
# a two-message conversation rendered when a template is set: finds its end-of-turn token, and makes a
# template that breaks the Jinja sandbox fail when it is loaded rather than on the first data row
_PROBE = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]


@dataclass
class ChatEncoding:
    """ids: [T] token ids of the rendered conversation; assistant_mask: [T], True on tokens of
    assistant replies including the end-of-turn token that closes each reply."""
    ids: list[int]
    assistant_mask: list[bool]


class SentencePieceModel:
    """A tokenizer.model read with the sentencepiece library; encodes ordinary text (no added tokens)."""

    def __init__(self, path: str):
        import sentencepiece as spm
        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{path}: not a readable SentencePiece model ({str(e).strip()})") from None

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text) if text else []

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        if not text:
            return [], []
        try:
            out = self.sp.encode(text, return_type="offset_mapping")
            ids, offsets = list(out["ids"]), out["offsets"]
        except ValueError:  # sentencepiece < 0.2.1: byte offsets from the (since removed) immutable proto
            proto = self.sp.encode(text, out_type="immutable_proto")
            char_of_byte = [i for i, ch in enumerate(text) for _ in ch.encode("utf-8")] + [len(text)]
            ids = [p.id for p in proto.pieces]
            offsets = [(char_of_byte[p.begin], char_of_byte[p.end]) for p in proto.pieces]
        # byte-fallback pieces of one character come back as (p, p), ..., (p, p + 1): give each the
        # character's range
        n = len(text)
        return ids, [(a, a + 1) if a == b and a < n else (a, b) for a, b in offsets]

    def decode(self, ids: list[int]) -> str:
        n = self.size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"{self.path}: id {bad[0]} is outside the SentencePiece vocabulary (size {n})")
        return self.sp.decode(ids)

    def piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def lookup(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

    def special_id(self, name: str) -> int | None:
        i = {"bos": self.sp.bos_id, "eos": self.sp.eos_id, "pad": self.sp.pad_id, "unk": self.sp.unk_id}[name]()
        return i if i >= 0 else None

    @property
    def size(self) -> int:
        return self.sp.get_piece_size()


class BPEModel:
    """Adapter giving ByteLevelBPE the same small interface as SentencePieceModel."""

    def __init__(self, bpe: ByteLevelBPE):
        self.bpe = bpe

    def encode(self, text: str) -> list[int]:
        return self.bpe.encode(text)

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        return self.bpe.encode_with_offsets(text)

    def decode(self, ids: list[int]) -> str:
        return self.bpe.decode(ids)

    def piece(self, i: int) -> str:
        return self.bpe.id_to_token[i]

    def lookup(self, piece: str) -> int | None:
        return self.bpe.vocab.get(piece)

    def special_id(self, name: str) -> int | None:
        return None

    @property
    def size(self) -> int:
        return self.bpe.size


class Tokenizer:
    """Text <-> ids, special tokens, and chat templates. Build it with `load_tokenizer(dir)`.

    bos_id may be None; pad_id falls back to eos_id; stop_ids holds eos_id, every eos id of
    generation_config.json and the token that closes an assistant turn in the chat template.
    """

    def __init__(self, model: SentencePieceModel | BPEModel, added: list[dict], special_tokens: dict[str, str | None],
                 config: dict, source_dir: str, files: list[str], chat_template: str | None = None,
                 template_file: bool = False, generation_eos_ids: Sequence[int] = (),
                 generation_ids: dict | None = None, template_origin: str | None = None):
        self.model = model
        self.config = config
        self.source_dir = source_dir
        self.files = files
        self.template_file = template_file
        # added tokens: content -> id, split out of text before the model sees it
        self.added: dict[str, int] = {}
        self.special_ids: set[int] = set()
        strip: dict[str, tuple[bool, bool]] = {}  # tokens that swallow whitespace on their (left, right)
        for tok in added:
            self.added[tok["content"]] = int(tok["id"])
            if tok.get("special", True):
                self.special_ids.add(int(tok["id"]))
            if tok.get("lstrip") or tok.get("rstrip"):
                strip[tok["content"]] = (bool(tok.get("lstrip")), bool(tok.get("rstrip")))
        self.added_by_id = {i: c for c, i in self.added.items()}
        gen = generation_ids or {}
        ids = {}
        for name in ("bos", "eos", "pad", "unk"):
            token = special_tokens.get(name)
            if token is not None:
                i = self.token_to_id(token)
                if i is None:
                    raise TokenizerError(f"{source_dir}: {name}_token {token!r} is not in the vocabulary (set in "
                                         f"tokenizer_config.json or special_tokens_map.json)")
                if token not in self.added:
                    self.added[token] = i
                    self.added_by_id.setdefault(i, token)
                self.special_ids.add(i)
                ids[name] = i
            else:
                ids[name] = gen.get(name) if gen.get(name) is not None else model.special_id(name)
                if ids[name] is not None:
                    self.special_ids.add(ids[name])
        if ids["eos"] is None:
            raise TokenizerError(f"{source_dir}: no eos token: set eos_token in tokenizer_config.json or "
                                 f"eos_token_id in generation_config.json")
        self.bos_id: int | None = ids["bos"]
        self.eos_id: int = ids["eos"]
        self.unk_id: int | None = ids["unk"]
        self.pad_id: int = ids["pad"] if ids["pad"] is not None else ids["eos"]
        self.bos_token = self.id_to_token(self.bos_id) if self.bos_id is not None else None
        self.eos_token = self.id_to_token(self.eos_id)
        self.pad_token = self.id_to_token(self.pad_id)
        self.unk_token = self.id_to_token(self.unk_id) if self.unk_id is not None else None
        self._added_re = self._compile_added(strip)
        # an added token after optional whitespace: what closes an assistant reply
        self._closing_re = re.compile(r"\s*(?:" + self._added_re.pattern + ")") if self._added_re else None
        self._file_stop_ids = [self.eos_id, *generation_eos_ids]
        self.stop_ids: list[int] = []
        self._chat_source: str | None = None
        self._chat_origin = ""
        self._chat_compiled: jinja2.Template | None = None
        self.set_chat_template(chat_template, template_origin)

    def _compile_added(self, strip: dict[str, tuple[bool, bool]]) -> re.Pattern | None:
        if not self.added:
            return None
        alternatives = []
        for content in sorted(self.added, key=len, reverse=True):  # longest match wins
            left, right = strip.get(content, (False, False))
            alternatives.append(("\\s*" if left else "") + re.escape(content) + ("\\s*" if right else ""))
        return re.compile("|".join(alternatives))

    # ---- vocabulary ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return max(self.model.size, max(self.added.values(), default=-1) + 1)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        i = self.added.get(token)
        return i if i is not None else self.model.lookup(token)

    def id_to_token(self, i: int) -> str:
        token = self.added_by_id.get(i)
        return token if token is not None else self.model.piece(i)

    # ---- encode / decode -----------------------------------------------------------------------
    def _split_added(self, text: str) -> list[tuple[str, int | None, int]]:
        """[(chunk, added-token id or None for ordinary text, chunk start)]."""
        if self._added_re is None:
            return [(text, None, 0)] if text else []
        parts, pos = [], 0
        for m in self._added_re.finditer(text):
            if m.start() > pos:
                parts.append((text[pos:m.start()], None, pos))
            token = m.group(0)
            parts.append((token, self.added.get(token, self.added.get(token.strip())), m.start()))
            pos = m.end()
        if pos < len(text):
            parts.append((text[pos:], None, pos))
        return parts

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings inside the text become their ids."""
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        for chunk, tid, _ in self._split_added(text):
            if tid is None:
                ids.extend(self.model.encode(chunk))
            else:
                ids.append(tid)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        """Ids plus each token's [start, end) character range in `text`."""
        ids: list[int] = []
        offsets: Offsets = []
        for chunk, tid, start in self._split_added(text):
            if tid is None:
                chunk_ids, chunk_offsets = self.model.encode_with_offsets(chunk)
                ids.extend(chunk_ids)
                offsets.extend((start + a, start + b) for a, b in chunk_offsets)
            else:
                ids.append(tid)
                offsets.append((start, start + len(chunk)))
        return ids, offsets

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Added tokens come back as their text (or nothing when skip_special_tokens
        and the token is special)."""
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            token = self.added_by_id.get(i)
            if token is None and i not in self.special_ids:
                run.append(i)
                continue
            if run:
                out.append(self.model.decode(run))
                run = []
            if skip_special_tokens and i in self.special_ids:
                continue
            out.append(token if token is not None else self.model.piece(i))
        if run:
            out.append(self.model.decode(run))
        return "".join(out)

    # ---- chat ----------------------------------------------------------------------------------
    def set_chat_template(self, template: str | None, origin: str | None = None) -> None:
        """Use `template`: a built-in name (chatml, llama2, llama3, alpaca, vicuna, plain), the path of a
        .jinja file, or Jinja source. None or "" leaves the tokenizer without a template.
        origin: where Jinja source came from, for error messages (e.g. ".../tokenizer_config.json")."""
        if not template:
            template = None
        elif ct.is_builtin(template):
            origin = f"built-in chat template {template!r}"
            template = ct.builtin_template(template)
        elif template.endswith(".jinja") and "\n" not in template and "{" not in template:
            if not os.path.isfile(template):
                raise TokenizerError(f"chat template file {template!r} does not exist")
            origin, template = template, read_text(template)
        origin = origin or "the chat template given as Jinja source"
        try:
            compiled = ct.compile_template(template) if template is not None else None
        except jinja2.TemplateSyntaxError as e:
            raise TokenizerError(f"{origin}: chat template line {e.lineno}: {e.message}") from None
        self._chat_source, self._chat_origin, self._chat_compiled = template, origin, compiled
        if compiled is not None:
            self._refuse_sandbox_escape()
        end_of_turn = self._end_of_turn_id()
        stops = self._file_stop_ids + ([end_of_turn] if end_of_turn is not None else [])
        self.stop_ids = list(dict.fromkeys(stops))

    @property
    def chat_template(self) -> str | None:
        return self._chat_source

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """The conversation as text, exactly as transformers' apply_chat_template(..., tokenize=False).
        A template that raises (raise_exception, an undefined name, a sandbox violation) gives a
        TokenizerError naming the template's source."""
        try:
            return self._render(messages, add_generation_prompt, **kwargs)
        except jinja2.TemplateError as e:
            raise self._template_error(e) from None

    def _render(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        if self._chat_compiled is None:
            raise TokenizerError(f"{self.source_dir}: the tokenizer has no chat template (no chat_template.jinja and "
                                 f"no chat_template in tokenizer_config.json); pass chat_template='chatml' (or "
                                 f"llama2, llama3, alpaca, vicuna, plain) to load_tokenizer")
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                   "unk_token": self.unk_token}
        return ct.render(self._chat_compiled, messages, add_generation_prompt, special, **kwargs)

    def _template_error(self, e: jinja2.TemplateError) -> TokenizerError:
        if isinstance(e, jinja2.exceptions.SecurityError):
            return TokenizerError(f"{self._chat_origin}: the chat template breaks the Jinja sandbox: {e}")
        return TokenizerError(f"{self._chat_origin}: chat template: {e}")

    def _refuse_sandbox_escape(self) -> None:
        """Render the probe conversation: a template that touches what the sandbox forbids (attributes of
        Python internals, mutating its arguments) fails now, naming its source. Any other failure on the
        probe is left to the rows (a template may refuse a conversation with raise_exception)."""
        try:
            self._render(_PROBE)
        except jinja2.exceptions.SecurityError as e:
            raise self._template_error(e) from None
        except (jinja2.TemplateError, IndexError, KeyError, TypeError):
            pass

    def _try_render(self, messages: list[dict], add_generation_prompt: bool, **kwargs) -> str | None:
        try:
            return self._render(messages, add_generation_prompt, **kwargs)
        except (jinja2.TemplateError, IndexError, KeyError, TypeError):
            return None

    def assistant_spans(self, messages: list[dict], add_generation_prompt: bool = False,
                        **kwargs) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the [start, end) character span of each assistant reply in it.

        A reply starts where the prompt for it ends: the rendering of the messages before it with
        the generation prompt, when that is a prefix of the full text (else where its content is
        found). It ends after the added token that follows its content with only whitespace between
        (<|im_end|>, <|eot_id|>, </s>, ...); when there is none, where the rendering of the
        conversation up to and including the reply ends (trailing whitespace dropped), if that is a
        prefix of the full text; else where its content ends.
        """
        full = self.render_chat(messages, add_generation_prompt, **kwargs)
        spans: list[tuple[int, int]] = []
        prev_end = 0
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            prompt = self._try_render(messages[:i], True, **kwargs)
            if prompt is not None and full.startswith(prompt) and len(prompt) >= prev_end:
                start, prompt_found = len(prompt), True
            else:
                before = self._try_render(messages[:i], False, **kwargs)
                ok = before is not None and full.startswith(before) and len(before) >= prev_end
                start, prompt_found = (len(before) if ok else prev_end), False
            content = message.get("content")
            content = content if isinstance(content, str) else ""
            pos = full.find(content, start) if content else -1
            if pos < 0 and content.strip():
                content = content.strip()
                pos = full.find(content, start)
            content_end = pos + len(content) if pos >= 0 else start
            if not prompt_found and pos >= 0:
                start = pos
            closing = self._closing_re
            m = closing.match(full, content_end) if closing is not None and (pos >= 0 or not content) else None
            upto = self._try_render(messages[:i + 1], False, **kwargs) if m is None else None
            if m is not None:
                end = m.end()
            elif upto is not None and full.startswith(upto) and len(upto.rstrip()) >= content_end:
                end = len(upto.rstrip())
            elif pos >= 0:
                end = content_end
            else:
                raise ValueError(f"chat template: cannot locate assistant message {i} ({content[:40]!r}) in the "
                                 f"rendered conversation; the template rewrites it")
            spans.append((start, end))
            prev_end = end
        return full, spans

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            **kwargs) -> ChatEncoding:
        """Render and tokenize a conversation (no extra bos: templates write their own, as in
        transformers). assistant_mask[t] is True when token t overlaps an assistant span."""
        text, spans = self.assistant_spans(messages, add_generation_prompt, **kwargs)
        ids, offsets = self.encode_with_offsets(text)
        mask, k = [], 0
        for a, b in offsets:
            while k < len(spans) and spans[k][1] <= a:
                k += 1
            mask.append(k < len(spans) and a < spans[k][1] and b > spans[k][0])
        return ChatEncoding(ids=ids, assistant_mask=mask)

    def _end_of_turn_id(self) -> int | None:
        """The added token that closes an assistant reply in this chat template (e.g. <|im_end|>,
        <|eot_id|>, </s>), found by rendering a two-message probe; None without a template."""
        if self._chat_compiled is None:
            return None
        try:
            text, spans = self.assistant_spans(_PROBE)
        except (jinja2.TemplateError, ValueError, IndexError, KeyError, TypeError):
            return None
        if not spans:
            return None
        tail = text[spans[0][0]:spans[0][1]]
        tail = tail[tail.rfind("pong") + 4:] if "pong" in tail else tail
        found = [(m.start(), m.group(0)) for m in self._added_re.finditer(tail)] if self._added_re else []
        return self.added.get(found[-1][1].strip()) if found else None

    # ---- saving --------------------------------------------------------------------------------
    def save_pretrained(self, directory: str) -> None:
        """Write the tokenizer files to `directory` so both minirlhf and transformers load it."""
        os.makedirs(directory, exist_ok=True)
        names = list(self.files) + ["special_tokens_map.json"]
        for name in names:
            src, dst = os.path.join(self.source_dir, name), os.path.join(directory, name)
            if os.path.isfile(src) and not (os.path.exists(dst) and os.path.samefile(src, dst)):
                shutil.copyfile(src, dst)
        config = dict(self.config)
        if "tokenizer_class" not in config:  # transformers needs it to pick a loader
            config["tokenizer_class"] = ("PreTrainedTokenizerFast" if "tokenizer.json" in self.files else
                                         "GPT2Tokenizer" if "vocab.json" in self.files else "LlamaTokenizer")
        for name, token in (("bos", self.bos_token), ("eos", self.eos_token), ("unk", self.unk_token)):
            if token is not None and config.get(f"{name}_token") is None:
                config[f"{name}_token"] = token
        if config.get("pad_token") is None and self.pad_id != self.eos_id:
            config["pad_token"] = self.pad_token
        jinja_path = os.path.join(directory, "chat_template.jinja")
        if self._chat_source is not None and self.template_file:
            config.pop("chat_template", None)
            with open(jinja_path, "w", encoding="utf-8") as f:
                f.write(self._chat_source)
        elif self._chat_source is not None:
            config["chat_template"] = self._chat_source
            if os.path.isfile(jinja_path):
                os.remove(jinja_path)
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)


# ---- loading -------------------------------------------------------------------------------------
def _read_json(path: str) -> dict:
    """A JSON object file of the tokenizer directory, {} when absent; TokenizerError naming it otherwise."""
    if not os.path.exists(path):
        return {}
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value, where: str) -> str | None:
    """A special token written as a string or as an AddedToken dict ({"content": ...})."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{where}: special token {value!r} is neither a string nor an AddedToken dict "
                         f"with 'content'")


def _pick_template(value, where: str) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of {"name", "template"} (use "default")."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) for t in value):
        named = {t.get("name"): t.get("template") for t in value}
        if "default" in named:
            return named["default"]
        if value:
            return value[0].get("template")
        return None
    raise TokenizerError(f"{where}: chat_template must be a string or a list of named templates")


def load_tokenizer(directory: str, chat_template: str | None = None, template_origin: str | None = None) -> Tokenizer:
    """Load a tokenizer directory, preferring tokenizer.model (SentencePiece), then tokenizer.json
    (byte-level BPE), then vocab.json + merges.txt (GPT-2). Special tokens come from
    tokenizer_config.json, then special_tokens_map.json, then generation_config.json. chat_template
    (a built-in name, a .jinja path or Jinja source) overrides the directory's template: transformers-5
    chat_template.jinja, else tokenizer_config.json's chat_template. template_origin names where a
    chat_template given as Jinja source came from, for error messages (e.g. "[data] chat_template").
    Files that are missing, unreadable or malformed raise TokenizerError naming the file."""
    if not os.path.isdir(directory):
        raise TokenizerError(f"tokenizer directory {directory!r} does not exist")
    path = lambda name: os.path.join(directory, name)
    config = _read_json(path("tokenizer_config.json"))
    special_map = _read_json(path("special_tokens_map.json"))
    generation = _read_json(path("generation_config.json"))
    added: list[dict] = []
    if os.path.isfile(path("tokenizer.model")):
        model: SentencePieceModel | BPEModel = SentencePieceModel(path("tokenizer.model"))
        files = ["tokenizer.model"] + (["tokenizer.json"] if os.path.isfile(path("tokenizer.json")) else [])
    elif os.path.isfile(path("tokenizer.json")):
        data = _read_json(path("tokenizer.json"))
        model = BPEModel(ByteLevelBPE.from_tokenizer_json(data, path("tokenizer.json")))
        added.extend(data.get("added_tokens") or [])
        files = ["tokenizer.json"]
    elif os.path.isfile(path("vocab.json")) and os.path.isfile(path("merges.txt")):
        model = BPEModel(ByteLevelBPE.from_vocab_merges(path("vocab.json"), path("merges.txt")))
        files = ["vocab.json", "merges.txt"]
    else:
        raise TokenizerError(f"{directory}: no tokenizer.model, tokenizer.json or vocab.json + merges.txt")
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise TokenizerError(f"{path('tokenizer_config.json')}: added_tokens_decoder must map ids to tokens")
    for tid, spec in decoder.items():
        spec = spec if isinstance(spec, dict) else {"content": spec}
        added.append({**spec, "id": int(tid) if str(tid).isdigit() else tid})
    for tok in added:
        if not isinstance(tok, dict) or not isinstance(tok.get("content"), str) or not isinstance(tok.get("id"), int):
            raise TokenizerError(f"{directory}: added token {tok!r} (tokenizer_config.json added_tokens_decoder or "
                                 f"tokenizer.json added_tokens) needs a string 'content' and an integer id")
    # tokens named in the config that are ordinary vocabulary entries (e.g. GPT-2's <|endoftext|>)
    extra = list(config.get("additional_special_tokens") or special_map.get("additional_special_tokens") or [])
    extra_special = config.get("extra_special_tokens") or []
    extra += list(extra_special.values() if isinstance(extra_special, dict) else extra_special)
    known = {t["content"] for t in added}
    for token in (_token_text(t, path("tokenizer_config.json")) for t in extra):
        if token not in known and model.lookup(token) is not None:
            added.append({"content": token, "id": model.lookup(token), "special": True})
            known.add(token)
    special = {name: _token_text(config.get(f"{name}_token", special_map.get(f"{name}_token")), directory)
               for name in ("bos", "eos", "pad", "unk")}
    eos_ids = generation.get("eos_token_id")
    eos_ids = [] if eos_ids is None else ([eos_ids] if isinstance(eos_ids, int) else list(eos_ids))
    generation_ids = {"bos": generation.get("bos_token_id"), "eos": eos_ids[0] if eos_ids else None,
                      "pad": generation.get("pad_token_id")}
    template_file = os.path.isfile(path("chat_template.jinja"))
    chat_template, origin = chat_template or None, template_origin
    if chat_template is None and template_file:
        chat_template, origin = read_text(path("chat_template.jinja")), path("chat_template.jinja")
    elif chat_template is None:
        origin = path("tokenizer_config.json")
        chat_template = _pick_template(config.get("chat_template"), origin)
        template_file = False
    else:
        template_file = False
    return Tokenizer(model, added, special, config, directory, files, chat_template, template_file,
                     eos_ids, generation_ids, template_origin=origin)


# ---- training ------------------------------------------------------------------------------------
def train_sentencepiece(texts: Iterable[str], out_dir: str, vocab_size: int, model_type: str = "bpe",
                        chat_template: str = "chatml", character_coverage: float = 0.9995,
                        user_defined_symbols: Sequence[str] = (), max_sentence_length: int = 1 << 16,
                        num_threads: int = 2) -> Tokenizer:
    """Train a SentencePiece model (Kudo & Richardson 2018) on `texts` and write an HF-style dir:
    tokenizer.model, tokenizer.json (the same model for transformers/tokenizers), tokenizer_config.json
    (bos <s>, eos </s>, unk <unk>, pad <pad>, the chat template) and special_tokens_map.json.

    Settings: byte_fallback (any text encodes: unseen characters become <0xNN> byte pieces), identity
    normalization, whitespace kept verbatim and no dummy prefix (decode(encode(s)) == s), digits split
    one by one. The chat template's marker tokens (e.g. <|im_start|>, <|im_end|>) become single pieces.
    Returns the loaded Tokenizer.
    """
    import sentencepiece as spm
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"train_sentencepiece: model_type must be 'bpe' or 'unigram', got {model_type!r}")
    template_tokens = ct.builtin_special_tokens(chat_template) if ct.is_builtin(chat_template) else []
    symbols = list(dict.fromkeys([*template_tokens, *user_defined_symbols]))
    specials = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
    minimum = 256 + len(specials) + len(symbols)
    if vocab_size <= minimum:
        raise ValueError(f"train_sentencepiece: vocab_size {vocab_size} is too small; byte_fallback needs 256 byte "
                         f"pieces + {len(specials)} specials + {len(symbols)} user symbols + the characters")
    sentences = (t for t in texts if t)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences, model_writer=buf, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, character_coverage=character_coverage, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True,
            allow_whitespace_only_pieces=True, user_defined_symbols=symbols, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            unk_piece=specials["unk"], bos_piece=specials["bos"], eos_piece=specials["eos"],
            pad_piece=specials["pad"], max_sentence_length=max_sentence_length, hard_vocab_limit=False,
            num_threads=num_threads, minloglevel=2)
    except RuntimeError as e:
        raise ValueError(f"train_sentencepiece(vocab_size={vocab_size}, model_type={model_type!r}): {e}") from None
    os.makedirs(out_dir, exist_ok=True)
    model_path = os.path.join(out_dir, "tokenizer.model")
    with open(model_path, "wb") as f:
        f.write(buf.getvalue())
    sp = SentencePieceModel(model_path).sp
    added = {i: sp.id_to_piece(i) for i in range(sp.get_piece_size())
             if sp.is_control(i) or sp.is_unknown(i) or sp.id_to_piece(i) in symbols}
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(sentencepiece_to_tokenizer_json(sp, model_type, added), f, ensure_ascii=False)
    token_entry = lambda content: {"content": content, "lstrip": False, "normalized": False,
                                   "rstrip": False, "single_word": False, "special": True}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{f"{name}_token": token for name, token in specials.items()},
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(i): token_entry(c) for i, c in added.items()},
        "chat_template": ct.builtin_template(chat_template) if ct.is_builtin(chat_template) else chat_template,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({f"{name}_token": token for name, token in specials.items()}, f, indent=2)
    return load_tokenizer(out_dir)


def sentencepiece_to_tokenizer_json(sp, model_type: str, added: dict[int, str]) -> dict:
    """The `tokenizers` JSON equivalent of a SentencePiece model trained by train_sentencepiece
    (identity normalization, no dummy prefix, byte_fallback), so transformers loads the directory
    without the protobuf package. BPE merges are rebuilt from the vocabulary: SentencePiece BPE
    merges the adjacent pair whose union has the best score (Kudo & Richardson 2018, sec. 2), i.e.
    the lowest piece id, so each (left, right) pair with left+right in the vocabulary ranks by the
    id of left+right."""
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    ordinary = {p: i for i, p in enumerate(pieces)
                if i not in added and not sp.is_byte(i) and not sp.is_unused(i)}
    if model_type == "bpe":
        merges = []
        for piece, i in ordinary.items():
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in ordinary and right in ordinary:
                    merges.append((i, ordinary[left], ordinary[right], left, right))
        merges.sort()
        model = {"type": "BPE", "dropout": None, "unk_token": pieces[sp.unk_id()], "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                 "vocab": {p: i for i, p in enumerate(pieces)}, "merges": [[m[3], m[4]] for m in merges]}
    else:
        model = {"type": "Unigram", "unk_id": sp.unk_id(), "byte_fallback": True,
                 "vocab": [[p, sp.get_score(i)] for i, p in enumerate(pieces)]}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, c in sorted(added.items())],
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": model,
    }
