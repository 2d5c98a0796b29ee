#!/usr/bin/env bash
# Runs the whole benchmark suite on a GPU machine, in one command:
#
#   bash benchmarks/gpu.sh                 # the default stages below, one after the other
#   bash benchmarks/gpu.sh 1b:finetune mfu # only these stages
#   bash benchmarks/gpu.sh qmatmul@90 mfu@240   # each stage stopped after so many seconds
#
# Stages (each a separate process, so that each starts with the GPU's memory free):
#   qmatmul (benchmarks/qmatmul.py: the 4-bit matmul vs bf16, M in {1,16,128,4096},
#           K=N=4096, checked against a float32 reference first)
#   1b:finetune  1b:peers,quantized,merge  3b:finetune  3b:peers,quantized,merge  mfu
#   multi    (benchmarks/multi_adapter.py: 16/64 adapters per batch vs one, hidden 2048)
#   variants (benchmarks/variants.py: DoRA and PiSSA steps vs LoRA, size 1b)
#   seqscale (benchmarks/seqscale.py: tokens/s and compiled peak, 8B shapes, 1k-32k tokens,
#            remat none / block / dots_with_no_batch_dims_saveable, layers under nn.scan)
#   load     (benchmarks/load.py: a 1B-shaped checkpoint written to local disk and loaded onto
#            the GPU, dense and NF4, 3 loads each; then benchmarks/first_step.py on it, all
#            linear layers: load, lj.init, first step)
# seqscale and load are not in the default list: with it they do not fit one 15-minute loan.
# The default list fits one lent machine's 15 minutes (start-up about 2 min included): each
# stage is stopped at its limit, so the whole run takes at most 780 s after start-up:
#   qmatmul@60 1b:finetune,quantized@240 mfu@300 multi@60 variants@120
# `SIZE:CASES` runs `python -m benchmarks.run --size SIZE --cases CASES`; `mfu` runs the MFU
# case on Llama-3-8B shapes at 4096 tokens (and PEFT at the same config). Every stage adds its
# results to runs/benchmarks/<machine>.json and .md (earlier stages' results are kept) and
# redraws the plots in runs/benchmarks/img/ (BENCH_DIR and BENCH_PLOTS change them; committing
# results to benchmarks/results/ and docs/img/ is a separate, explicit copy). With $OUT set (the lent machines), the results and plots are
# copied there after each stage (`python -m benchmarks.report FILE.json --plots DIR`
# redraws tables and plots from a results file anywhere). Extra arguments for every stage: BENCH_ARGS="--runs 20".
# `STAGE@SECONDS` stops a stage after SECONDS (the cases it finished are kept in the results):
# for a machine lent for a fixed time. Seen on one H200 (JAX 0.11.2, 2026-11-25): qmatmul 67 s;
# mfu 205 s (PEFT 24 s, base init 70 s, lj.init + compile 104 s); 1b:finetune 186 s (70 s of it
# set-up), then quantized 61 s in the same process; peers at 1B did not finish in 37 s.
# Attention: the bf16 models are built with LlamaConfig(attention="cudnn") (cuDNN's fused
# flash kernel, as PyTorch's SDPA); BENCH_ARGS="--attention xla" runs XLA's unfused attention
# instead (at 8B and 4096 tokens its scores do not fit in the GPU's memory).
#
# Needs JAX with CUDA, Flax, optax, orbax, safetensors; the peers need qwix and liger-kernel
# (pip install, or wheels in .whl/, installed here with --no-deps) and torch + transformers +
# peft (Liger: and Triton).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # lora_jax from this checkout, installed or not

if compgen -G ".whl/*.whl" >/dev/null; then  # peers carried as wheels (qwix, liger-kernel)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/bench-site .whl/*.whl \
    && export PYTHONPATH=/tmp/bench-site${PYTHONPATH:+:$PYTHONPATH}
fi
# JAX takes GPU memory as it needs it (not 75% up front), so that PEFT's child process has room.
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

