"""The GPU check: one command that answers where clipfast stands on a GPU within a short lease.

    bash bench/gpu_suite.sh OUT                          # installs the checkout if needed, then:
    python -m clipfast.gpu_check OUT [--budget-s S]

It runs the benchmark cases of ``clipfast.benchmarks`` (and the test suite) and is never imported by them:

- ``preflight``: what must hold before any step may spend the lease (C compiler, ``Python.h``, GPU visible to
  nvidia-smi and torch alike, libcuda, one tiny Triton kernel launched and checked);
- ``steps``: the steps in priority order with their shares of the budget, and which benchmark cases and
  implementations each one runs (``plan``; the headline picks, ``HEADLINE``);
- ``run``: the parent process: each step in lanes of child processes, their records merged into ``OUT`` as
  they come, crashes rerun alone with ``CUDA_LAUNCH_BLOCKING=1``;
- ``workers`` and ``pytest_plugin``: the child processes (benchmark / compile / ``clipfast warm`` and ``tune``
  workers, and pytest shards), with what they share in ``child`` (records, step deadline, CUDA errors,
  injected crashes);
- ``summary`` and ``targets``: ``summary.md`` of a run, targets met or missed, and the README's results
  section from the committed results.

First the preflight: a failure stops the run, its one-line reason in ``results.json`` (``stopped``) and
``summary.md``, exit code 3. Then the steps, in priority order, each in its own processes with its own time
budget (a share of the whole); every result is appended to ``OUT`` as soon as it exists, so a run stopped at
any point returns all it finished:

1. ``warm``: ``clipfast warm`` compiles the headline model's first training step (ViT-B-16, B=256, bf16:
   the distinct compiles its launches need, in parallel over N processes; the rehearsal only plans the tiny
   model for sm_90), recorded with the compile count and seconds. Beside it, N worker processes (one per
   core, at most 16) each run their share of the benchmark cases
   the timed steps use, once per mode, with every autotuned kernel compiling *all* its pruned shipped
   configs at the case's real arguments (``workers.compiling_every_config``: the JIT function is launched
   with each config's meta-parameters in warmup mode, i.e. compiled without running, then the first one
   runs), so Triton's on-disk cache holds every binary the timed steps will load, specialized exactly as they
   will launch it. torch.compile of the kernel-level cases is run too (inductor's on-disk caches).
   Whole-model cases are left out: their kernels run at the same shapes as the kernel cases. Beside this
   step and the next, ``warm_models`` runs the two whole-model torch.compiles of step 3 once (two
   processes), so the timed step loads them from inductor's caches; it is stopped before any timing.
2. ``correctness``: ``pytest -m "gpu or gpu_suite"`` split over N parallel processes (each compiles its
   own kernels), the bf16 tests first in every shard (``steps.correctness_plan``): every family forward and
   backward in bf16/fp16 against float64 at CLIP shapes, every shipped tile forced, the large-tensor cases.
   No ``-x``; a test does not start after the budget.
3. ``headline_kernels``, ``headline_model``, ``headline_model_compiled``: the headline timings
   (``steps.HEADLINE``), the whole-model torch.compile cases (two compiles) in a step of their own.
   ``tune_kernels``: ``clipfast tune --kernels`` on the headline model's training step times every offered
   config of its kernels; the winners, in the shipped tables' format, are ``autotune_table`` in
   ``results.json`` (copy its ``table`` to ``kernels/configs/sm<arch>.json`` to ship it).
4. ``rest_tests``: the rest of the test suite, in parallel; ``rest_bench``: every remaining benchmark
   case and implementation, as long as time is left.

Crashes: each step runs in lanes (a worker, or a pytest shard), one process at a time, each case's start
recorded with its pid. A process whose case raises a CUDA error (or after which the device no longer
synchronizes) records it and exits; any other abnormal exit is pinned on the case it had started last.
The lane then reruns that case alone with ``CUDA_LAUNCH_BLOCKING=1`` (so the error names the failing
launch; both attempts' errors are in ``results.json`` under ``crashes``) and continues with the cases not
yet started in a fresh process. Processes are respawned after a crash only, not per case: a start costs
seconds (torch and triton imports, pytest collection), and no case ever runs in a process that crashed.
``CLIPFAST_SUITE_CRASH`` injects a crash (``child.crash_if_injected``) for the tests.

Without CUDA the same steps run as a rehearsal: smoke shapes through the Triton interpreter, no timings,
results labelled ``"rehearsal": true`` (``clipfast.gpu_check.summary`` refuses to file them as GPU results).

Output (at most 8 files, no folders): ``results.json`` (environment, steps, test outcomes, benchmark
rows), ``summary.md`` (targets met/missed, tables), ``log.txt``, ``junit.xml`` and up to three PNG plots.
"""
