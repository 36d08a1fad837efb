#!/usr/bin/env bash
# Installs what is missing, then configures and builds dash. Safe to run again: it installs
# only what is absent and rebuilds only what changed.
#
#   bash cmake/setup.sh [PRESET]     PRESET from CMakePresets.json, default "release"
#
# Needs: Debian 12 (or a system with apt-get), root or sudo for apt-get. CUDA is optional: when
# nvcc is found, the CUDA targets are built too, with a CMake new enough for nvcc's C++20.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
preset=${1:-release}

packages=(build-essential cmake git pkg-config python3 python3-venv
          libeigen3-dev doctest-dev libbenchmark-dev libpcre2-dev nlohmann-json3-dev libcli11-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "dash setup: installing ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# nvcc: on PATH, or where the CUDA toolkit installs it.
nvcc=$(command -v nvcc || true)
[ -n "$nvcc" ] || { [ -x /usr/local/cuda/bin/nvcc ] && nvcc=/usr/local/cuda/bin/nvcc; } || true

cmake_bin=cmake
cmake_args=()
if [ -n "$nvcc" ]; then
  cmake_args+=("-DCMAKE_CUDA_COMPILER=$nvcc")
  # CMake learned nvcc's C++20 flag in 3.28; Debian 12 has 3.25, so take one from PyPI.
  if ! cmake --version | awk 'NR==1 {split($3, v, "."); exit !(v[1] > 3 || (v[1] == 3 && v[2] >= 28))}'; then
    tools="$root/build-tools"
    if ! "$tools/bin/cmake" --version >/dev/null 2>&1; then
      echo "dash setup: installing CMake >= 3.28 from PyPI into build-tools/ (nvcc needs it)"
      python3 -m venv "$tools"
      "$tools/bin/pip" install -q "cmake>=3.28,<4"
    fi
    cmake_bin="$tools/bin/cmake"
  fi
fi

# The default model (SmolLM2-135M-Instruct), for the main job and the tests that compare it with
# its reference; without network access the rest still builds, and those tests say they did not run.
bash "$root/cmake/default_model.sh" >/dev/null || echo "dash setup: default model not installed (see above)"

cd "$root"
"$cmake_bin" --preset "$preset" "${cmake_args[@]}" >/dev/null
"$cmake_bin" --build --preset "$preset"

# For scripts that source this one: the CMake and CTest that configured the build.
DASH_CMAKE=$cmake_bin
DASH_CTEST=$(dirname "$(command -v "$cmake_bin")")/ctest
export DASH_CMAKE DASH_CTEST
