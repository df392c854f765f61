#!/usr/bin/env bash
# The GPU check in one command of at most 8 minutes (H100/H200), from a bare machine with torch/triton
# preinstalled and no package registry:
#
#   bash bench/gpu_suite.sh OUT        # OUT gets <= 8 files: results.json summary.md log.txt junit.xml *.png
#
# First a preflight (C compiler, Python.h, libcuda, nvidia-smi vs torch.cuda, one tiny Triton kernel
# launched and checked): a failure stops within seconds, exit code 3, its one-line reason in results.json
# and summary.md. Then steps, each with its own time budget, every result written to OUT as soon as it
# exists (a run stopped at any point keeps what it finished): compile (warm Triton's cache for every
# kernel and shipped config the timed steps use, in parallel) -> correctness on the GPU (bf16 first, then
# fp16, vs float64, every shipped tile) -> headline timings (attention, MLP, LayerNorm, contrastive loss,
# host overhead, ViT-B/16 training step and image encoding, two whole-model torch.compiles) -> the rest of
# the tests and benchmarks as time allows. A process that crashes (a CUDA error, any abnormal exit) costs
# its case only: that case is rerun alone with CUDA_LAUNCH_BLOCKING=1 (both errors in results.json,
# "crashes") and the cases after it run in a fresh process. The logic lives in
# the clipfast.gpu_check package (its docstring has the details; the benchmark cases it runs are in
# clipfast/benchmarks/).
#
# Without CUDA the same command is a rehearsal: the same steps at smoke shapes through the Triton
# interpreter (a few minutes), results marked "rehearsal": true; tests/test_gpu_suite.py runs it. Where
# nvidia-smi lists a GPU that torch cannot use, the preflight stops instead of rehearsing.
#
# If lent a GPU: run this once, early (one call, timeout_s 540: a margin over the 8 minutes), then here
#   python -m clipfast.gpu_check.summary --write-readme --from OUT
# which copies the results to bench/results/<gpu>_<date>_torch<v>_triton<v>/ and regenerates the
# README's results section (targets met/missed); commit both. Spend what device time is left on the
# slowest hot path summary.md shows.
#
#   CLIPFAST_SUITE_BUDGET_S=300 bash bench/gpu_suite.sh OUT   # a shorter run (all steps scale with it)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
OUT=${1:?usage: bash bench/gpu_suite.sh OUT_DIR}

# Install (no dependencies: the GPU machine has no registry) unless this checkout is what imports already.
here=$(pwd -P)
installed=$($PY -I -c 'import clipfast, os; print(os.path.dirname(os.path.dirname(os.path.realpath(clipfast.__file__))))' 2>/dev/null)
if [ "$installed" != "$here" ]; then
    $PY -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi
exec $PY -m clipfast.gpu_check "$OUT"
