"""`minirlhf chat`: the conversation's KV cache is reused across turns (only the new tokens are prefilled,
and the logits equal a full forward over the whole conversation, also after the template rewrites the
start), the context limit drops old turns, streamed text is released whole characters at a time, and the
real process in a pseudo-terminal streams answers, obeys /system, /reset, /exit, and Ctrl-C stops an
answer without ending the program.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers_tiny import tiny_model_dir, tiny_tokenizer
from test_generate import constant_model_dir

from minirlhf.commands.chat import ChatError, ChatSession, TextStream
from minirlhf.commands.sampling import Sampling
from minirlhf.model import Transformer
from minirlhf.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
REAL = Path("/tmp/real/smollm2")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    tok = tiny_tokenizer(d / "tok")
    return {"dir": d, "tok": tok, "model": tiny_model_dir(d / "model", tok),
            # p(stop) = 2 e^3.3 / (2 e^3.3 + sum of ~300 e^N(0,1)) ~ 0.1 per token: answers of ~10 tokens
            "chatty": constant_model_dir(d / "chatty", tok, stop_logit=3.3, max_position_embeddings=1024),
            "endless": constant_model_dir(d / "endless", tok, stop_logit=-50.0, max_position_embeddings=8192)}


def full_forward_logits(model: Transformer, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1]


def test_kv_cache_is_reused_across_turns_and_matches_a_full_forward(tiny):
    tok = tiny["tok"]
    model = Transformer.from_pretrained(tiny["model"]).eval()
    reference = Transformer.from_pretrained(tiny["model"]).eval()  # the same weights, no cache
    session = ChatSession(model, tok, Sampling(temperature=0.0, max_new_tokens=12), capacity=512)
    try:
        first = session.reply("Review the kettle.", lambda text: None)
        ids1 = tok.encode(tok.render_chat(session.conversation()[:1], add_generation_prompt=True))
        assert (first.reused, first.prefilled) == (0, len(ids1))

        second = session.reply("And the hotel?", lambda text: None)
        # the second turn reuses at least the whole first prompt and prefills only what differs (the new
        # turn, and the answer from where its re-encoded text tokenizes otherwise than it was sampled)
        assert second.reused >= len(ids1)
        assert second.prefilled == len(tok.encode(tok.render_chat(session.conversation()[:3], True))) - second.reused

        session.messages.append({"role": "user", "content": "One more."})
        ids = session.render_ids()
        logits, reused = session.prefill(ids)
        assert reused > len(ids1)
        torch.testing.assert_close(logits, full_forward_logits(reference, ids), atol=1e-5, rtol=1e-5)

        session.system = "Be brief."  # the rendering now differs from its second token on
        ids = session.render_ids()
        logits, reused = session.prefill(ids)
        assert reused <= 1
        torch.testing.assert_close(logits, full_forward_logits(reference, ids), atol=1e-5, rtol=1e-5)
    finally:
        session.close()


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gpt2"])
def test_every_family_chats_through_the_cache(tiny, family, tmp_path, capsys):
    """The cache path equals a full forward on each family; gpt2, saved here without a chat template,
    gets the built-in plain one, and says so."""
    import json

    from minirlhf.commands.loading import load_chat_tokenizer

    extra = {"gpt2": {"num_key_value_heads": 4}, "qwen2": {"qkv_bias": True}}.get(family, {})
    model_dir = tiny_model_dir(tmp_path / family, tiny["tok"], seed=3, model_type=family, **extra)
    if family == "gpt2":
        config_file = model_dir / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config.pop("chat_template")
        config_file.write_text(json.dumps(config))
    tok = load_chat_tokenizer(model_dir)
    assert ("has no chat template; using the built-in 'plain' template" in capsys.readouterr().err) == (
        family == "gpt2")
    model = Transformer.from_pretrained(model_dir).eval()
    reference = Transformer.from_pretrained(model_dir).eval()
    session = ChatSession(model, tok, Sampling(temperature=0.0, max_new_tokens=6), capacity=128)
    try:
        session.reply("Review the tent.", lambda text: None)
        session.messages.append({"role": "user", "content": "And the lamp?"})
        ids = session.render_ids()
        logits, reused = session.prefill(ids)
        assert reused > 0
        torch.testing.assert_close(logits, full_forward_logits(reference, ids), atol=1e-5, rtol=1e-5)
    finally:
        session.close()


def test_the_context_limit_drops_old_turns_and_refuses_a_message_too_long(tiny):
    tok = tiny["tok"]
    model = Transformer.from_pretrained(tiny["chatty"]).eval()
    session = ChatSession(model, tok, Sampling(temperature=1.0, max_new_tokens=16), capacity=64)  # room 16
    try:
        dropped = 0
        for i in range(8):
            stats = session.reply(f"Review the kettle number {i}.", lambda text: None)
            dropped += stats.dropped
            assert len(session.cached) <= 64
        assert dropped > 0 and session.messages[0]["role"] == "user"
        before = list(session.messages)
        with pytest.raises(ChatError, match="the context holds 64"):
            session.reply("kettle " * 80, lambda text: None)
        assert session.messages == before  # the refused message is not kept, and nothing was dropped for it
    finally:
        session.close()


def released_pieces(tok, text: str) -> list[str]:
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in tok.encode(text)]
    return pieces + [stream.flush()]


def test_text_stream_releases_whole_characters(tiny):
    text = "The café was naïve — 日本語 🎉 ok"
    tok = tiny["tok"]  # SentencePiece with byte fallback: characters it never saw become <0xNN> pieces
    assert len(tok.encode("🎉")) == 4  # one piece per UTF-8 byte
    pieces = released_pieces(tok, text)
    assert "".join(pieces) == tok.decode(tok.encode(text))
    assert not any("\ufffd" in p for p in pieces)
    assert "🎉" in pieces  # released in one piece once its fourth byte arrived
    if (REAL / "tokenizer.json").exists():  # byte-level BPE: one character spread over several pieces
        real = load_tokenizer(str(REAL))
        pieces = released_pieces(real, text)
        assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


# --------------------------------------------------------------------------------------------------
# the real process in a pseudo-terminal

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")


class Terminal:
    """`python -m minirlhf chat ...` on the slave side of a pseudo-terminal; we type on the master side."""

    def __init__(self, *args: str):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1", "TERM": "dumb"}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: its controlling terminal is the pty, so Ctrl-C reaches it as SIGINT
            os.chdir(ROOT)
            os.execve(sys.executable, [sys.executable, "-m", "minirlhf", "chat", *args], env)
        self.text = ""  # everything read so far, escape sequences removed
        self.seen = 0  # how much of it expect() has consumed

    def read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if ready:
            try:
                data = os.read(self.fd, 4096)
            except OSError:  # the child closed the terminal
                data = b""
            self.text += ANSI.sub("", data.decode("utf-8", errors="replace"))

    def expect(self, pattern: str, timeout: float = 60.0) -> re.Match:
        """Wait for `pattern` in the output after what earlier calls consumed."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.compile(pattern).search(self.text, self.seen)
            if match:
                self.seen = match.end()
                return match
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in the chat output:\n{self.text[-2000:]}")
            self.read(0.2)

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\r")

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read(0.1)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"the chat did not exit:\n{self.text[-2000:]}")

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


