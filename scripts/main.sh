#!/usr/bin/env bash
# The main job on the built-in default: set up, describe the default recipe.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/megacpp describe --recipe "${RECIPE:-nam-tiny}"
