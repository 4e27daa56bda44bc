"""minirlhf.tokenizer against independent oracles: the sentencepiece library, Hugging Face `tokenizers`
(which trains the byte-level BPE files these tests read) and transformers' chat templates.

Every tokenizer here is trained by the test itself on a small generated corpus, so nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import unicodedata
from itertools import pairwise

import pytest
import sentencepiece as spm
from tokenizers import (
    AddedToken,
    Regex,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from tokenizers import Tokenizer as HFTokenizer
from transformers import AutoTokenizer

from minirlhf.bpe import bytes_to_unicode
from minirlhf.chat_template import builtin_template
from minirlhf.tokenizer import TokenizerError, load_tokenizer, train_sentencepiece

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

WORDS = ["the", "quick", "brown", "fox", "It's", "WE'LL", "they're", "naïve", "café", "Straße", "Ωmega", "日本語",
         "你好世界", "한국어", "Привет", "مرحبا", "नमस्ते", "ภาษาไทย", "😀", "👩‍👩‍👧", "🚀🔥", "e\u0301", "\u00a0",
         "x²", "½", "3.14159", "1234567", "0x1F", "foo_bar", "camelCase", "def", "return", "{", "}", "(x)",
         "==", "!=", "->", "**", "#include", "<stdio.h>", "http://a.b/c?d=1", "$100", "@user", "…", "—", "‘q’"]
SEPARATORS = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\t\t", "    ", "", ".", ", ", "!\n"]
CODE = "def f(x):\n    if x > 0:\n\treturn x ** 2  # square\n    return -x\n\nprint(f(12345))\n"


def varied_strings(n: int, seed: int, specials: list[str] = ()) -> list[str]:
    """n strings mixing scripts, emoji, CJK, whitespace runs, tabs/newlines, digits, code and (when
    given) special-token strings inside the text."""
    rng = random.Random(seed)
    out = [CODE, "", " ", "  leading and trailing  ", "\n\n\n", "tabs\tand\ttabs", "1234567890 987654321",
           "ＡＢＣ full-width", "mixed日本語and English", "emoji😀inside", "a\u2028b", "\u00e9 vs e\u0301"]
    while len(out) < n:
        parts = [rng.choice(WORDS) + rng.choice(SEPARATORS) for _ in range(rng.randint(1, 12))]
        if specials and rng.random() < 0.3:
            parts.insert(rng.randint(0, len(parts)), rng.choice(specials))
        if rng.random() < 0.1:
            parts.append(CODE[: rng.randint(0, len(CODE))])
        out.append("".join(parts))
    return out


def corpus() -> list[str]:
    return varied_strings(400, seed=1) + [CODE] * 5


def train_byte_level(kind: str, directory: str, specials: list[str], config: dict) -> HFTokenizer:
    """Train a byte-level BPE with `tokenizers` and save tokenizer.json (+ vocab.json/merges.txt)."""
    if kind == "llama3":
        tk = HFTokenizer(models.BPE(ignore_merges=True))
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif kind == "qwen2":
        tk = HFTokenizer(models.BPE())
        tk.normalizer = normalizers.NFC()
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif kind in ("gpt2", "gpt2_prefix"):
        tk = HFTokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=kind == "gpt2_prefix", use_regex=True)
    else:
        raise ValueError(kind)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus(), trainer)
    os.makedirs(directory, exist_ok=True)
    tk.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **config}, f)
    return tk


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tok")
    out = {}
    out["llama3"] = str(root / "llama3")
    train_byte_level("llama3", out["llama3"], LLAMA3_SPECIALS, {
        "bos_token": "<|begin_of_text|>",
        "eos_token": {"__type": "AddedToken", "content": "<|eot_id|>", "lstrip": False, "rstrip": False,
                      "normalized": False, "single_word": False, "special": True},
        "chat_template": builtin_template("llama3")})
    out["qwen2"] = str(root / "qwen2")
    train_byte_level("qwen2", out["qwen2"], CHATML_SPECIALS, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    with open(os.path.join(out["qwen2"], "chat_template.jinja"), "w") as f:  # transformers-5 layout
        f.write(RICH_CHATML)
    for kind in ("gpt2", "gpt2_prefix"):
        out[kind] = str(root / kind)
        tk = train_byte_level(kind, out[kind], ["<|endoftext|>"], {"eos_token": "<|endoftext|>"})
        if kind == "gpt2":
            out["gpt2_files"] = str(root / "gpt2_files")  # the same model as vocab.json + merges.txt only
            os.makedirs(out["gpt2_files"])
            tk.model.save(out["gpt2_files"])
            with open(os.path.join(out["gpt2_files"], "special_tokens_map.json"), "w") as f:
                json.dump({"eos_token": "<|endoftext|>"}, f)
    for model_type in ("bpe", "unigram"):
        out[f"sp_{model_type}"] = str(root / f"sp_{model_type}")
        train_sentencepiece(corpus(), out[f"sp_{model_type}"], vocab_size=700, model_type=model_type,
                            chat_template="chatml")
    return out


# A ChatML template in the style of Qwen's: multi-line with whitespace control, namespace, tojson,
# loop controls, raise_exception and a {% generation %} block, so trim_blocks/lstrip_blocks and the
# extensions must behave as in transformers.
RICH_CHATML = """{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system = 'You are a helpful assistant.' %}
    {%- set loop_messages = messages %}
{%- endif %}
<|im_start|>system
{{ system }}
{%- if tools %}

