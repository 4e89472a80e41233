#!/usr/bin/env bash
# Set up, then run the main job (the offline demo) with params.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
# The main job, as a Prefect flow with content-cached steps: build the text-minilm zoo (real MiniLM
# fine-tuned on four Debian text tasks), merge it with every method in params.yaml (parameters
# chosen on validation), evaluate, write the report and plots, log everything to MLflow.
mergeflow run --params params.yaml "$@"
