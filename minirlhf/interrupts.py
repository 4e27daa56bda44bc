"""Ctrl-C held back while the weights are being updated, so a checkpoint's weights, step, data position and
RNG state always belong to the same step boundary (trainer.py)."""

from __future__ import annotations

import signal
import threading


class DeferredInterrupt:
    """Holds Ctrl-C (SIGINT) back from `hold()` to `release()`, which then raises the KeyboardInterrupt.

    The trainer holds it from the moment it starts updating the weights until the step counter, data
    position and RNG state after the step are recorded, so that an interrupt never leaves weights of one
    step with the position of another. A second Ctrl-C while held interrupts at once and marks the state
    `torn` (the trainer then writes no checkpoint). Only the main thread can take signals, and only
    Python's default SIGINT handler (Ctrl-C raises KeyboardInterrupt) is replaced; otherwise (SIGINT
    ignored, as in a background job, or handled by the application) holding does nothing.
    """

    def __init__(self):
        self.enabled = False  # the trainer's loop enables it; a stage stepped by hand is left alone
        self.pending = False
        self.torn = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.pending:
            self.torn = True
            raise KeyboardInterrupt
        self.pending = True

    def hold(self) -> None:
        if not self.enabled or self._previous is not None or threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGINT)
        if previous is not signal.default_int_handler:  # SIGINT ignored, or someone else's handler: theirs
            return
        self._previous = previous
        signal.signal(signal.SIGINT, self._handler)

    def release(self, raise_pending: bool = True) -> None:
        if self._previous is None:
            return
        signal.signal(signal.SIGINT, self._previous)
        self._previous = None
        pending, self.pending = self.pending, False
        if pending and raise_pending:
            raise KeyboardInterrupt
