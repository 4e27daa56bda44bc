"""minirlhf chat --model DIR [--adapter DIR] [--system TEXT] [--temperature T] [--top-p P] [--max-new-tokens N]

Talk to a model in the terminal. Each message goes through the model's chat template (a model without one
gets the built-in 'plain' template, and says so) and the answer is printed token by token as it is
generated. The conversation's keys and values stay in the model's KV cache between turns: each turn the
whole conversation is rendered again and only the part that differs from what is cached is run through
the model (usually just the new message); when a template rewrites earlier turns, the cache is rewound to
where the texts diverge. When the conversation outgrows the context (--context, at most the model's
positions), the oldest exchanges are dropped, with a note.

In the chat:
    /reset          forget the conversation (the system prompt stays)
    /system TEXT    set the system prompt (`/system` alone removes it); the conversation is kept
    /exit           quit (so does Ctrl-D)
    Ctrl-C          stop the answer being generated; the conversation keeps what was said so far
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from minirlhf.commands import CommandError
from minirlhf.commands.loading import add_model_arguments
from minirlhf.commands.sampling import Sampling, add_sampling_arguments, sampling_from_args

if TYPE_CHECKING:
    import torch

    from minirlhf.model import Transformer
    from minirlhf.tokenizer import Tokenizer

HELP = "talk to a model in the terminal: streamed answers, KV cache kept across turns, /reset /system /exit"
DEFAULTS = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=512)
PROMPT = ">>> "
DEFAULT_CONTEXT = 8192  # cache slots allocated when the model allows more (--context raises it)
PREFILL_CHUNK = 512  # tokens run through the model at once when re-encoding a long conversation


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--system", metavar="TEXT", help="system prompt (change it in the chat with /system TEXT)")
    add_sampling_arguments(p, DEFAULTS)
    p.add_argument("--context", type=int, metavar="N",
                   help=f"tokens of conversation kept (the KV cache size; default: the model's maximum positions, "
                        f"at most {DEFAULT_CONTEXT})")
    p.add_argument("--stats", action="store_true",
                   help="after each answer, print how many tokens were run through the model (prefilled), reused "
                        "from the cache and generated, and the speed")


class ChatError(CommandError):
    """A message the chat cannot answer (too long for the context, refused by the template)."""


class TextStream:
    """The text of a growing list of token ids, released piece by piece as tokens arrive.

    Each new token is decoded together with the tokens just before it (byte-level BPE and SentencePiece
    byte pieces only make sense together), and a piece ending in U+FFFD, a multi-byte character cut in
    the middle, is held back until the bytes that complete it arrive.
    """

    def __init__(self, tok: "Tokenizer"):
        self.tok = tok
        self.ids: list[int] = []
        self.text = ""  # what has been released
        self._prefix = self._read = 0  # ids[prefix:read] is the context decoded before the new tokens

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add one token; the new text it completes ('' while a character is incomplete)."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix: self._read])
        now = self._decode(self.ids[self._prefix:])
        if now.endswith("\ufffd"):
            return ""
        if now.startswith(before):
            new = now[len(before):]
        else:  # a decoder that rewrites the context: diff against everything released
            full = self._decode(self.ids)
            new = full[len(self.text):] if full.startswith(self.text) else ""
        self._prefix, self._read = self._read, len(self.ids)
        self.text += new
        return new

    def flush(self) -> str:
        """Whatever is still held back (a character the answer never completed)."""
        full = self._decode(self.ids)
        new = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += new
        return new


@dataclass
class TurnStats:
    """How one answer came about. finish: stop | length (--max-new-tokens) | context (the cache is full)
    | interrupted (Ctrl-C)."""

    prefilled: int
    reused: int
    generated: int
    seconds: float
    finish: str
    dropped: int = 0  # messages dropped from the start of the conversation to make room


class ChatSession:
    """A conversation whose tokens live in the model's KV cache (batch 1, `capacity` slots).

    cached[i] is the token whose keys and values fill cache slot i; a slot past len(cached) may hold stale
    values, which the causal mask hides until they are overwritten.
    """

    def __init__(self, model: "Transformer", tok: "Tokenizer", sampling: Sampling, capacity: int,
                 system: str | None = None):
        import torch

        self.model, self.tok, self.sampling, self.capacity = model, tok, sampling, capacity
        self.system = system or None
        self.messages: list[dict[str, str]] = []
        self.cached: list[int] = []
        self.device = model.embed_tokens.weight.device
        self.generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        self.key_is_real = torch.ones(1, capacity, dtype=torch.bool, device=self.device)
        model.setup_kv_cache(1, capacity)

    def close(self) -> None:
        self.model.clear_kv_cache()

    # -- the conversation ----------------------------------------------------------------------

    def conversation(self, messages: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
        """The system turn (when set) and the messages (default: the whole conversation so far)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + (self.messages if messages is None else messages)

    def reset(self) -> None:
        self.messages = []

    def render_ids(self, messages: list[dict[str, str]] | None = None) -> list[int]:
        """The conversation (or `messages` after the system prompt) through the chat template, ready for the
        assistant's next turn."""
        import jinja2

        try:
            text = self.tok.render_chat(self.conversation(messages), add_generation_prompt=True)
        except jinja2.TemplateError as e:
            raise ChatError(f"the chat template refuses this conversation: {e}") from None
        return self.tok.encode(text)

    def fit_context(self) -> tuple[list[int], int]:
        """The prompt ids, after dropping the oldest exchanges until the prompt leaves room for an answer
        (--max-new-tokens, at most half the context). Returns (ids, messages dropped). A last message
        that cannot fit even alone is refused before anything is dropped."""
        room = min(self.sampling.max_new_tokens, self.capacity // 2)
        ids, dropped = self.render_ids(), 0
        if len(ids) + room > self.capacity:
            alone = len(self.render_ids(self.messages[-1:]))
            if alone >= self.capacity:
                raise ChatError(f"this message makes a prompt of {alone} tokens; the context holds "
                                f"{self.capacity} (--context)")
        while len(ids) + room > self.capacity and len(self.messages) > 1:
            del self.messages[0]
            dropped += 1
            while len(self.messages) > 1 and self.messages[0]["role"] != "user":  # start on a user turn
                del self.messages[0]
                dropped += 1
            ids = self.render_ids()
        return ids, dropped

    # -- the model -----------------------------------------------------------------------------

    def prefill(self, ids: list[int]) -> tuple["torch.Tensor", int]:
        """Bring the cache to `ids`, running only the tokens past the longest prefix already cached.
        Returns (logits [V] of the next token, number of tokens reused)."""
        import torch

        if len(ids) > self.capacity:
            raise ChatError(f"a prompt of {len(ids)} tokens does not fit the {self.capacity}-token context")
        reused = 0
        for a, b in zip(self.cached, ids):
            if a != b:
                break
            reused += 1
        reused = min(reused, len(ids) - 1)  # the last token runs again for its logits
        del self.cached[reused:]
        hidden = None
        for start in range(reused, len(ids), PREFILL_CHUNK):
            chunk = ids[start: start + PREFILL_CHUNK]
            tokens = torch.tensor([chunk], device=self.device)
            positions = torch.arange(start, start + len(chunk), device=self.device)[None]
            hidden = self.model.decode_step(tokens, positions, positions[0], self._mask(start, len(chunk)))
            self.cached.extend(chunk)
        return self.model.lm_head(hidden[:, -1])[0], reused

    def _mask(self, start: int, t: int) -> "torch.Tensor":
        """The attention mask of t tokens written at cache slots start.. (generation.cache_mask), over the
        slots written so far only (the attention reads as many cache slots as the mask covers)."""
        from minirlhf.generation import cache_mask

        return cache_mask(self.key_is_real[:, : start + t], start, t, self.model.embed_tokens.weight.dtype)

    def step(self, token: int) -> "torch.Tensor":
        """Run one generated token at the next cache slot; logits [V] of the one after it."""
        import torch

        pos = len(self.cached)
        hidden = self.model.decode_step(torch.tensor([[token]], device=self.device),
                                        torch.tensor([[pos]], device=self.device),
                                        torch.tensor([pos], device=self.device), self._mask(pos, 1))
        self.cached.append(token)
        return self.model.lm_head(hidden[:, -1])[0]

    def reply(self, text: str, emit: Callable[[str], None]) -> TurnStats:
        """Answer a user message, streaming the answer through emit. Ctrl-C ends the answer early (what was
        said stays in the conversation); interrupted before the first token, the message is dropped."""
        from minirlhf.generation import sample_next

        self.messages.append({"role": "user", "content": text})
        started = time.perf_counter()
        stream, generated, finish, reused, prefilled, dropped = TextStream(self.tok), [], "interrupted", 0, 0, 0
        s = self.sampling
        try:
            ids, dropped = self.fit_context()
            logits, reused = self.prefill(ids)
            prefilled = len(ids) - reused
            budget = min(s.max_new_tokens, self.capacity - len(ids))
            kwargs = s.generate_kwargs()
            for n in range(budget):
                token = int(sample_next(logits[None], kwargs["temperature"], kwargs["top_k"], kwargs["top_p"],
                                        self.generator)[0][0])
                generated.append(token)
                if token in self.tok.stop_ids:
                    finish = "stop"
                    break
                emit(stream.push(token))
                if n == budget - 1:
                    finish = "length" if budget == s.max_new_tokens else "context"
                    break
                logits = self.step(token)
        except KeyboardInterrupt:
            finish = "interrupted"
        except ChatError:
            self.messages.pop()
            raise
        emit(stream.flush())
        if not generated:
            self.messages.pop()
        else:
            self.messages.append({"role": "assistant", "content": stream.text})
        return TurnStats(prefilled, reused, len(generated), time.perf_counter() - started, finish, dropped)


# --------------------------------------------------------------------------------------------------
# the terminal


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def describe_turn(stats: TurnStats, capacity: int, verbose: bool) -> list[str]:
    """The notes printed after an answer."""
    notes = []
    if stats.dropped:
        notes.append(f"(the conversation outgrew the {capacity}-token context: dropped its {stats.dropped} oldest "
                     f"messages)")
    if stats.finish == "interrupted":
        notes.append("(stopped)" if stats.generated else "(stopped before the answer began; message dropped)")
    elif stats.finish == "length":
        notes.append("(cut at --max-new-tokens)")
    elif stats.finish == "context":
        notes.append(f"(the answer filled the {capacity}-token context; the oldest messages will be dropped next "
                     f"turn)")
    if verbose:
        speed = stats.generated / max(stats.seconds, 1e-9)
        notes.append(f"[prefilled {stats.prefilled} tokens, reused {stats.reused} from the cache, generated "
                     f"{stats.generated} in {stats.seconds:.2f} s ({speed:.1f} tokens/s)]")
    return notes


def handle_command(session: ChatSession, line: str) -> bool:
    """A /command; False when the chat should end."""
    name, _, rest = line.strip().partition(" ")
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        session.reset()
        print("(conversation cleared)")
    elif name == "/system":
        session.system = rest.strip() or None
        print("(system prompt set)" if session.system else "(system prompt removed)")
    elif name == "/help":
        print(__doc__[__doc__.index("In the chat:"):].rstrip())
    else:
        print(f"(unknown command {name}; try /help)")
    return True


def chat_loop(session: ChatSession, verbose: bool = False, read: Callable[[str], str] = input) -> None:
    """Read messages until /exit or end of input; answer each."""
    while True:
        try:
            line = read(PROMPT)
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print("\n(type /exit to quit)")
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            if not handle_command(session, line):
                return
            continue
        try:
            stats = session.reply(line, _write)
        except ChatError as e:
            print(f"({e})")
            continue
        except KeyboardInterrupt:  # between the answer's end and here
            print()
            continue
        print()
        for note in describe_turn(stats, session.capacity, verbose):
            print(note)


def run(args: argparse.Namespace) -> int:
    from minirlhf.commands.loading import (
        load_chat_tokenizer,
        load_policy,
        resolve_device,
        resolve_dtype,
        resolve_model_paths,
    )

    sampling = sampling_from_args(args)
    paths = resolve_model_paths(args.model, args.adapter)
    tok = load_chat_tokenizer(paths.tokenizer, args.template)
    model = load_policy(paths, merge=args.merge, dtype=resolve_dtype(args.dtype), device=resolve_device(args.device),
                        tok=tok)
    limit = model.config.max_position_embeddings
    if args.context is not None and not 2 <= args.context <= limit:
        raise CommandError(f"--context must be in [2, {limit}] (the model's positions), got {args.context}")
    capacity = args.context or min(limit, DEFAULT_CONTEXT)
    try:
        import readline  # noqa: F401 (line editing and history for input())
    except ImportError:
        pass
    session = ChatSession(model, tok, sampling, capacity, system=args.system)
    adapter = " (unmerged)" if paths.adapter and not args.merge else ""
    print(f"minirlhf chat: {paths.describe()}{adapter}, {model.config.model_type}, "
          f"{model.num_parameters() / 1e6:.1f}M parameters, {capacity}-token context. /help for commands, "
          f"/exit to quit.")
    try:
        chat_loop(session, verbose=args.stats)
    finally:
        session.close()
    return 0
