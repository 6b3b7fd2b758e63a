"""Counting XLA compiles: every jitted program should compile once per shape bucket, so a run counts
its compiles (and their seconds) and a test or benchmark can tell when a step compiled again."""

from __future__ import annotations

import threading

import jax

# What jax reports once per program it hands to XLA (a cache hit reports nothing).
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """The compiles of this process (every thread) while active: `with CompileCounter() as c: ...`,
    then `c.count`, `c.seconds` and `c.programs` (their names, in order)."""

    def __init__(self):
        self.count, self.seconds, self.programs = 0, 0.0, []
        self._lock = threading.Lock()

    def _on_event(self, event: str, duration: float, **fields) -> None:
        if event == BACKEND_COMPILE_EVENT:
            with self._lock:
                self.count += 1
                self.seconds += duration
                self.programs.append(fields.get("fun_name", "?"))

    def __enter__(self) -> CompileCounter:
        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_event)
