"""The GPU check's steps, in priority order with their shares of the budget, and which benchmark cases of
``clipfast.benchmarks`` (and which of their implementations) each benchmark step runs: the headline picks
(``HEADLINE``) first, every remaining case and implementation once in ``rest_bench``, and the kernel-level
cases once more, untimed, in the compile step (``plan``). The correctness step's order of tests is here too
(``correctness_plan``: bf16 first in every shard)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..benchmarks import case_modules


@dataclass(frozen=True)
class Pick:
    """Benchmark cases of one family whose name matches ``gpu`` (at GPU shapes) or ``smoke`` (rehearsal),
    with the implementations to run (None: all, torch.compile of the eager one included)."""
    family: str
    gpu: str
    smoke: str
    impls: tuple[str, ...] | None = None

    def matches(self, case, smoke: bool) -> bool:
        module_family = getattr(case, "module_family", case.family)
        return module_family == self.family and re.search(self.smoke if smoke else self.gpu, case.name) is not None


# The headline timings (priority 2), side by side in one run. Whole-model torch.compile is its own step.
HEADLINE = {
    "headline_kernels": [
        Pick("attention", r"^ViT-B/16 B=256 H=12 S=197 D=64$", r"^smoke .*S=65 "),
        Pick("attention", r"^text B=256 H=8 S=77 D=64 causal$", r"^smoke .*causal$"),
        Pick("mlp", r"^fc\+QuickGELU\+proj ViT-B/16 ", r"^fc\+QuickGELU\+proj smoke"),
        Pick("layer_norm", r"^ViT-B/16 ", r"^smoke"),
        Pick("layer_norm", r"^add\+LN ViT-B/16 ", r"^add\+LN smoke"),
        Pick("contrastive_loss", r"^CLIP loss N=32768 d=512$", r"^CLIP loss"),
        Pick("local_loss", r"^local loss N=256 M=32768 ", r"^local loss"),
        Pick("host_overhead", r"", r""),
    ],
    "headline_model": [
        Pick("model", r"^ViT-B-16 (training step|image encoding) ", r"^tiny ", impls=("clipfast", "eager")),
    ],
    "headline_model_compiled": [  # the two whole-model compiles of the run
        Pick("model", r"^ViT-B-16 training step ", r"^tiny training step ",
             impls=("torch.compile", "clipfast+torch.compile")),
    ],
}
WHOLE_MODEL_FAMILIES = ("model", "integrations")


def bf16_first(entries: list[tuple[str, bool]]) -> list[str]:
    """Node ids, those flagged bf16 first, each group in its collected order."""
    return [n for n, bf16 in entries if bf16] + [n for n, bf16 in entries if not bf16]


def correctness_plan(entries: list[tuple[str, bool]], shards: int) -> list[list[str]]:
    """The correctness step's tests per shard (process), as ``pytest_plugin`` splits them: bf16 first
    (``CLIPFAST_SUITE_ORDER=bf16-first``), then every ``shards``-th test per shard, so every shard starts
    with its share of the bf16 checks. The rehearsal collects the same bf16 tests (skipped: the interpreter
    gets bf16 wrong), so its recorded plan is the GPU's order."""
    ordered = bf16_first(entries)
    return [ordered[i::shards] for i in range(shards)]


@dataclass(frozen=True)
class Step:
    name: str
    kind: str      # "warm", "pytest", "bench" or "tune"
    share: float   # of the whole budget; the last step takes whatever is left
    args: tuple[str, ...] = ()


# Runs beside the compile and correctness steps (its share counts on top of the compile step's budget)
BACKGROUND_STEP = Step("warm_models", "warm", 0.0)
BACKGROUND_SHARE = 0.22

STEPS = (
    Step("warm", "warm", 0.14),
    Step("correctness", "pytest", 0.22, ("tests", "-m", "gpu or gpu_suite")),
    Step("headline_kernels", "bench", 0.16),
    Step("headline_model", "bench", 0.07),
    Step("headline_model_compiled", "bench", 0.20),
    Step("tune_kernels", "tune", 0.08),
    Step("rest_tests", "pytest", 0.10, ("tests", "-m", "not gpu and not gpu_suite")),
    Step("rest_bench", "bench", 1.0),
)


# ------------------------------------------------------------------------------------------------
# Plans: which (case, implementations) a step runs
# ------------------------------------------------------------------------------------------------

def cases_by_module(smoke: bool, families=None):
    """Every case, kernel families first and whole-model families last, each tagged with the name of its
    case module (the family ``clipfast bench`` and the picks select by); ``families``: those modules only."""
    found = []
    modules = sorted(case_modules(), key=lambda m: m.__name__.rsplit(".", 1)[-1] in WHOLE_MODEL_FAMILIES)
    for module in modules:
        family = module.__name__.rsplit(".", 1)[-1]
        if families is not None and family not in families:
            continue  # building some modules' cases imports optional packages (seconds per process)
        for case in module.cases(smoke):
            case.module_family = family
            found.append(case)
    return found


def impl_names(case, smoke: bool) -> list[str]:
    names = list(case.impls)
    if case.compile_impl and not smoke:
        names.append("torch.compile")
    return names


def whole_model_compile(case, impl: str) -> bool:
    """A torch.compile of a whole model (minutes each): only the headline's two run in the check."""
    return case.module_family in WHOLE_MODEL_FAMILIES and "torch.compile" in impl


def plan(step: str, smoke: bool, cases=None) -> list[tuple]:
    """``[(case, [implementation names])]`` for a benchmark step (or ``warm``). A headline step's plan only
    depends on the cases of its picks' families (claims are per case), so only those are built for it."""
    if cases is None:
        cases = cases_by_module(smoke, {p.family for p in HEADLINE[step]} if step in HEADLINE else None)
    claimed: dict[int, set] = {}
    picked: dict[str, list] = {}
    for name, picks in HEADLINE.items():
        picked[name] = []
        for case in cases:
            for pick in picks:
                if pick.matches(case, smoke):
                    impls = [i for i in impl_names(case, smoke) if pick.impls is None or i in pick.impls]
                    impls = [i for i in impls if i not in claimed.get(id(case), set())]
                    if impls:
                        claimed.setdefault(id(case), set()).update(impls)
                        picked[name].append((case, impls))
    if step in picked:
        return picked[step]
    rest = [(case, [i for i in impl_names(case, smoke) if i not in claimed.get(id(case), set())
                    and not whole_model_compile(case, i)]) for case in cases]
    rest = [(case, impls) for case, impls in rest if impls]
    if step == "rest_bench":
        return rest
    if step == "warm":
        kernel_level = [(c, i) for c, i in picked["headline_kernels"] + rest
                        if c.module_family not in WHOLE_MODEL_FAMILIES]
        headline = {id(c) for c, _ in picked["headline_kernels"]}
        # clipfast everywhere; torch.compile only where it is timed first (the headline kernel cases)
        chosen = [(c, [i for i in impls if i == "clipfast" or (i == "torch.compile" and id(c) in headline)])
                  for c, impls in kernel_level]
        return [(c, impls) for c, impls in chosen if impls]
    raise ValueError(f"unknown step {step!r}")
