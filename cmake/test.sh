#!/usr/bin/env bash
# Installs what is missing, builds, and runs every test (GPU tests skip, visibly, without a GPU).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" release
cd "$(dirname "${BASH_SOURCE[0]}")/.."
"$DASH_CTEST" --preset release
