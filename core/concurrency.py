"""Locks for model calls in a process that serves several sessions from threads (the app).

Two rules:
- one call at a time per model (``model_lock``): Grad-CAM registers hooks on the shared module, so two threads
  explaining with one model would read each other's activations;
- no model call anywhere in the process while a model is being traced for int8 (``fx_tracing``): torch.fx's
  tracer patches ``torch.nn.Module.__call__`` for the whole process while it traces, so any other thread's
  forward pass meanwhile goes through the tracer and fails ("NameError: module is not installed as a
  submodule"; seen when a cardiac study was uploaded while the app's warm-up was building the int8 atrium model).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from torch import nn

_LOCKS: dict[int, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


class _CallsAndTracing:
    """Model calls run side by side; tracing waits until none runs and holds new ones back until it is done.
    A call never waits for a tracer that is only waiting (a thread inside one call may start another, on another
    model: holding it back would deadlock)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._calls = 0
        self._tracing = False
        self._mine = threading.local()  # calls this thread is inside

    @contextmanager
    def call(self) -> Iterator[None]:
        with self._cond:
            while self._tracing:
                self._cond.wait()
            self._calls += 1
        self._mine.n = getattr(self._mine, "n", 0) + 1
        try:
            yield
        finally:
            self._mine.n -= 1
            with self._cond:
                self._calls -= 1
                self._cond.notify_all()

    @contextmanager
    def tracing(self) -> Iterator[None]:
        if getattr(self._mine, "n", 0):
            raise RuntimeError("a model cannot be traced from inside a model call (it would wait for itself)")
        with self._cond:
            while self._tracing or self._calls:
                self._cond.wait()
            self._tracing = True
        try:
            yield
        finally:
            with self._cond:
                self._tracing = False
                self._cond.notify_all()


_STATE = _CallsAndTracing()


@contextmanager
def model_lock(model: nn.Module) -> Iterator[None]:
    """Hold around every call of a shared model: one call per model at a time, none while a tracer runs."""
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(id(model), threading.Lock())
    with _STATE.call(), lock:
        yield


@contextmanager
def fx_tracing() -> Iterator[None]:
    """Hold around torch.fx tracing or graph conversion: waits for the model calls running in other threads to end
    and keeps new ones waiting until it is done."""
    with _STATE.tracing():
        yield
