#!/usr/bin/env bash
# The GPU checks and benchmarks in one call, for a lent GPU machine that reaches no registry and
# cannot receive the 98 MB SmolLM2 GGUF (see ../.library/device/README.md).
#
#   bash benchmarks/gpu_check.sh prepare   # here: wheels the GPU image lacks + SmolLM2's tokenizer into .gpu/
#   bash benchmarks/gpu_check.sh run       # there (carry .gpu): a few GPU tests, then python -m benchmarks
#                                          # --gpu --random-weights (--attention cudnn where its test
#                                          # passed); logs and RESULTS.md go to $OUT
#   ONLY=multiturn,overlap,sweep bash benchmarks/gpu_check.sh run   # a subset (RESULTS.md then unchanged)
#
# All of them take longer than one 10-minute call (forward through LoRA's SFT step ran in 380 s on an
# H200 on 2026-12-04; the rest did not fit), so a session with a GPU picks up where RESULTS.md's GPU
# section says the last one stopped.
#
# The GPU image has jax, flax, optax, orbax, chex, transformers, torch, accelerate and pyarrow;
# it lacks gguf (imported by jaxrl_llm) and TRL with its datasets, dill and multiprocess.
# Random weights of SmolLM2-135M's architecture time the same as the real ones: every benchmark
# generates a fixed number of tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.gpu
WHEELS="gguf==0.19.0 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19"

prepare() {
  grep -qx "/$KIT/" .git/info/exclude 2>/dev/null || echo "/$KIT/" >> .git/info/exclude
  rm -rf "$KIT" && mkdir -p "$KIT/wheels"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$KIT/wheels" $WHEELS
  python3 -c "
from benchmarks.common import smollm2_gguf
from jaxrl_llm.tokenizer import load_tokenizer
load_tokenizer(smollm2_gguf()).save_pretrained('$KIT/tokenizer')"
  du -sh "$KIT"
  echo "now: run(command='bash benchmarks/gpu_check.sh run', carry=['$KIT'], timeout_s=590)"
}

run() {
  local out="${OUT:-/tmp/gpu_check}"
  mkdir -p "$out"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$KIT"/wheels/*.whl
  export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } | tee "$out/machine.txt"
  python3 -c "import jax, flax, optax, torch, transformers, pyarrow
print('python', __import__('sys').version.split()[0], '| jax', jax.__version__, jax.devices(), '| flax', flax.__version__,
      '| optax', optax.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| pyarrow', pyarrow.__version__)
import trl; print('trl', trl.__version__)" 2>&1 | tee -a "$out/machine.txt" || true
  # fp32 checks on the GPU: sampler log-probs equal a full forward pass, every step trains what it should.
  # Highest matmul precision: the tolerances are fp32's, not TF32's. First, in bf16: cuDNN flash
  # attention against the einsum attention; the benchmarks use it only where that passed.
  JAX_DEFAULT_MATMUL_PRECISION=highest timeout "${TEST_TIMEOUT:-170}" python3 -m pytest -q -rA -p no:cacheprovider \
    tests/test_model_options.py tests/test_sampling.py tests/test_core_logprobs.py > "$out/tests.log" 2>&1 || true
  grep -E "^(FAILED|ERROR)" "$out/tests.log" | tail -15 || true
  echo "GPU tests: $(grep -c '^PASSED' "$out/tests.log") passed, $(grep -c '^FAILED' "$out/tests.log") failed," \
    "$(grep -c '^ERROR' "$out/tests.log") errors" | tee -a "$out/machine.txt"
  local attention=xla
  if grep -q "PASSED.*matches_xla_on_gpu\[None\]" "$out/tests.log" && grep -q "PASSED.*matches_xla_on_gpu\[6\]" "$out/tests.log"; then
    attention=cudnn
  fi
  echo "our attention in the benchmarks: $attention" | tee -a "$out/machine.txt"
  timeout "${BENCH_TIMEOUT:-380}" python3 -m benchmarks --gpu --random-weights --tokenizer "$KIT/tokenizer" \
    --attention "$attention" --repeats "${REPEATS:-3}" ${ONLY:+--only "$ONLY"} 2>&1 | tee "$out/benchmarks.log" || true
  cp benchmarks/RESULTS.md "$out/RESULTS.md"
}

"${1:?usage: bash benchmarks/gpu_check.sh prepare|run}"
