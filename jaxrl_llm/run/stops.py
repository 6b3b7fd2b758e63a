"""Stopping a run cleanly: Ctrl-C and SIGTERM (what SLURM, Kubernetes and TPU preemption send) end
the step in progress, then the loop saves it and exits."""

from __future__ import annotations

import signal
import threading


class StopRequests:
    """Within its `with`, Ctrl-C and SIGTERM ask the loop to stop after the current step (so the
    state it saves is whole) instead of raising inside it; a second Ctrl-C stops at once."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def _request(self, signum, frame):
        self.signal = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(f"\nstopping after this step ({'SIGTERM' if signum == signal.SIGTERM else 'Ctrl-C'}); "
              "Ctrl-C again to quit at once", flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._request) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False
