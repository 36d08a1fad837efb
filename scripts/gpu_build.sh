#!/usr/bin/env bash
# Builds GPU test programs with nvcc alone (no CMake), for a machine that has the CUDA toolkit
# but not the project's other dependencies: Eigen and doctest come from DEPS (an include folder
# holding eigen3/ and doctest/doctest.h). Builds in parallel, one program per source.
#
#   DEPS=dir bash scripts/gpu_build.sh OUT_DIR tests/gpu/test_a.cu [more sources...]
# DASH_NVCC_EXTRA adds flags (e.g. "-Xptxas -v" for the register and spill report).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$1
shift
deps=${DEPS:?set DEPS to a folder with eigen3/ and doctest/doctest.h}
arch=${DASH_CUDA_GENCODE:--gencode=arch=compute_90a,code=sm_90a}
mkdir -p "$out"
pids=()
for src in "$@"; do
  name=$(basename "$src" .cu)
  nvcc -std=c++20 -O3 $arch --expt-relaxed-constexpr -diag-suppress 20012 -lineinfo \
    -I"$root/include" -I"$root/tests" -isystem "$deps" -isystem "$deps/eigen3" \
    ${DASH_NVCC_EXTRA:-} "$src" "$root/tests/support/main.cpp" -lcublasLt -o "$out/$name" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
exit $status
