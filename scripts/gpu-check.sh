#!/usr/bin/env bash
# Every GPU check of the encoders in one command, for a lent GPU machine: the device
# checks (each encoder in bf16 against the same weights on the CPU in f32, on the tiny
# fixtures and at full size), `tensorbake bench encode` beside PyTorch, `tensorbake
# bench write` (the run's writers alone) and `tensorbake bench run` (the pipeline end
# to end), in under 8 minutes, ending with one
# table. Each step has its own time limit, so a step that hangs or fails costs its
# limit and the table still comes.
#
# Here (no GPU needed):
#   scripts/build-cuda.sh setup && FEATURES=cuda,cudnn scripts/build-cuda.sh build   # .gpu/tensorbake.xz + .gpu/wheels
#   (cudnn: the channels-last cuDNN convolution of nn::ops::cudnn_conv; candle's own
#   cuDNN convolution, NCHW, measured 27 TFLOP/s bf16 on the H200 against 15 without)
# On the GPU machine (the device tool), from a clean working tree:
#   command: bash scripts/gpu-check.sh      carry: [".gpu"]      timeout_s: 540
# The steps' limits add up to 480 s (8 minutes in the worst case).
# A dry run of the whole flow on this machine's CPU, tiny models:
#   GPU_CHECK_BIN=target/debug/tensorbake GPU_CHECK_DEVICE=cpu GPU_CHECK_DTYPE=f32 \
#     GPU_CHECK_PRESET=tiny GPU_CHECK_RUN_ARGS='--shards 2 --images-per-shard 4 --short-side 200 --resolution 64' \
#     GPU_CHECK_WRITE_ARGS='--parts 2 --samples-per-part 8 --rounds 1' \
#     TENSORBAKE_PYTHON=.venv-test/bin/python bash scripts/gpu-check.sh
#
# Results: $OUT (the device tool's folder; else /tmp/gpu-check): summary.txt (every
# table, also on stdout), kernels.txt and a .json per step (8 files: the tool brings
# back 8 at most); each step's progress (.err) stays in $WORK.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
# the device tool brings back at most 8 files from $OUT: summary.txt, kernels.txt and a
# JSON per step go there; each step's table and progress stay in $WORK
WORK=${GPU_CHECK_WORK:-/tmp/gpu-check-work}
mkdir -p "$OUT" "$WORK"
DEVICE=${GPU_CHECK_DEVICE:-cuda:0}
DTYPE=${GPU_CHECK_DTYPE:-bf16}
PRESET=${GPU_CHECK_PRESET:-full}
export PYTHONUNBUFFERED=1

# the CUDA libraries the binary was linked against (PyTorch's copies on the GPU machine)
NV=$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null \
  || echo /opt/torch/.venv/lib/python3.12/site-packages/nvidia)
export LD_LIBRARY_PATH=$NV/cu13/lib:$NV/cudnn/lib:${LD_LIBRARY_PATH:-}

BIN=${GPU_CHECK_BIN:-}
if [ -z "$BIN" ]; then
  [ -f .gpu/tensorbake.xz ] || { echo "no .gpu/tensorbake.xz: run scripts/build-cuda.sh build here and carry .gpu" >&2; exit 2; }
  BIN=/tmp/tensorbake-gpu
  python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
    .gpu/tensorbake.xz "$BIN" && chmod +x "$BIN" || exit 2
fi
PY=${TENSORBAKE_PYTHON:-python3}
# diffusers is not on the GPU machine's image: its wheels travel in .gpu/wheels
if ! "$PY" -c 'import diffusers' 2>/dev/null && ls .gpu/wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export TENSORBAKE_PYTHON=$PY

{
  date -u +"gpu-check %Y-%m-%d %H:%M UTC"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1 | tail -1
} | tee "$OUT/summary.txt"

declare -a STEPS
# limited NAME LIMIT_S COMMAND...: COMMAND under a time limit, its table to
# $WORK/NAME.txt, its progress to $WORK/NAME.err, its outcome to STEPS
limited() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)" >&2
  timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.txt" 2>"$WORK/$name.err"
  local rc=$?
  local why=ok
  case $rc in 0) ;; 124|137) why="TIMED OUT" ;; *) why="FAILED rc=$rc" ;; esac
  STEPS+=("$name: $why ($((SECONDS - t0)) s)")
  [ "$why" = ok ] || tail -4 "$WORK/$name.err" >&2
}
# step NAME LIMIT_S ARGS...: one `tensorbake bench encode` run
step() {
  local name=$1 limit=$2
  shift 2
  limited "$name" "$limit" "$BIN" bench encode --device "$DEVICE" --dtype "$DTYPE" \
    --json "$OUT/$name.json" "$@"
}

