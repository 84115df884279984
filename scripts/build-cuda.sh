#!/usr/bin/env bash
# Build tensorbake with CUDA on a machine that has no CUDA toolkit, from PyPI wheels.
#
#   scripts/build-cuda.sh setup     # once: nvcc 13.0 + headers + link-time libraries (~2 GB)
#   scripts/build-cuda.sh check     # cargo check --features cuda (proves the CUDA build compiles)
#   scripts/build-cuda.sh build     # release binary + .gpu/tensorbake.xz for the GPU machine,
#                                   # and .gpu/wheels (diffusers, which it lacks; scripts/gpu-check.sh)
#
# Why these versions: the GPU machines run driver 580 (CUDA 13.0), which JIT-compiles
# candle's compute_90a PTX at start-up; cudarc picks its driver bindings from
# `nvcc --version`, so nvcc must be 13.0.x. The driver library (libcuda.so) comes with
# the driver, so a link-time stub stands in for it here.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=${TOOLS:-/tmp/cuda13-pip}
CR=$TOOLS/nvidia/cu13
FEATURES=${FEATURES:-cuda}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/cuda}

setup() {
  mkdir -p "$TOOLS/wheels"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$TOOLS/wheels" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35 nvidia-cudnn-cu13==9.19.0.56
  for w in nvidia_cuda_nvcc nvidia_cuda_crt nvidia_nvvm nvidia_cuda_runtime nvidia_cuda_cccl nvidia_cuda_nvrtc; do
    unzip -qo "$TOOLS"/wheels/${w}-*.whl -d "$TOOLS"
  done
  # shared libraries needed only to link; the GPU machine has its own copies
  unzip -qo "$TOOLS"/wheels/nvidia_cublas-*.whl 'nvidia/cu13/lib/libcublas.so.13' 'nvidia/cu13/lib/libcublasLt.so.13' -d "$TOOLS"
  unzip -qo "$TOOLS"/wheels/nvidia_curand-*.whl 'nvidia/cu13/lib/libcurand.so.10' -d "$TOOLS"
  unzip -qo "$TOOLS"/wheels/nvidia_cudnn_cu13-*.whl 'nvidia/cudnn/lib/libcudnn.so.9' -d "$TOOLS"
  (cd "$CR/lib" && for l in cublas cublasLt cudart nvrtc; do ln -sf lib$l.so.13 lib$l.so; done \
    && ln -sf libcurand.so.10 libcurand.so && ln -sf ../../cudnn/lib/libcudnn.so.9 libcudnn.so)
  # libcuda stub: every cu* entry point of cudarc's bindings and of cuda.h
  mkdir -p "$CR/lib/stubs"
  cargo fetch -q
  {
    cat ~/.cargo/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs 2>/dev/null |
      grep -ohE '^\s+fn cu[A-Za-z0-9_]+\(' | sed -E 's/^\s+fn (cu[A-Za-z0-9_]+)\(/\1/'
    gcc -E -I"$CR/include" "$CR/include/cuda.h" | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d ' ('
  } | sort -u | awk '{print "void " $1 "(void){}"}' > "$CR/lib/stubs/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CR/lib/stubs/libcuda.so" "$CR/lib/stubs/libcuda_stub.c"
  "$CR/bin/nvcc" --version | tail -1
}

cuda_env() {
  [ -x "$CR/bin/nvcc" ] || { echo "no nvcc at $CR/bin: run scripts/build-cuda.sh setup first" >&2; exit 1; }
  export PATH=$CR/bin:$PATH CUDA_ROOT=$CR CUDA_COMPUTE_CAP=90
}

case "${1:-}" in
  setup) setup ;;
  check)
    cuda_env
    cargo check --workspace --all-targets --features "$FEATURES"
    # the kernels NVRTC compiles at run time (the ops seam's `const KERNEL` sources),
    # compiled here by nvcc for sm_90 so that a kernel error shows before a GPU run
    # (each after the element access they share, `const BF16_IO` of ops/mod.rs)
    mkdir -p "$CARGO_TARGET_DIR/kernels"
    io="$CARGO_TARGET_DIR/kernels/bf16_io.cuh"
    sed -n '/const BF16_IO: &str = r#"/,/^"#;/p' nn/src/ops/mod.rs | sed '1d;$d' > "$io"
    for f in nn/src/ops/*.rs; do
      grep -q 'const KERNEL: &str = r#"' "$f" || continue
      cu="$CARGO_TARGET_DIR/kernels/$(basename "$f" .rs).cu"
      { cat "$io"; sed -n '/const KERNEL: &str = r#"/,/^"#;/p' "$f" | sed '1d;$d'; } > "$cu"
      nvcc -ptx -arch=compute_90 "$cu" -o "${cu%.cu}.ptx"
      echo "kernel $f: $(grep -c '^\.visible \.entry' "${cu%.cu}.ptx") entry points compile"
    done ;;
  build)
    cuda_env
    cargo build --release --features "$FEATURES" --bin tensorbake
    mkdir -p .gpu
    xz -6 -T0 -c "$CARGO_TARGET_DIR/release/tensorbake" > .gpu/tensorbake.xz
    # the model crate's unit tests with CUDA (the seam's kernels against the CPU):
    # scripts/gpu-check.sh runs them first
    nn_tests=$(cargo test --release --workspace --lib --features "$FEATURES" --no-run \
        --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "tensorbake_nn" \
            and m.get("profile", {}).get("test") and m.get("executable"):
        print(m["executable"])')
    [ -n "$nn_tests" ] || { echo "no tensorbake-nn test binary was built" >&2; exit 1; }
    xz -6 -T0 -c "$nn_tests" > .gpu/nn-tests.xz
    # NVRTC needs no GPU: compile the seam's kernels the way the GPU machine will
    # (the stub stands in for the driver library, which these tests never call)
    ln -sf libcuda.so "$CR/lib/stubs/libcuda.so.1"
    LD_LIBRARY_PATH="$CR/lib/stubs:$CR/lib:$TOOLS/nvidia/cudnn/lib" "$nn_tests" kernel_compiles
    # the GPU machine has torch and transformers but not diffusers (nor importlib_metadata,
    # which diffusers imports); the versions are the test venv's
    rm -rf .gpu/wheels && mkdir -p .gpu/wheels
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp -d .gpu/wheels \
      "$(grep '^diffusers==' scripts/requirements-torch.txt)" importlib_metadata==8.7.0
    ls -la .gpu/tensorbake.xz .gpu/nn-tests.xz .gpu/wheels ;;
  *) sed -n 2,12p "$0"; exit 2 ;;
esac
