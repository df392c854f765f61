"""Hugging Face test-suite parity: transformers' own model tests, run without and with clipfast.

Two parts in one module:

* a **pytest plugin** (``-p clipfast.testing.hf_parity``) for a run inside a transformers checkout:

  - ``--clipfast-mode=baseline``: nothing of clipfast is switched on;
  - ``--clipfast-mode=patch``: every model is patched right after construction (``clipfast.patch`` at the
    end of ``PreTrainedModel.post_init``, so ``Model(config)``, ``from_pretrained`` and ``_from_config``
    all return patched models);
  - ``--clipfast-mode=attn``: every model that would get the default attention (``None`` / ``"sdpa"``) gets
    ``attn_implementation="clipfast"`` instead; an explicit ``"eager"`` stays eager, so transformers'
    eager-vs-sdpa tests compare eager against clipfast;
  - ``--clipfast-head-dim=N`` (default 16, all modes, the baseline too): the tiny test configurations use
    head dims of 4-8, which clipfast's kernels do not take (it falls back to SDPA); each unittest class's
    ``setUp`` is wrapped so that its model tester (and the ``*_model_tester`` inside composite testers)
    keeps its hidden size and uses fewer, wider heads (hidden 32 with 4 heads -> 2 heads of 16). Testers
    that already have head dims of N or more are left alone. ``0`` switches this off.

* a **runner**: ``python -m clipfast.testing.hf_parity CHECKOUT FILE... [-k EXPR] [--modes ...]`` runs
  the given test files (paths inside ``CHECKOUT``) once per mode in a subprocess (``CHECKOUT`` as the
  working directory, junit XML per mode) and prints, per test file and mode, how many tests pass in the
  baseline and how many of those fail with clipfast, then the failing tests themselves. Exit status 1 when
  any baseline-passing test fails with clipfast. Arguments after ``--`` go to pytest unchanged (e.g.
  ``--timeout=300``); ``--reuse`` reads the junit XML an earlier run left in ``--out`` (e.g. the baseline,
  which costs little, run once over whole files) instead of running that mode again.

Without CUDA the runner sets ``TRITON_INTERPRET=1`` (the kernels run through Triton's interpreter on CPU,
slowly: use ``-k`` to pick subsets) and ``CLIPFAST_DISPATCH=kernel`` (the kernels, not a measured choice of
PyTorch, run wherever they can).
"""
from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

MODES = ("baseline", "patch", "attn")

#: transformers tests that assert which attention implementation a config names (e.g. that it is "sdpa"),
#: not what the model computes: with ``attn_implementation="clipfast"`` they fail by construction, so the
#: runner lists them apart in that mode and does not count them as regressions
NAME_CHECKS = ("test_can_set_attention_dynamically", "test_can_set_attention_dynamically_composite_model",
               "test_sdpa_can_dispatch_composite_models", "test_sdpa_can_dispatch_non_composite_models",
               "test_attn_implementation_composite_models", "test_config_attn_implementation_setter")
_DEFAULT_HEAD_DIM = 16

# ----------------------------------------------------------------------------------------------
# pytest plugin
# ----------------------------------------------------------------------------------------------


def pytest_addoption(parser):
    group = parser.getgroup("clipfast", "clipfast Hugging Face parity")
    group.addoption("--clipfast-mode", choices=MODES, default="baseline",
                    help="baseline (clipfast off), patch (clipfast.patch after construction), "
                         'attn (attn_implementation="clipfast" instead of the default)')
    group.addoption("--clipfast-head-dim", type=int, default=_DEFAULT_HEAD_DIM,
                    help="smallest head dim of the tiny test models (fewer, wider heads); 0 leaves them as they are")


def pytest_configure(config):
    install(config.getoption("--clipfast-mode"))


def pytest_collection_modifyitems(config, items):
    head_dim = config.getoption("--clipfast-head-dim")
    if head_dim <= 0:
        return
    for cls in {item.cls for item in items if getattr(item, "cls", None) is not None}:
        setup = cls.__dict__.get("setUp") or getattr(cls, "setUp", None)
        if setup is None or getattr(setup, "_clipfast_head_dim", None) == head_dim:
            continue
        cls.setUp = _widening_setup(setup, head_dim)