stages=("$@")
if [ ${#stages[@]} -eq 0 ]; then
  stages=(qmatmul@60 1b:finetune,quantized@240 mfu@300 multi@60 variants@120)
fi
"$PY" -c "import jax; print('JAX', jax.__version__, jax.devices())" || exit 1
"$PY" - <<'VERSIONS'
import importlib
found = []
for name in ("jaxlib", "flax", "optax", "orbax.checkpoint", "qwix", "torch", "transformers", "peft", "triton"):
    try:
        found.append(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as e:  # noqa: BLE001
        found.append(f"{name} missing ({type(e).__name__})")
print("; ".join(found))
VERSIONS
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true

DIR=${BENCH_DIR:-runs/benchmarks}
PLOTS=${BENCH_PLOTS:-$DIR/img}
mkdir -p "$DIR" "$PLOTS"
status=0
for stage in "${stages[@]}"; do
  limit=0  # seconds; 0: no limit
  if [[ $stage == *@* ]]; then limit=${stage##*@}; stage=${stage%@*}; fi
  echo "=== stage $stage ($(date -u +%H:%M:%S)$([ "$limit" != 0 ] && echo ", at most ${limit} s"))"
  run=(timeout --signal=TERM --kill-after=10 "$limit")
  if [ "$stage" = qmatmul ]; then  # the 4-bit matmul alone: XLA's path vs bf16
    "${run[@]}" "$PY" -m benchmarks.qmatmul --json "$DIR/gpu-qmatmul.json" || status=1
    [ -n "${OUT:-}" ] && cp "$DIR/gpu-qmatmul.json" "$OUT/" 2>/dev/null
    continue
  elif [ "$stage" = multi ] || [ "$stage" = variants ]; then  # standalone scripts
    if [ "$stage" = multi ]; then
      "${run[@]}" "$PY" -m benchmarks.multi_adapter --hidden 2048 --seq 128 --out "$DIR" || status=1
    else
      "${run[@]}" "$PY" -m benchmarks.variants --size 1b --runs 10 --out "$DIR" || status=1
    fi
    [ -n "${OUT:-}" ] && cp "$DIR"/multi_adapter-*.json "$DIR"/variants-*.json "$OUT/" 2>/dev/null
    continue
  elif [ "$stage" = seqscale ]; then
    "${run[@]}" "$PY" -m benchmarks.seqscale --out "$DIR" --plot "$PLOTS/gpu-8b-seqscale.png" \
      || status=1
    [ -n "${OUT:-}" ] && cp "$DIR"/seqscale-*.json "$PLOTS/gpu-8b-seqscale.png" "$OUT/" 2>/dev/null
    continue
  elif [ "$stage" = load ]; then  # one time limit for both scripts
    ckpt=${TMPDIR:-/tmp}/lora_jax-load-1b
    "${run[@]}" bash -c "'$PY' -m benchmarks.load --dir '$ckpt' --keep --repeats 3 --out '$DIR' \
      && '$PY' -m benchmarks.first_step --path '$ckpt' --targets \
         q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --out '$DIR'" || status=1
    rm -rf "$ckpt"
    [ -n "${OUT:-}" ] && cp "$DIR"/load.json "$DIR"/load.md "$DIR"/first_step.json "$OUT/" 2>/dev/null
    continue
  elif [ "$stage" = mfu ]; then
    args=(--cases mfu --mfu-size 8b)
  else
    args=(--size "${stage%%:*}" --cases "${stage#*:}")
  fi
  # shellcheck disable=SC2086
  "${run[@]}" "$PY" -m benchmarks.run "${args[@]}" --out "$DIR" --plots "$PLOTS" ${BENCH_ARGS:-} || status=1
  if [ -n "${OUT:-}" ]; then  # the JSON, its tables, and the plots in one archive
    cp "$DIR"/gpu-*.json "$DIR"/gpu-*.md "$OUT/" 2>/dev/null
    tar czf "$OUT/gpu-plots.tgz" -C "$PLOTS" . 2>/dev/null
  fi
done
exit $status
