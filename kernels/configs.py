"""Which config each autotuned kernel runs: the autotune policy, the config tables and the kept results.

``CLIPFAST_AUTOTUNE`` (read at import; ``set_mode`` changes it in a process):

- unset (``default``): each autotuned kernel runs ONE config per kernel, autotune key and architecture,
  timed by nothing: the user's table entry (``clipfast tune --kernels``), else the shipped table's
  (``kernels/configs/sm<arch>.json``, a section per GPU model where one was measured, then the
  architecture's), else the kernel's heuristic default: the first config its own pruning keeps (the
  rules that order its tiles). The first launch without a table entry says once which default it runs.
- ``max``: the autotuner times every config the pruning offers (the lists are those of the kernel's own
  pruning). Results are kept on disk (``autotune-results.json`` under ``clipfast.kernels.environment.cache_dir()``,
  keyed by GPU, versions, kernel, offered config set and autotune key), so another process at the same
  shapes times nothing.
- ``0``: the heuristic default, no tables, nothing timed.

Under the Triton interpreter each kernel has one config (the first shipped) and none of this applies,
except while planning precompiles (``CLIPFAST_TARGET_ARCH``, ``clipfast warm``): then the policy runs as on
a GPU of that architecture, timing nothing.

Table format (shipped ``sm90.json`` and the user's ``autotune-table.json``): a config record is
``{"kwargs": {...}, "num_warps": w, "num_stages": s}``; records are found by kernel name
(``family.kernel``, e.g. ``mlp._gemm_kernel``) and key text (``key_text``: the autotune key's values and
the first operand's dtype, e.g. ``M_BUCKET=4096,N=3072,...,dtype=bf16``).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from typing import Any, Callable

import torch

from .environment import cache_dir, set_target, versions, warn_once

ENV_MODE = "CLIPFAST_AUTOTUNE"
ENV_TARGET_ARCH = "CLIPFAST_TARGET_ARCH"
MODES = ("default", "max", "0")
TABLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
USER_TABLE = "autotune-table.json"
RESULTS = "autotune-results.json"
FORMAT = 1
TUNE_HINT = "run `clipfast tune --kernels MODEL` on this GPU to tune it (or CLIPFAST_AUTOTUNE=max)"


def parse_mode(text: str | None) -> str:
    text = (text or "").strip().lower()
    if text in ("", "1", "default", "on", "table"):
        return "default"
    if text in ("0", "off", "false", "no"):
        return "0"
    if text == "max":
        return "max"
    raise ValueError(f"{ENV_MODE}={text!r}: expected unset, 0 or max")


_mode = parse_mode(os.environ.get(ENV_MODE))


def mode() -> str:
    return _mode


def set_mode(new: str) -> str:
    """Switch the autotune mode in this process (what ``CLIPFAST_AUTOTUNE`` sets); returns the previous."""
    global _mode
    previous, _mode = _mode, parse_mode(new)
    return previous


def target_arch() -> int | None:
    """The architecture (10 x major + minor) precompile planning forces for non-CUDA tensors, or None."""
    text = os.environ.get(ENV_TARGET_ARCH, "").strip()
    return int(text) if text else None


_target_gpu: str | None = None


def install_target(arch: int, sm_count: int | None = None, gpu: str | None = None) -> None:
    """Planning: the device queries (``environment.capability`` / ``sm_count``) answer ``arch`` (and its usual
    SM count) for non-CUDA tensors, as a GPU of that architecture would (``gpu``: its name, for the tables' GPU
    sections and the user's table). CUDA tensors keep their real answers."""
    global _target_gpu
    _target_gpu = gpu
    set_target(arch, sm_count)


# ---------------------------------------------------------------------------------------------
# Config records and keys
# ---------------------------------------------------------------------------------------------

def config_record(cfg) -> dict:
    return {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def matches(cfg, record: dict) -> bool:
    return (dict(cfg.kwargs) == record.get("kwargs") and cfg.num_warps == record.get("num_warps")
            and cfg.num_stages == record.get("num_stages"))


def config_text(cfg) -> str:
    return ",".join(f"{k}={v}" for k, v in cfg.kwargs.items()) + f",w{cfg.num_warps},s{cfg.num_stages}"


def config_set_hash(configs) -> str:
    text = ";".join(json.dumps(config_record(c), sort_keys=True, default=str) for c in configs)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _first_tensor(args: dict):
    return next((v for v in args.values() if isinstance(v, torch.Tensor)), None)


def key_text(key: list[str], args: dict) -> str:
    """A launch's autotune key as table text: the key arguments' values and the first operand's dtype."""
    parts = [f"{k}={args[k]}" for k in key if k in args]
    t = _first_tensor(args)
    if t is not None:
        parts.append(f"dtype={str(t.dtype).replace('torch.', '')}")
    return ",".join(parts)


_gpu_names: dict[int, str] = {}


def _gpu_name(args: dict) -> str | None:
    t = _first_tensor(args)
    if t is None or t.device.type != "cuda":
        return _target_gpu if t is not None else None
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if index not in _gpu_names:
        _gpu_names[index] = torch.cuda.get_device_name(index)
    return _gpu_names[index]


def environment(gpu: str | None) -> str:
    """A user table / results section: the GPU name and the versions a timing depends on."""
    return "|".join([gpu or "cpu"] + [f"{k} {v}" for k, v in versions().items()])


def _cache_file(name: str) -> str:
    return os.path.join(cache_dir(), name)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_merged(path: str, section: str, entries: dict) -> None:
    """Merge ``entries`` into ``{"format", "environments": {section: {...}}}`` on disk (atomically)."""
    data = _read_json(path)
    if data.get("format") != FORMAT:
        data = {"format": FORMAT, "environments": {}}
    envs = data.setdefault("environments", {})
    envs.setdefault(section, {}).update(entries)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

_shipped: dict[int, dict] = {}
_user: dict[str, dict] = {}  # section -> {kernel: {key: record}}, read once per process
_lock = threading.Lock()


def shipped_table(arch: int) -> dict:
    """``kernels/configs/sm<arch>.json``: ``{"entries": {kernel: {key: record}}, "gpus": {name: {kernel:
    {key: record}}}}`` ({} where none ships)."""
    if arch not in _shipped:
        _shipped[arch] = _read_json(os.path.join(TABLE_DIR, f"sm{arch}.json"))
    return _shipped[arch]


def _cached_section(memo: dict, filename: str, gpu: str | None) -> dict:
    """This GPU's and these versions' section of the cache file ``filename``, read once per process."""
    section = environment(gpu)
    with _lock:
        if section not in memo:
            memo[section] = _read_json(_cache_file(filename)).get("environments", {}).get(section, {})
        return memo[section]


def user_table(gpu: str | None) -> dict:
    return _cached_section(_user, USER_TABLE, gpu)


def lookup(kernel: str, key: str, arch: int, gpu: str | None) -> tuple[dict | None, str]:
    """The table record for one launch and where it came from: the user's table for this GPU and these
    versions, then the shipped table's section for this GPU model, then the architecture's."""
    if gpu is not None:
        record = user_table(gpu).get(kernel, {}).get(key)
        if record:
            return record, "user table"
    table = shipped_table(arch)
    if gpu is not None:
        record = table.get("gpus", {}).get(gpu, {}).get(kernel, {}).get(key)
        if record:
            return record, f"shipped table ({gpu})"
    record = table.get("entries", {}).get(kernel, {}).get(key)
    return (record, f"shipped table (sm_{arch})") if record else (None, "")


def write_user_table(gpu: str, entries: dict) -> str:
    """Merge ``{kernel: {key: record}}`` into the user's table for ``gpu`` and these versions."""
    path = _cache_file(USER_TABLE)
    section = environment(gpu)
    data = _read_json(path).get("environments", {}).get(section, {})
    for kernel, by_key in entries.items():
        data.setdefault(kernel, {}).update(by_key)
    _write_merged(path, section, data)
    with _lock:
        _user.pop(section, None)
    return path


def clear_caches() -> None:
    """Forget the tables and results read in this process (tests; after writing a table)."""
    with _lock:
        _shipped.clear()
        _user.clear()
        _results.clear()


# ---------------------------------------------------------------------------------------------
# Autotune results kept on disk (max mode)
# ---------------------------------------------------------------------------------------------

_results: dict[str, dict] = {}
# every (kernel, key) max mode chose in this process: what `clipfast tune --kernels` writes
tuned_in_process: list[dict] = []


def _results_section(gpu: str | None) -> dict:
    return _cached_section(_results, RESULTS, gpu)


def kept_result(kernel: str, set_hash: str, key: str, gpu: str | None) -> dict | None:
    return _results_section(gpu).get(f"{kernel}|{set_hash}|{key}")


def keep_result(kernel: str, set_hash: str, key: str, gpu: str | None, record: dict, timings: dict) -> None:
    entry = {"config": record, "ms": timings}
    _results_section(gpu)[f"{kernel}|{set_hash}|{key}"] = entry
    try:
        _write_merged(_cache_file(RESULTS), environment(gpu), {f"{kernel}|{set_hash}|{key}": entry})
    except OSError as exc:  # a read-only cache dir costs re-tuning, nothing else

        warn_once("autotune_results_write", f"could not keep autotune results in {_cache_file(RESULTS)}: {exc}")


# ---------------------------------------------------------------------------------------------
# The policy, installed by ``runtime.autotune``
# ---------------------------------------------------------------------------------------------

def _untimed(kernel_call, quantiles=None, **kwargs):
    return [0.0] * len(quantiles) if quantiles else 0.0


def _timed(kernel_call, quantiles=None, **kwargs):
    from triton.runtime import driver

    return driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)


def kernel_name(fn) -> str:
    name = getattr(fn, "__name__", None) or fn.fn.__name__
    module = getattr(fn, "module", None) or getattr(fn, "__module__", "") or ""
    if not module or module.startswith("triton"):
        module = getattr(getattr(fn, "fn", None), "__module__", "") or ""
    return f"{module.rsplit('.', 1)[-1]}.{name}" if module else name


def _no_arch(args: dict) -> int:
    return 0


class Policy:
    """The per-kernel state of the policy: the kernel's own pruning (``offered``), the early_config_prune
    that returns one config outside ``max`` mode, and the benchmark function that times nothing when one
    config is left (triton 3.6 benchmarks even a single pruned config). ``arch_of``: a launch's architecture
    (10 x major + minor) from its arguments, which the tables are looked up by (``runtime.launch_arch``)."""

    def __init__(self, name: str, key: list[str], prune: Callable | None, do_bench: Callable | None,
                 arch_of: Callable[[dict], int] = _no_arch):
        self.name, self.key, self._prune, self._do_bench = name, list(key), prune, do_bench
        self.arch_of = arch_of
        self.single = True
        self.pending: tuple | None = None  # max mode: (set hash, key text, gpu) being benchmarked
        self.listeners: list[Callable] = []  # planning: called with (kernel name, key text, offered, chosen)

    def offered(self, configs, named_args: dict, **kwargs) -> list:
        """The configs the kernel's own pruning offers this launch (today's autotune lists)."""
        return list(self._prune(configs, named_args, **kwargs)) if self._prune else list(configs)

    def choose(self, offered: list, args: dict, key: str) -> tuple[Any, str]:
        """The one config default mode runs and where it came from."""
        if mode() == "0":
            return offered[0], "heuristic default (CLIPFAST_AUTOTUNE=0)"
        record, source = lookup(self.name, key, self.arch_of(args), _gpu_name(args))
        if record is not None:
            for cfg in offered:
                if matches(cfg, record):
                    return cfg, source
        return offered[0], ""

    def prune(self, configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        offered = self.offered(configs, named_args, **kwargs)
        key = key_text(self.key, args)
        self.pending = None
        if mode() == "max":
            gpu, set_hash = _gpu_name(args), config_set_hash(offered)
            kept = kept_result(self.name, set_hash, key, gpu) if len(offered) > 1 else None
            hit = next((c for c in offered if kept and matches(c, kept["config"])), None)
            chosen = [hit] if hit is not None else offered
            if hit is not None or len(offered) == 1:
                tuned_in_process.append({"kernel": self.name, "key": key, "gpu": gpu,
                                         "config": config_record(chosen[0]), "ms": kept["ms"] if kept else {}})
            if hit is None and len(offered) > 1:
                self.pending = (set_hash, key, gpu)
        else:
            cfg, source = self.choose(offered, args, key)
            if not source and _first_tensor(args) is not None:
        
                arch = self.arch_of(args)
                warn_once(f"autotune_default_{self.name}",
                          f"no tuned config for {self.name} at {key} on "
                          f"{_gpu_name(args) or f'sm_{arch}'}: running its default {config_text(cfg)}; {TUNE_HINT}")
            chosen = [cfg]
        self.single = len(chosen) == 1
        for listener in self.listeners:
            listener(self.name, key, offered, chosen)
        return chosen

    def do_bench(self, kernel_call, quantiles=None, **kwargs):
        if self.single or mode() != "max" or (self._do_bench is None and target_arch() is not None):
            return _untimed(kernel_call, quantiles=quantiles)  # planning has no GPU to time on
        return (self._do_bench or _timed)(kernel_call, quantiles=quantiles, **kwargs)

    def after_run(self, tuned) -> None:
        """Max mode, after a launch that benchmarked: keep the winner on disk."""
        if self.pending is None:
            return
        set_hash, key, gpu = self.pending
        self.pending = None
        best = getattr(tuned, "best_config", None)
        if best is None:
            return
        timings = {config_text(c): (t[0] if isinstance(t, (list, tuple)) else t)
                   for c, t in (getattr(tuned, "configs_timings", None) or {}).items()}
        keep_result(self.name, set_hash, key, gpu, config_record(best), timings)
        tuned_in_process.append({"kernel": self.name, "key": key, "gpu": gpu, "config": config_record(best),
                                 "ms": timings})


def install(tuned, policy: Policy) -> None:
    """Attach ``policy`` to the autotuned kernel: ``tuned.policy``, and a ``run`` that keeps max mode's
    results after a launch that benchmarked."""
    run = tuned.run

    def run_and_keep(*args, **kwargs):
        out = run(*args, **kwargs)
        policy.after_run(tuned)
        return out

    tuned.policy = policy
    tuned.run = run_and_keep