def _widening_setup(setup, head_dim):
    @functools.wraps(setup)
    def set_up(self, *args, **kwargs):
        setup(self, *args, **kwargs)
        tester = getattr(self, "model_tester", None)
        if tester is not None:
            widen_heads(tester, head_dim)

    set_up._clipfast_head_dim = head_dim
    return set_up


def widen_heads(tester, head_dim: int) -> None:
    """Give ``tester`` (a transformers ``*ModelTester``) and its ``*_model_tester`` attributes heads at least
    ``head_dim`` wide: the same hidden size over ``hidden_size // head_dim`` heads (hidden sizes below
    ``head_dim`` grow to one head of ``head_dim``). A composite tester's own ``hidden_size`` copy follows
    the sub-tester it was copied from."""
    subs = [getattr(tester, name) for name in sorted(vars(tester)) if name.endswith("model_tester")]
    grown = {}
    for obj in [tester] + [s for s in subs if s is not None]:
        hidden, heads = getattr(obj, "hidden_size", None), getattr(obj, "num_attention_heads", None)
        if not (isinstance(hidden, int) and isinstance(heads, int)) or heads <= 0 or hidden // heads >= head_dim:
            continue
        new_heads = max(1, hidden // head_dim)
        obj.num_attention_heads = new_heads
        if hidden < head_dim:
            obj.hidden_size = head_dim
            grown[hidden] = head_dim
    if grown and "num_attention_heads" not in vars(tester) and vars(tester).get("hidden_size") in grown:
        tester.hidden_size = grown[tester.hidden_size]


def install(mode: str):
    """Switch clipfast on for every model built from now on, as ``mode`` says ("baseline": nothing).
    Returns a function that switches it off again."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "baseline":
        return lambda: None
    from transformers.modeling_utils import PreTrainedModel

    name = "post_init" if mode == "patch" else "get_correct_attn_implementation"
    original = PreTrainedModel.__dict__[name]
    setattr(PreTrainedModel, name, (_patching_post_init if mode == "patch" else _clipfast_by_default)(original))
    return lambda: setattr(PreTrainedModel, name, original)


def _patching_post_init(original):
    import clipfast

    @functools.wraps(original)
    def post_init(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        clipfast.patch(self)
        return result

    return post_init


def _clipfast_by_default(original):
    from clipfast.integrations import hf

    if not hf.register():
        raise RuntimeError("this transformers version has no attention interface to register clipfast in")

    @functools.wraps(original)
    def get_correct_attn_implementation(self, requested_attention, *args, **kwargs):
        if requested_attention in (None, "sdpa") and getattr(self, "_supports_attention_backend", False):
            requested_attention = hf.NAME
        return original(self, requested_attention, *args, **kwargs)

    return get_correct_attn_implementation


# ----------------------------------------------------------------------------------------------
# runner
# ----------------------------------------------------------------------------------------------

def read_junit(path: Path) -> dict[str, str]:
    """{test id: "passed" | "failed" | "skipped"} from a junit XML file (errors count as failures)."""
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            outcomes[test_id] = "failed"
        elif "skipped" in kinds:
            outcomes[test_id] = "skipped"
        else:
            outcomes[test_id] = "passed"
    return outcomes


def regressions(baseline: dict[str, str], other: dict[str, str]) -> list[str]:
    """Tests that pass in ``baseline`` and fail in ``other``. Only the tests ``other`` ran are compared (a
    reused baseline may cover more files or a wider ``-k``); a run that reported nothing at all (pytest
    crashed before writing its XML, e.g. a segmentation fault) fails every test."""
    if not other:
        return sorted(t for t, o in baseline.items() if o == "passed")
    return sorted(t for t, o in baseline.items() if o == "passed" and other.get(t) == "failed")


def _group(test_id: str) -> str:
    """The test file a junit test id belongs to (``tests.models.clip.test_modeling_clip.CLIPModelTest::x`` ->
    ``clip/test_modeling_clip``)."""
    parts = test_id.split("::")[0].split(".")
    modules = [p for p in parts if p.startswith("test_")]
    if modules:
        i = parts.index(modules[0])
        return "/".join(parts[max(0, i - 1):i + 1])
    return parts[0]


def run_mode(checkout: Path, files: list[str], mode: str, out_dir: Path, head_dim: int, keyword: str | None,
             extra: list[str]) -> dict[str, str]:
    junit = out_dir / f"{mode}.xml"
    cmd = [sys.executable, "-m", "pytest", "-p", "clipfast.testing.hf_parity", "-p", "no:cacheprovider",
           f"--clipfast-mode={mode}", f"--clipfast-head-dim={head_dim}", f"--junitxml={junit}", "-q",
           "-o", "junit_family=xunit1"]
    if keyword:
        cmd += ["-k", keyword]
    env = dict(os.environ)
    env.setdefault("CLIPFAST_DISPATCH", "kernel")
    if not _has_cuda():
        env.setdefault("TRITON_INTERPRET", "1")
    with open(out_dir / f"{mode}.log", "w") as log:
        subprocess.run(cmd + extra + files, cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT)
    return read_junit(junit) if junit.exists() else {}


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def summarize(results: dict[str, dict[str, str]]) -> tuple[str, int]:
    """The report text and the number of (mode, test) regressions (in ``attn`` mode, the tests of
    ``NAME_CHECKS`` are listed apart and not counted)."""
    baseline = results.get("baseline", {})
    failing, names = {}, {}
    for mode, outcomes in results.items():
        if mode == "baseline":
            continue
        tests = regressions(baseline, outcomes)
        names[mode] = [t for t in tests if mode == "attn" and t.split("::")[-1] in NAME_CHECKS]
        failing[mode] = [t for t in tests if t not in names[mode]]
    header = f"{'test file':40s} {'baseline pass':>13s}" + "".join(f" {m + ' fail':>12s}" for m in failing)
    lines = [header, "-" * len(header)]
    ran = {t for mode, r in results.items() if mode != "baseline" for t in r} or set(baseline)
    for g in sorted({_group(t) for r in results.values() for t in r}):
        passed = sum(1 for t, o in baseline.items() if o == "passed" and _group(t) == g and t in ran)
        lines.append(f"{g:40s} {passed:13d}" + "".join(f" {sum(1 for t in f if _group(t) == g):12d}"
                                                       for f in failing.values()))
    for mode, tests in failing.items():
        lines.append(f"\n{mode}: {len(tests)} test(s) pass without clipfast and fail with it")
        lines += [f"  {t}" for t in tests]
        if names[mode]:
            lines.append(f"{mode}: {len(names[mode])} more assert the implementation name (not counted)")
            lines += [f"  {t}" for t in names[mode]]
    return "\n".join(lines), sum(len(t) for t in failing.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipfast.testing.hf_parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="a transformers checkout (the folder holding tests/)")
    parser.add_argument("files", nargs="+", help="test files or node ids, relative to CHECKOUT")
    parser.add_argument("--modes", default="baseline,patch,attn", help="comma-separated, from " + ", ".join(MODES))
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression (the same in every mode)")
    parser.add_argument("--head-dim", type=int, default=_DEFAULT_HEAD_DIM)
    parser.add_argument("--out", type=Path, default=Path("hf_parity_out"), help="junit XML and logs per mode")
    parser.add_argument("--reuse", action="store_true",
                        help="read a mode's junit XML from an earlier run in --out instead of running it again")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"--modes: unknown mode(s) {unknown}; choose from {list(MODES)}")
    if "baseline" not in modes:
        modes.insert(0, "baseline")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for mode in modes:
        junit = args.out / f"{mode}.xml"
        if args.reuse and junit.exists():
            results[mode] = read_junit(junit)
            continue
        print(f"[hf_parity] {mode} ...", flush=True)
        results[mode] = run_mode(args.checkout.resolve(), args.files, mode, args.out.resolve(), args.head_dim,
                                 args.keyword, extra)
    text, total = summarize(results)
    print(text)
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
