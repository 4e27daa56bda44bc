"""Fixtures the whole suite shares; the artefacts themselves are built by tests/tiny.py.

The suite is a package (tests/__init__.py): test modules import their helpers as `tests.tiny`, and the
layout mirrors minirlhf/ (tests/stages, tests/losses, tests/commands, tests/kernels).
"""

from __future__ import annotations

import signal

import pytest
import torch

from minirlhf.tokenizer import Tokenizer
from tests.tiny import tiny_tokenizer


def pytest_configure(config: pytest.Config) -> None:
    # The test machines run several test processes on 2 shared cores: torch's intra-op thread pool then
    # spends far more time spinning than computing on the tiny matrices of these tests (measured: 2 s vs
    # 0.01 s for one forward/backward of the tiny model), so the suite computes on one thread.
    torch.set_num_threads(1)
    # A shell that starts a job in the background without job control (nohup, `cmd &` in a script) hands it
    # SIGINT ignored, and every process it starts inherits that; the Ctrl-C tests (trainer, chat) would then
    # test nothing. Python's own handler is what a terminal gives; children get the default disposition back.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """The tiny SentencePiece tokenizer of tests/tiny.py (300 pieces, the chatml template), trained once for
    the whole run: training is deterministic, so every module that used to train its own gets the same one."""
    return tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok"))
