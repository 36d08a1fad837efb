#!/usr/bin/env bash
# Installs what is missing, builds, and runs the main job.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" release
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./build/examples/mixed_layer
