"""The model under a Tokenizer: plain text (no added tokens) <-> ids, with character offsets for the
assistant mask. Two kinds, with one small interface: a tokenizer.model read with the sentencepiece library,
and our byte-level BPE (bpe.py) behind tokenizer.json or vocab.json + merges.txt.
"""

from __future__ import annotations

from minirlhf.bpe import ByteLevelBPE, TokenizerError

Offsets = list[tuple[int, int]]


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