Tools: {{ tools | tojson }}
{%- endif %}<|im_end|>
{% set ns = namespace(turns=0) %}
{% for message in loop_messages %}
    {% if message['role'] == 'tool' %}{% continue %}{% endif %}
    {% if message['role'] not in ['user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    {% if message['role'] == 'assistant' %}{% set ns.turns = ns.turns + 1 %}{% endif %}
<|im_start|>{{ message['role'] }}
{% if message['role'] == 'assistant' %}
{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}
{% else %}
{{ message['content'] }}<|im_end|>
{% endif %}

{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
     {"role": "user", "content": "And of 日本?"}, {"role": "assistant", "content": "東京 😀"},
     {"role": "user", "content": "Code:\n\tx = 1\n"}, {"role": "assistant", "content": "  def f():\n    return 1  "}],
    [{"role": "user", "content": "It's 12345 <|eot_id|> literal"}, {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "again"}],
]


# ---- ids and round trips -------------------------------------------------------------------------
@pytest.mark.parametrize("kind,specials", [("llama3", LLAMA3_SPECIALS), ("qwen2", CHATML_SPECIALS),
                                           ("gpt2", ["<|endoftext|>"]), ("gpt2_prefix", ["<|endoftext|>"])])
def test_byte_level_bpe_matches_tokenizers(dirs, kind, specials):
    ours = load_tokenizer(dirs[kind])
    ref = HFTokenizer.from_file(os.path.join(dirs[kind], "tokenizer.json"))
    strings = varied_strings(300, seed=2, specials=specials)
    for s in strings:
        ids = ours.encode(s)
        expected = ref.encode(s, add_special_tokens=False).ids
        assert ids == expected, f"{kind}: {s!r}"
        assert ours.decode(ids) == ref.decode(expected, skip_special_tokens=False), f"{kind}: {s!r}"
        if kind != "gpt2_prefix":  # add_prefix_space adds a space, so that one does not round-trip
            assert ours.decode(ids) == (unicodedata.normalize("NFC", s) if kind == "qwen2" else s)
    assert ours.vocab_size == ref.get_vocab_size()
    # offsets cover the text they came from (used by the assistant mask)
    for s in strings[:50]:
        ids, offsets = ours.encode_with_offsets(s)
        assert ids == ours.encode(s) and len(offsets) == len(ids)
        assert all(0 <= a <= b <= len(s) for a, b in offsets)
        assert all(a1 <= a2 for (a1, _), (a2, _) in pairwise(offsets))


def test_vocab_merges_files_match_tokenizers(dirs):
    ours = load_tokenizer(dirs["gpt2_files"])
    ref = HFTokenizer.from_file(os.path.join(dirs["gpt2"], "tokenizer.json"))
    assert ours.eos_id == ref.token_to_id("<|endoftext|>") and ours.bos_id is None and ours.pad_id == ours.eos_id
    for s in varied_strings(300, seed=3, specials=["<|endoftext|>"]):
        ids = ours.encode(s)
        assert ids == ref.encode(s, add_special_tokens=False).ids, repr(s)
        assert ours.decode(ids) == s


def test_bytes_to_unicode_table():
    table = bytes_to_unicode()
    # 188 printable bytes keep their own character; the other 68 go to U+0100.. in byte order,
    # so byte 0 -> U+0100, byte 32 (space) -> U+0120 'Ġ' (the 33rd shifted byte), byte 10 -> U+010A 'Ċ'
    assert len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[0] == "\u0100" and table[32] == "Ġ" and table[10] == "Ċ"
    assert table[0xAD] == "Ń"  # soft hyphen is the last shifted byte: U+0100 + 67


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_matches_library_and_transformers(dirs, model_type):
    d = dirs[f"sp_{model_type}"]
    ours = load_tokenizer(d)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(d, "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(d)  # reads the tokenizer.json that train_sentencepiece wrote
    for s in varied_strings(300, seed=4):
        ids = ours.encode(s)
        assert ids == sp.encode(s), repr(s)
        assert ids == hf.encode(s, add_special_tokens=False), repr(s)
        assert ours.decode(ids) == s == sp.decode(ids)
    # special tokens inside text: split out first, as transformers does (sentencepiece alone reads
    # "</s>" as characters)
    for s in varied_strings(100, seed=5, specials=["<s>", "</s>", "<|im_start|>", "<|im_end|>"]):
        ids = ours.encode(s)
        assert ids == hf.encode(s, add_special_tokens=False), repr(s)
        assert ours.decode(ids) == s
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id) == (1, 2, 3, 0)
    assert ours.encode("hi", add_bos=True, add_eos=True) == [1, *sp.encode("hi"), 2]
    assert ours.decode([1, *sp.encode("hi"), 2], skip_special_tokens=True) == "hi"
    im_end = ours.token_to_id("<|im_end|>")
    assert ours.stop_ids == [2, im_end]  # eos plus the chat template's end-of-turn token
    ours.set_chat_template("alpaca")  # replies end with eos only
    assert ours.stop_ids == [2]


# ---- special tokens from the config files --------------------------------------------------------
def test_special_tokens_from_config_files(dirs, tmp_path):
    llama3 = load_tokenizer(dirs["llama3"])  # eos given as an AddedToken dict
    assert llama3.eos_id == llama3.token_to_id("<|eot_id|>") and llama3.bos_token == "<|begin_of_text|>"
    assert llama3.pad_id == llama3.eos_id  # no pad token: falls back to eos
    # generation_config's eos list: first becomes eos_id when the config names none; all are stop ids
    d = tmp_path / "gen"
    d.mkdir()
    shutil.copyfile(os.path.join(dirs["llama3"], "tokenizer.json"), d / "tokenizer.json")
    end, eot = llama3.token_to_id("<|end_of_text|>"), llama3.token_to_id("<|eot_id|>")
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [end, eot]}))
    (d / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<|end_of_text|>"}}))
    tok = load_tokenizer(str(d))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids) == (0, end, end, [end, eot])
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(CONVERSATIONS[0])
    with pytest.raises(ValueError, match="eos_token '<nope>' is not in the vocabulary"):
        (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
        load_tokenizer(str(d))
    with pytest.raises(TokenizerError, match="no tokenizer.model, tokenizer.json"):
        load_tokenizer(str(tmp_path))


# ---- chat templates ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama3", "qwen2", "sp_bpe"])
def test_chat_template_matches_transformers(dirs, kind):
    ours = load_tokenizer(dirs[kind])
    hf = AutoTokenizer.from_pretrained(dirs[kind])
    for messages in CONVERSATIONS:
        for agp in (False, True):
            text = ours.render_chat(messages, add_generation_prompt=agp)
            assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=agp)
            enc = ours.apply_chat_template(messages, add_generation_prompt=agp)
            assert enc.ids == hf(text, add_special_tokens=False)["input_ids"]
            assert len(enc.assistant_mask) == len(enc.ids)
    tools = [{"name": "add", "parameters": {"a": "int", "b": "ünïcode"}}]
    assert ours.render_chat(CONVERSATIONS[0], tools=tools) == hf.apply_chat_template(
        CONVERSATIONS[0], tools=tools, tokenize=False)


