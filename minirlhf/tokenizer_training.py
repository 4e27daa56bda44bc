"""Training a SentencePiece tokenizer (the demo's, the tests' tiny ones) and writing it as a Hugging Face
style directory that both minirlhf and transformers load.

    tok = train_sentencepiece(texts, "out/tok", vocab_size=2000, chat_template="chatml")
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Sequence

from minirlhf import chat_template as ct
from minirlhf.tokenizer import Tokenizer, load_tokenizer
from minirlhf.tokenizer_models import SentencePieceModel


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
