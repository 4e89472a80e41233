#!/usr/bin/env bash
# Set up, then run the main job (the offline demo) with params.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
mergeflow demo --params params.yaml --output out/demo "$@"
