#!/usr/bin/env bash
# The main job on the embedded default (shapes world), offline, on CPU. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 DO_NOT_TRACK=1
exec .venv/bin/python -m elborl.embedded "$@"