# 0. the seam's kernels (GroupNorm, softmax, gated GELU, RMS norm, cuBLASLt linear, rounding) against
#    the CPU: the model crate's unit tests from the CUDA build
if [ -f .gpu/nn-tests.xz ] && [ "${DEVICE#cuda}" != "$DEVICE" ]; then
  t0=$SECONDS
  echo "== kernels (limit 40s)" >&2
  python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
    .gpu/nn-tests.xz /tmp/nn-tests && chmod +x /tmp/nn-tests
  timeout --kill-after=10 40 /tmp/nn-tests ops:: --test-threads 1 >"$OUT/kernels.txt" 2>&1
  rc=$?
  case $rc in 0) why=ok ;; 124|137) why="TIMED OUT" ;; *) why="FAILED rc=$rc" ;; esac
  STEPS+=("kernels: $why ($((SECONDS - t0)) s; $(grep -c '^test .* ok$' "$OUT/kernels.txt") tests ok)")
  [ "$why" = ok ] || grep -E "panicked|FAILED" "$OUT/kernels.txt" | head -8 >&2
fi
# 1. the tiny fixtures: device vs CPU f32, no timing to speak of, no peer
step tiny 30 --preset tiny --check --no-torch --warmup 1 --iters 1 --rounds 1 --batch 3
# 2. image encoders at full size, checked, beside PyTorch; torch.compile in its default
#    mode for every encoder (the bench's own default for the VAEs, max-autotune, takes
#    minutes on the VAE alone and would not fit the limit; COMPILE_MODE=max-autotune
#    with a longer limit gives the design reference's compiled VAE figure)
step image 110 --preset "$PRESET" --check --encoder sd_vae --encoder siglip --encoder clip_vision \
  --compile-mode "${COMPILE_MODE:-default}"
# 3. text encoders: T5-XXL at 120 tokens and CLIP text beside both peers
step text 100 --preset "$PRESET" --check --encoder t5@120 --encoder clip_text
# 4. ours only: the Flux VAE, T5 at Flux-dev's 512 tokens
step more 45 --preset "$PRESET" --check --encoder flux_vae --encoder t5@512 --no-torch
# 5. the choices side by side: the SD VAE with candle's own cuDNN convolution (NCHW,
#    heuristic algorithm) and SigLIP with candle's matmul and bias add, against the
#    image step's paths (ops::cudnn_conv: NHWC, algorithm found once per shape;
#    ops::bias_linear: the bias in cuBLASLt's epilogue; ops::flash: attention as one
#    kernel, here unfused: its softmax one kernel between two matmuls)
TENSORBAKE_CONV=candle TENSORBAKE_LINEAR=candle TENSORBAKE_ATTENTION=unfused step candle 40 --preset "$PRESET" \
  --encoder sd_vae --encoder siglip --no-torch

# 6. the writers alone at the run's mix (sd_vae + siglip + t5: 2.79 MB an image), the
#    batches on the GPU so that the copies back are in: MB/s, MB per CPU-second, the
#    cores 170 images/s takes (beside tensorstore where the machine has it); its JSON
#    stays in $WORK (the 8 files of $OUT are taken)
WRITE_PEER=(--no-tensorstore)
"$PY" -c 'import tensorstore, ml_dtypes' 2>/dev/null && WRITE_PEER=(--python "$PY")
# shellcheck disable=SC2086
limited write 25 "$BIN" bench write --device "$DEVICE" --writers 4 \
  ${GPU_CHECK_WRITE_ARGS:---parts 8 --samples-per-part 128} "${WRITE_PEER[@]}" --json "$WORK/write.json"

# 7. the pipeline end to end: SA-1B-sized JPEGs over loopback, sd_vae + siglip + t5
#    (full-size random weights), a store on local disk; the GPU's busy fraction
MODELS=full; [ "$PRESET" = tiny ] && MODELS=tiny
# shellcheck disable=SC2086
limited run 90 "$BIN" bench run --device "$DEVICE" --dtype "$DTYPE" --models "$MODELS" \
  ${GPU_CHECK_RUN_ARGS:---shards 6 --images-per-shard 64} --workdir /tmp/gpu-check-run \
  --json "$OUT/run.json"

{
  echo
  for s in "${STEPS[@]}"; do echo "$s"; done
  for name in tiny image text more candle write run; do
    [ -s "$WORK/$name.txt" ] && { echo; cat "$WORK/$name.txt"; }
  done
} | tee -a "$OUT/summary.txt"
grep -q "FAILED\|TIMED OUT" "$OUT/summary.txt" && exit 1
exit 0