def test_builtin_templates_render_like_transformers(dirs):
    hf = AutoTokenizer.from_pretrained(dirs["sp_bpe"])
    ours = load_tokenizer(dirs["sp_bpe"])
    messages = CONVERSATIONS[1]
    for name in ("chatml", "llama3", "llama2", "alpaca", "vicuna", "plain"):
        ours.set_chat_template(name)
        for agp in (False, True):
            assert ours.render_chat(messages, add_generation_prompt=agp) == hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=agp, chat_template=builtin_template(name)), name
    ours.set_chat_template("llama2")
    with pytest.raises(Exception, match="roles must alternate"):
        ours.render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_assistant_mask_token_by_token_chatml(dirs):
    tok = load_tokenizer(dirs["sp_bpe"])
    messages = CONVERSATIONS[1][:5]
    enc = tok.apply_chat_template(messages)
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    nl = tok.encode("\n")
    # ChatML renders each turn as <|im_start|>ROLE\nCONTENT<|im_end|>\n; the special tokens cut the
    # text, so the ids are the concatenation below, and the mask is True exactly on the assistant
    # CONTENT ids and the <|im_end|> after them.
    expected_ids, expected_mask = [], []
    for m in messages:
        head = [im_start, *tok.encode(m["role"] + "\n")]
        body = [*tok.encode(m["content"]), im_end]
        train = m["role"] == "assistant"
        expected_ids += head + body + nl
        expected_mask += [False] * len(head) + [train] * len(body) + [False] * len(nl)
    assert enc.ids == expected_ids
    assert enc.assistant_mask == expected_mask
    assert tok.decode([i for i, m in zip(enc.ids, enc.assistant_mask) if m]) == "Paris.<|im_end|>東京 😀<|im_end|>"


