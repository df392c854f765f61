#!/usr/bin/env bash
# The whole GPU suite in one go (about 20 minutes on one H100): install clipfast, run the test suite
# compiled on the GPU, every benchmark against eager and torch.compile, and write results and plots.
#
#   bash bench/gpu_suite.sh [OUT_DIR]      # default: bench/results/<gpu>_<date>_torch<v>_triton<v>
#
# The GPU machines have torch/triton preinstalled and no package registry, hence --no-deps.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

$PY -m pip install -q --no-deps --no-build-isolation -e . || exit 1
OUT=${1:-$($PY -c 'from clipfast.benchmarks.cli import results_dir; from clipfast.benchmarks.harness import environment; print(results_dir(environment()))')}
mkdir -p "$OUT"
$PY -c 'import json; from clipfast.benchmarks.harness import environment; print(json.dumps(environment(), indent=1))' > "$OUT/environment.json"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/nvidia-smi.csv" 2>/dev/null

status=0
echo "== GPU tests"
timeout 600 $PY -m pytest tests -q -x -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" 2>&1 | tail -n 40 | tee "$OUT/gpu_tests.txt" || status=1

echo "== benchmarks"
timeout 900 $PY -m clipfast.cli bench all --json "$OUT/bench_all.json" --csv "$OUT/bench_all.csv" \
    --plot "$OUT/speedup.png" 2>&1 | tee "$OUT/bench_all.txt" || status=1

echo "== results in $OUT"
exit $status
