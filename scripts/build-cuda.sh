#!/usr/bin/env bash
# Builds the CUDA binary of lora-dash (`cargo build --release --features cuda`) on a machine
# with no GPU and no system CUDA toolkit, and prints the path of the stripped binary.
#
# 1. Installs the CUDA compiler and headers from PyPI wheels (pinned below, CUDA 13.0) into a
#    local folder with `pip install --target`: nvcc, cudafe++, ptxas, fatbinary, nvlink
#    (nvidia-cuda-nvcc), cicc and libdevice (nvidia-nvvm), the crt headers
#    (nvidia-cuda-crt), the runtime headers and libcudart_static.a (nvidia-cuda-runtime) and
#    thrust/cub/libcu++ (nvidia-cuda-cccl). No root, no system packages. Skipped when the
#    folder already holds this exact set.
#    PyPI's CUDA 12 wheels (nvidia-cuda-nvcc-cu12) ship only ptxas and libnvvm, not nvcc
#    itself, so the toolkit here is CUDA 13.0; its PTX loads with a driver of the 580 series
#    or later (CUDA 13.0). cuBLAS, cuRAND and NVRTC are not needed to build: candle's cudarc
#    loads them (and the driver, libcuda.so.1) with dlopen when a CUDA device is first
#    created, so the binary starts, and runs on the CPU, where none of them is installed.
# 2. Compiles candle's kernels to PTX/SASS for one compute capability (no GPU is needed for
#    that) and links the CUDA runtime statically, so the binary has no link-time dependency
#    on any CUDA library.
# 3. Strips the binary, copies it to $LORA_DASH_CUDA_BIN, fails if it is larger than
#    $LORA_DASH_CUDA_MAX_MIB, and prints its path.
#
# The build uses its own target folder, so the normal CPU build's `target/release` is
# left alone.
#
# Environment knobs (all optional):
#   LORA_DASH_CUDA_HOME        where the wheels are installed
#                              (default: $HOME/.cache/lora-dash/cuda)
#   CUDA_COMPUTE_CAP           GPU compute capability to compile for (default: 90, Hopper;
#                              cudaforge turns 90 into sm_90a)
#   LORA_DASH_CUDA_TARGET_DIR  cargo target folder (default: <repo>/target/cuda)
#   LORA_DASH_CUDA_BIN         where the stripped binary is copied
#                              (default: $LORA_DASH_CUDA_TARGET_DIR/lora-dash-cuda)
#   LORA_DASH_CUDA_MAX_MIB     size limit of the stripped binary in MiB (default: 64)
#   NVCC_CCBIN                 host compiler for nvcc, if the default `c++`/`gcc` is not a
#                              supported one (passed through to candle-kernels' build)
#   CARGO_BUILD_JOBS           as usual for cargo
#
# Usage: scripts/build-cuda.sh [extra cargo build arguments]
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix="${LORA_DASH_CUDA_HOME:-$HOME/.cache/lora-dash/cuda}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
target_dir="${LORA_DASH_CUDA_TARGET_DIR:-$repo/target/cuda}"
out_bin="${LORA_DASH_CUDA_BIN:-$target_dir/lora-dash-cuda}"
max_mib="${LORA_DASH_CUDA_MAX_MIB:-64}"

# CUDA 13.0 (Update 2 compiler, runtime 13.0.96), all x86_64 manylinux wheels.
wheels=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)

log() { printf '%s\n' "build-cuda: $*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ] ||
  die "the pinned CUDA wheels are for x86_64 Linux; this is $(uname -s) $(uname -m)"
command -v python3 >/dev/null || die "python3 is needed to install the CUDA wheels"
command -v cargo >/dev/null || die "cargo is not on PATH"
command -v strip >/dev/null || die "strip (binutils) is not on PATH"

# ---- 1. CUDA toolkit from PyPI --------------------------------------------------------------
cuda_home="$prefix/nvidia/cu13"
stamp="$prefix/.installed"
want="$(printf '%s\n' "${wheels[@]}")"
if [ -x "$cuda_home/bin/nvcc" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  log "CUDA wheels already in $prefix"
else
  log "installing ${wheels[*]} into $prefix"
  mkdir -p "$(dirname "$prefix")"
  tmp="$(mktemp -d "$prefix.tmp.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip install --quiet --disable-pip-version-check --no-input --no-deps \
    --no-compile --only-binary=:all: --target "$tmp" "${wheels[@]}" >&2
  printf '%s\n' "$want" >"$tmp/.installed"
  if [ -e "$prefix" ]; then
    # Only a folder this script made (it has the stamp) is replaced.
    [ -f "$stamp" ] || die "$prefix exists but was not made by this script; remove it or set LORA_DASH_CUDA_HOME"
    rm -rf "$prefix"
  fi
  mv "$tmp" "$prefix"
  trap - EXIT
fi
[ -x "$cuda_home/bin/nvcc" ] || die "no nvcc at $cuda_home/bin/nvcc after the install"

# candle-kernels asks for `-lcudart`. Only the static runtime is offered under that name, so
# the binary does not need libcudart.so.13 at start-up (the static runtime opens the driver
# with dlopen on first use).
link_dir="$prefix/link"
mkdir -p "$link_dir"
ln -sfn "$cuda_home/lib/libcudart_static.a" "$link_dir/libcudart.a"

# ---- 2. cargo build ---------------------------------------------------------------------------
export CUDA_HOME="$cuda_home" CUDA_PATH="$cuda_home" CUDA_ROOT="$cuda_home"
# cudaforge (candle-kernels' build) takes nvcc from $NVCC; cudarc runs `nvcc --version` from
# PATH to pick its CUDA API bindings.
export NVCC="$cuda_home/bin/nvcc"
export PATH="$cuda_home/bin:$PATH"
export CARGO_TARGET_DIR="$target_dir"
# -L for the cudart archive above; appended to any RUSTFLAGS the caller set.
export RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-L native=$link_dir"

log "$("$NVCC" --version | tail -n 2 | head -n 1)"
log "cargo build --release --features cuda (compute capability $CUDA_COMPUTE_CAP) into $target_dir"
start=$SECONDS
(cd "$repo" && cargo build --release --features cuda --bin lora-dash "$@")
log "cargo build took $((SECONDS - start)) s"

# ---- 3. strip, size check ---------------------------------------------------------------------
built="$target_dir/release/lora-dash"
[ -f "$built" ] || die "cargo produced no $built"
mkdir -p "$(dirname "$out_bin")"
strip --strip-all -o "$out_bin.tmp" "$built"
chmod +x "$out_bin.tmp"
mv -f "$out_bin.tmp" "$out_bin"
size=$(stat -c %s "$out_bin")
log "binary: $(stat -c %s "$built") bytes unstripped, $size bytes stripped"
if [ "$size" -gt $((max_mib * 1024 * 1024)) ]; then
  die "$out_bin is $size bytes, over the ${max_mib} MiB limit"
fi
echo "$out_bin"
