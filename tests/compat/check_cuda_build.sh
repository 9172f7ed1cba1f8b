#!/usr/bin/env bash
# Compiles and links the CUDA build of the extension on a machine without a GPU or a CUDA torch: the C++ sources
# (bindings included) against the headers of a CUDA torch wheel, the .cu files with nvcc, linked into one shared
# library against that wheel's libraries. Nothing is run. Usage:
#
#   pip --isolated download torch==2.13.0 --no-deps --index-url https://pypi.org/simple -d /tmp/torchcuda
#   tests/compat/check_cuda_build.sh /tmp/torchcuda/torch-2.13.0-*.whl [sm_90]
#
# The wheel's CUDA major version must match nvcc's (torch 2.13.0 on PyPI: CUDA 13.0).
set -euo pipefail
wheel=${1:?path to a CUDA torch wheel}
arch=${2:-sm_90}
root=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
trap '[[ -n ${KEEP:-} ]] || rm -rf "$work"' EXIT
unzip -q "$wheel" 'torch/include/*' 'torch/lib/*' -d "$work"
torch_dir=$work/torch
nvcc_path=$(readlink -f "$(command -v nvcc)")
if [[ -z ${CUDA_HOME:-} ]]; then
  # nvcc may be a wrapper script: ask it where its toolkit lives
  CUDA_HOME=$(nvcc --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
fi
cuda_home=${CUDA_HOME:-$(dirname "$(dirname "$nvcc_path")")}
includes=(-I"$torch_dir/include" -I"$torch_dir/include/torch/csrc/api/include" -I"$cuda_home/include")
defines=(-D_GLIBCXX_USE_CXX11_ABI=1 -DTORCH_API_INCLUDE_EXTENSION_H)
objects=()
for src in "$root"/csrc/ops.cpp "$root"/csrc/cpu/*.cpp "$root"/csrc/cuda/*.cpp; do
  obj=$work/$(basename "$src").o
  g++ -std=c++20 -O2 -fPIC -fopenmp -Wall -Werror=return-type "${defines[@]}" "${includes[@]}" -c "$src" -o "$obj"
  objects+=("$obj")
done
for src in "$root"/csrc/cuda/*.cu; do
  obj=$work/$(basename "$src").o
  nvcc -std=c++20 -O3 -arch="$arch" -Xcompiler -fPIC -c "$src" -o "$obj"
  objects+=("$obj")
done
g++ -shared -fopenmp "${objects[@]}" -L"$torch_dir/lib" -lc10 -lc10_cuda -ltorch_cpu -ltorch_cuda -ltorch \
  -L"$cuda_home/lib64" -L"$cuda_home/lib" -lcudart -Wl,--allow-shlib-undefined -Wl,--no-undefined -o "$work/_C.so"
symbols=$(nm -C "$work/_C.so")
for name in "deepseek_moe::cuda::permute(" "deepseek_moe::(anonymous namespace)::permute_cuda("; do
  grep -qF "$name" <<<"$symbols" || { echo "missing from _C.so: $name" >&2; exit 1; }
done
echo "CUDA build of the extension compiled and linked for $arch: $(du -h "$work/_C.so" | cut -f1) ($(basename "$wheel"))"
