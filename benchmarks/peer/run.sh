#!/usr/bin/env bash
# Builds libdash_peer.so with nvcc and times dash against its peers on this machine's GPU.
#
#   bash benchmarks/peer/run.sh OUT.json [WHEEL_DIR]
#
# WHEEL_DIR: flash-linear-attention wheels (`pip download flash-linear-attention fla-core`) to
# install into a scratch folder when the machine has no network; without it fla must be importable.
# DASH_COMMIT names the commit measured where the tree has no .git; DASH_EIGEN the folder holding
# Eigen/ (the search step's entry points include the CPU model), default /usr/include/eigen3.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
out=$1
wheels=${2:-}
build=$(mktemp -d)
nvcc -std=c++20 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -diag-suppress 20012 \
  -shared -Xcompiler -fPIC -I"$root/include" -isystem "${DASH_EIGEN:-/usr/include/eigen3}" "$root"/benchmarks/peer/capi_*.cu -lcublasLt -o "$build/libdash_peer.so"
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$build/site" "$wheels"/*.whl
  export PYTHONPATH="$build/site${PYTHONPATH:+:$PYTHONPATH}"
fi
commit=${DASH_COMMIT:-$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)}
PYTHONUNBUFFERED=1 python3 "$root/benchmarks/peer/bench_ops.py" --lib "$build/libdash_peer.so" --out "$out" \
  --commit "$commit" --command "bash benchmarks/peer/run.sh $(basename "$out")"