@pytest.mark.parametrize("kind,template", [("llama3", None), ("qwen2", None), ("sp_bpe", "llama2"),
                                           ("sp_unigram", "alpaca"), ("gpt2", "vicuna"), ("sp_bpe", "plain")])
def test_assistant_mask_covers_replies_and_end_tokens(dirs, kind, template):
    tok = load_tokenizer(dirs[kind], chat_template=template)
    messages = CONVERSATIONS[1]
    enc = tok.apply_chat_template(messages)
    masked = tok.decode([i for i, m in zip(enc.ids, enc.assistant_mask) if m])
    end = {"llama3": "<|eot_id|>", "qwen2": "<|im_end|>"}.get(kind, tok.eos_token)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    # the masked tokens spell the replies, each closed by its end token; templates may trim a reply
    # or put a space before it (llama2, vicuna), so compare without whitespace
    squash = lambda t: "".join(t.split())
    assert squash(masked) == squash("".join(r + end for r in replies))
    assert masked.count(end) == len(replies)
    # unmasked tokens hold no reply text
    prompt_text = tok.decode([i for i, m in zip(enc.ids, enc.assistant_mask) if not m])
    assert "Paris." not in prompt_text and "東京" not in prompt_text


def test_generation_prompt_and_end_of_turn(dirs):
    tok = load_tokenizer(dirs["llama3"])
    enc = tok.apply_chat_template(CONVERSATIONS[2], add_generation_prompt=True)
    text = tok.decode(enc.ids)
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "<|eot_id|> literal" in text  # a special token written by the user is still one token
    assert sum(enc.assistant_mask) == len(tok.encode("ok")) + 1
    assert tok.stop_ids == [tok.eos_id]  # eos is <|eot_id|>, which also ends turns


