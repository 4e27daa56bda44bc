"""Chat templates: render a conversation to text the way Hugging Face transformers does.

A template is Jinja source, from the model directory (transformers-5 `chat_template.jinja`, or the
`chat_template` key of tokenizer_config.json) or one of the built-ins below chosen by name. It is run
in a sandboxed Jinja environment set up like transformers' (`trim_blocks`, `lstrip_blocks`, the
`loopcontrols` extension, `raise_exception`, `strftime_now`, a `tojson` filter that does not escape
HTML), so a template renders to exactly the string `tokenizer.apply_chat_template(..., tokenize=False)`
gives. The `{% generation %}` tag some templates use to mark assistant text renders its body; our
assistant mask is found by rendering prefixes of the conversation instead (see minirlhf.tokenizer).
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import ClassVar

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


def builtin_template(name: str) -> str:
    """Jinja source of a built-in template: chatml, llama2, llama3, alpaca, vicuna or plain."""
    templates = {
        # ChatML (OpenAI; used by Qwen): <|im_start|>role\ncontent<|im_end|>\n
        "chatml": (
            "{% for message in messages %}"
            "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
        ),
        # Llama 3: headers in special tokens, each turn closed by <|eot_id|>
        "llama3": (
            "{{ bos_token }}"
            "{% for message in messages %}"
            "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
            " + '<|eot_id|>' }}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
        ),
        # Llama 2 chat: <s>[INST] <<SYS>>\nsys\n<</SYS>>\n\nuser [/INST] answer </s>
        "llama2": (
            "{% if messages[0]['role'] == 'system' %}"
            "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
            "{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
            "{% for message in turns %}"
            "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('llama2 template: after an optional system message, roles must alternate "
            "user/assistant/user/...') }}"
            "{% endif %}"
            "{% if message['role'] == 'user' %}"
            "{% if loop.first and system %}"
            "{{ bos_token + '[INST] <<SYS>>\n' + system + '\n<</SYS>>\n\n' + message['content'] | trim + ' [/INST]' }}"
            "{% else %}{{ bos_token + '[INST] ' + message['content'] | trim + ' [/INST]' }}{% endif %}"
            "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
            "{% endfor %}"
        ),
        # Alpaca (Taori et al. 2023): instruction/response sections
        "alpaca": (
            "{% for message in messages %}"
            "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
            "{% elif message['role'] == 'user' %}"
            "{{ '### Instruction:\n' + message['content'] + '\n\n### Response:\n' }}"
            "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + '\n\n' }}"
            "{% else %}{{ raise_exception('alpaca template: unknown role ' + message['role']) }}{% endif %}"
            "{% endfor %}"
        ),
        # Vicuna v1.1: "SYSTEM USER: ... ASSISTANT: ...</s>"
        "vicuna": (
            "{% for message in messages %}"
            "{% if message['role'] == 'system' %}{{ message['content'] + ' ' }}"
            "{% elif message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
            "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}"
            "{% else %}{{ raise_exception('vicuna template: unknown role ' + message['role']) }}{% endif %}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
        ),
        # Plain: prompts end with a newline, replies end with eos
        "plain": (
            "{% for message in messages %}"
            "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
            "{% else %}{{ message['content'] + '\n' }}{% endif %}"
            "{% endfor %}"
        ),
    }
    if name not in templates:
        raise ValueError(f"unknown built-in chat template {name!r}; choose one of {sorted(templates)}")
    return templates[name]


def builtin_special_tokens(name: str) -> list[str]:
    """Tokens a built-in template writes that must be single vocabulary entries (besides bos/eos)."""
    tokens = {
        "chatml": ["<|im_start|>", "<|im_end|>"],
        "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "llama2": [], "alpaca": [], "vicuna": [], "plain": [],
    }
    if name not in tokens:
        raise ValueError(f"unknown built-in chat template {name!r}; choose one of {sorted(tokens)}")
    return tokens[name]


def is_builtin(name: str) -> bool:
    return name in ("chatml", "llama2", "llama3", "alpaca", "vicuna", "plain")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-span marker): renders its body."""
    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_template(source: str) -> jinja2.Template:
    """Compile Jinja chat-template source in a fresh sandboxed environment (templates from model
    directories are untrusted code)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render(template: jinja2.Template, messages: list[dict], add_generation_prompt: bool = False,
           special_tokens: dict[str, str | None] | None = None, **kwargs) -> str:
    """Render `messages` ([{"role": ..., "content": ...}, ...]). special_tokens supplies the
    bos_token/eos_token/pad_token/unk_token variables; extra kwargs (tools, documents, ...) are passed
    through to the template as transformers does."""
    variables = {"tools": None, "documents": None, **(special_tokens or {}), **kwargs}
    return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
