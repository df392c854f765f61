#!/usr/bin/env bash
# The whole GPU suite in one go (about 20 minutes on one H100): install clipfast, run the test suite
# compiled on the GPU, every benchmark against eager and torch.compile, and write results and plots.
#
#   bash bench/gpu_suite.sh [OUT_DIR]      # default: bench/results/<gpu>_<date>_torch<v>_triton<v>
#   RUN_TESTS=0 FAMILIES="attention mlp" bash bench/gpu_suite.sh OUT   # a part of it (e.g. within a 10-minute slot)
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
if [ "${RUN_TESTS:-1}" = 1 ]; then
echo "== GPU tests"
timeout 600 $PY -m pytest tests -q -x -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" 2>&1 | tail -n 40 | tee "$OUT/gpu_tests.txt" || status=1
fi

echo "== benchmarks"
# one family at a time, each with its own time limit, so a slow family (torch.compile of whole models)
# cannot take the kernel results down with it
for family in ${FAMILIES:-layer_norm attention mlp patch_embed contrastive_loss model integrations}; do
    timeout "${BENCH_FAMILY_TIMEOUT:-420}" $PY -m clipfast.cli bench "$family" --json "$OUT/bench_$family.json" \
        --csv "$OUT/bench_$family.csv" --plot "$OUT/speedup_$family.png" 2>&1 | tee "$OUT/bench_$family.txt" || status=1
done

echo "== results in $OUT"
exit $status