@pytest.fixture
def terminal():
    opened = []
    yield lambda *args: opened.append(Terminal(*args)) or opened[-1]
    for t in opened:
        t.close()


STATS = r"\[prefilled (\d+) tokens, reused (\d+) from the cache, generated (\d+)"


def test_chat_in_a_terminal_streams_answers_and_obeys_commands(tiny, terminal):
    term = terminal("--model", str(tiny["chatty"]), "--temperature", "1", "--top-p", "1", "--max-new-tokens", "200",
                    "--stats")
    term.expect(r"minirlhf chat: .*1024-token context")
    term.expect(">>> ")
    term.type("Review the kettle.")
    answer = term.expect(r"Review the kettle\.\r?\n(.+?)\r?\n")  # the echo, then the answer's text
    assert answer.group(1).strip()
    first = term.expect(STATS)
    term.expect(">>> ")
    term.type("And the hotel?")
    second = term.expect(STATS)
    assert int(second.group(2)) >= int(first.group(1))  # the whole first prompt came from the cache
    term.expect(">>> ")
    term.type("/system Be brief.")
    term.expect(r"\(system prompt set\)")
    term.type("Review the lamp.")
    third = term.expect(STATS)
    assert int(third.group(2)) <= 1  # the system turn changed the start: the cache was rewound
    term.expect(">>> ")
    term.type("/reset")
    term.expect(r"\(conversation cleared\)")
    term.type("Review the sofa.")
    fourth = term.expect(STATS)
    assert int(fourth.group(1)) + int(fourth.group(2)) < int(third.group(1)) + int(third.group(2))
    term.expect(">>> ")
    term.type("/exit")
    assert term.wait() == 0


def test_ctrl_c_stops_an_answer_not_the_chat(tiny, terminal):
    term = terminal("--model", str(tiny["endless"]), "--temperature", "1", "--top-p", "1", "--max-new-tokens",
                    "100000", "--context", "8192")
    term.expect(">>> ")
    term.type("Write forever.")
    term.expect(r"Write forever\.\r?\n.{40}", timeout=120)  # the answer is streaming
    os.write(term.fd, b"\x03")  # Ctrl-C: the terminal sends SIGINT to the chat
    term.expect(r"\(stopped\)", timeout=120)
    term.expect(">>> ")
    # at the prompt, a hint instead of an exit. A SIGINT that lands between readline printing the prompt
    # and its select() waits for the next key (CPython's readline), so press again until the hint shows
    for _ in range(30):
        os.write(term.fd, b"\x03")
        try:
            term.expect(r"\(type /exit to quit\)", timeout=2)
            break
        except AssertionError:
            continue
    else:
        raise AssertionError(f"Ctrl-C at the prompt gave no hint:\n{term.text[-2000:]}")
    term.expect(">>> ")
    term.type("/exit")
    assert term.wait() == 0
