#!/usr/bin/env bash
# Runs the whole benchmark suite on a GPU machine, in one command:
#
#   bash benchmarks/gpu.sh                 # every stage below, one after the other
#   bash benchmarks/gpu.sh 1b:finetune mfu # only these stages
#
# Stages (each a separate process, so that each starts with the GPU's memory free):
#   qmatmul (benchmarks/qmatmul.py: the 4-bit matmul, M in {1,16,128,4096}, K=N=4096)
#   1b:finetune  1b:peers,quantized,merge  3b:finetune  3b:peers,quantized,merge  mfu
# `SIZE:CASES` runs `python -m benchmarks.run --size SIZE --cases CASES`; `mfu` runs the MFU
# case on Llama-3-8B shapes at 4096 tokens (and PEFT at the same config). Every stage adds its
# results to benchmarks/results/<machine>.json and .md (earlier stages' results are kept) and
# redraws the plots in docs/img/. With $OUT set (the lent machines), the results and plots are
# copied there after each stage (`python -m benchmarks.report FILE.json --plots docs/img`
# redraws tables and plots from a results file anywhere). Extra arguments for every stage: BENCH_ARGS="--runs 20".
# Attention: the bf16 models are built with LlamaConfig(attention="cudnn") (cuDNN's fused
# flash kernel, as PyTorch's SDPA); BENCH_ARGS="--attention xla" runs XLA's unfused attention
# instead (at 8B and 4096 tokens its scores do not fit in the GPU's memory).
#
# Needs JAX with CUDA, Flax, optax, orbax, safetensors; the peers need qwix (pip install
# qwix, or wheels in .whl/, installed here with --no-deps) and torch + transformers + peft.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import qwix" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/bench-site .whl/*.whl \
    && export PYTHONPATH=/tmp/bench-site${PYTHONPATH:+:$PYTHONPATH}
fi
# JAX takes GPU memory as it needs it (not 75% up front), so that PEFT's child process has room.
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

stages=("$@")
if [ ${#stages[@]} -eq 0 ]; then
  stages=(qmatmul 1b:finetune 1b:peers,quantized,merge 3b:finetune 3b:peers,quantized,merge mfu)
fi
"$PY" -c "import jax; print('JAX', jax.__version__, jax.devices())" || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true

status=0
for stage in "${stages[@]}"; do
  echo "=== stage $stage ($(date -u +%H:%M:%S))"
  if [ "$stage" = qmatmul ]; then  # the 4-bit matmul alone: Pallas kernel vs XLA vs bf16
    "$PY" benchmarks/qmatmul.py --json benchmarks/results/gpu-qmatmul.json || status=1
    [ -n "${OUT:-}" ] && cp benchmarks/results/gpu-qmatmul.json "$OUT/"
    continue
  elif [ "$stage" = mfu ]; then
    args=(--cases mfu --mfu-size 8b)
  else
    args=(--size "${stage%%:*}" --cases "${stage#*:}")
  fi
  # shellcheck disable=SC2086
  "$PY" -m benchmarks.run "${args[@]}" --plots "${BENCH_PLOTS:-docs/img}" ${BENCH_ARGS:-} || status=1
  if [ -n "${OUT:-}" ]; then  # the JSON, its tables, and the plots in one archive
    cp benchmarks/results/gpu-*.json benchmarks/results/gpu-*.md "$OUT/" 2>/dev/null
    tar czf "$OUT/gpu-plots.tgz" docs/img/gpu-*.png 2>/dev/null
  fi
done
exit $status