# ---- saving --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sp_bpe", "qwen2", "gpt2_files"])
def test_save_pretrained_round_trip(dirs, kind, tmp_path):
    tok = load_tokenizer(dirs[kind], chat_template="chatml" if kind == "gpt2_files" else None)
    tok.save_pretrained(str(tmp_path))
    again = load_tokenizer(str(tmp_path))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    strings = varied_strings(60, seed=6)
    for s in strings:
        assert again.encode(s) == tok.encode(s) == hf.encode(s, add_special_tokens=False)
    assert (again.bos_id, again.eos_id, again.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert again.chat_template == tok.chat_template
    if kind != "gpt2_files":  # gpt2 has no <|im_start|> token: transformers would not split it either
        messages = CONVERSATIONS[1]
        assert again.render_chat(messages) == hf.apply_chat_template(messages, tokenize=False)
    assert os.path.isfile(tmp_path / "chat_template.jinja") == (kind == "qwen2")


# A "thinking" template: the generation prompt opens <think>, which finished turns do not contain,
# and the last message is followed by <|endoftext|>. So neither the prompt rendering nor the
# rendering up to an earlier reply is a prefix of the whole text, and the mask falls back to finding
# the reply text and the special token that closes it.
THINKING_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% else %}<|endoftext|>{% endif %}")


def test_assistant_mask_when_prefixes_do_not_match(dirs):
    tok = load_tokenizer(dirs["qwen2"], chat_template=THINKING_CHATML)
    messages = CONVERSATIONS[1]
    enc = tok.apply_chat_template(messages)
    im_end = tok.token_to_id("<|im_end|>")
    masked_runs, run = [], []
    for i, m in zip(enc.ids, enc.assistant_mask):
        if m:
            run.append(i)
        elif run:
            masked_runs.append(run)
            run = []
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    # each run is exactly the reply's tokens and <|im_end|> (the reply follows "\n", which the
    # Qwen2 pattern keeps as its own piece, so the reply tokenizes as it does alone)
    assert masked_runs == [[*tok.encode(r), im_end] for r in replies]


def test_ignore_merges(tmp_path):
    # vocab {a, b, c, bc, abc}, merges [(b, c)]: "abc" -> a + bc by merging (hand-derived: the only
    # rankable pair is (b, c), then (a, bc) has no rank); with ignore_merges the whole word "abc" is
    # a vocabulary entry and is emitted directly. tokenizers must agree in both settings.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab.update({"bc": len(vocab), "abc": len(vocab) + 1, "<eos>": len(vocab) + 2})
    for ignore, expected in ((False, [vocab["a"], vocab["bc"]]), (True, [vocab["abc"]])):
        tk = HFTokenizer(models.BPE(vocab=vocab, merges=[("b", "c")], ignore_merges=ignore))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tk.decoder = decoders.ByteLevel()
        d = tmp_path / str(ignore)
        d.mkdir()
        tk.save(str(d / "tokenizer.json"))
        (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
        ours = load_tokenizer(str(d))
        assert ours.encode("abc") == expected == tk.encode("abc").ids
        assert ours.decode(expected) == "abc"


def test_added_tokens_that_strip_whitespace(dirs, tmp_path):
    # AddedToken(lstrip=True) swallows the whitespace on its left, rstrip=True on its right
    tk = HFTokenizer.from_file(os.path.join(dirs["gpt2"], "tokenizer.json"))
    tk.add_special_tokens([AddedToken("<mask>", lstrip=True), AddedToken("<R>", rstrip=True)])
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    ours = load_tokenizer(str(tmp_path))
    hand = ["a <mask> b", "a   <mask>b", "x<R>   y", " <R> <mask> ", "<mask>\n\n<R>\t\tz"]
    for s in hand + varied_strings(50, 7, ["<mask>", "<R>"]):
        assert ours.encode(s) == tk.encode(s, add_special_tokens=False).ids, repr(s)
