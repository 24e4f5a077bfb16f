#!/usr/bin/env bash
# The default pipeline on the real HAM10000 sample, in a fresh clone: import, then the whole
# `dvc repro` timed, then the test figures. Usage: benchmarks/real_data_pipeline.sh [DATA] [--set ...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
data=$(realpath "${1:-$root/../shared/data/ham10000-200px}")
work=$(mktemp -d /tmp/skinrisk-real-XXXX)
git clone -q "$root" "$work/skinrisk"
cd "$work/skinrisk"
ln -s "$root/.venv" .venv
# the clone's code, not the checkout the venv was installed from (editable)
export PATH="$PWD/.venv/bin:$PATH" PYTHONPATH="$PWD" TF_CPP_MIN_LOG_LEVEL=2 GX_ANALYTICS_ENABLED=False
skinrisk data import "$data"
start=$(date +%s)
dvc repro
end=$(date +%s)
echo "dvc repro wall time: $((end - start)) s (workspace $work/skinrisk)"
python - <<'PY'
import json
from tasks.stages.evaluate import format_headline
metrics = json.load(open("reports/metrics.json"))
print(format_headline(metrics))
print("training:", {k: v for k, v in json.load(open("models/train.json")).items() if k not in ("class_names",)})
print(open("reports/classification_report.txt").read())
print(json.load(open("reports/preprocess.json")))
PY
