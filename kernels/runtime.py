"""Runtime helpers shared by every kernel: one place for the interpreter switch, autotuning,
device queries, dtype names, output allocation (with poisoning for tests) and AOT case records.

Nothing here knows about autograd or nn; ``clipfast`` builds on these.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import triton

from . import configs as config_policy
from . import environment
# The device queries (``environment``), asked through this module by every kernel: tests and planning
# replace them here.
from .environment import capability, sm_count  # noqa: F401

# Triton reads TRITON_INTERPRET when a kernel is decorated, so the value at import time is what counts.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Triton's names for pointer element types in AOT signatures.
TRITON_TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8"}

# The largest grid dimension 1 and 2 CUDA accepts; dimension 0 takes 2**31 - 1.
MAX_GRID_YZ = 65535


# Register allocation differs between Triton versions (3.6 spills where 3.8 does not): the few tiles that
# need it are chosen per version with this, and `clipfast aot` checks them under each.
TRITON_VERSION: tuple[int, int] = tuple(int(p) for p in triton.__version__.split(".")[:2])


def triton_at_least(major: int, minor: int) -> bool:
    return TRITON_VERSION >= (major, minor)


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ---------------------------------------------------------------------------------------------
# Autotuning
# ---------------------------------------------------------------------------------------------

# The autotune policy (``kernels/configs.py``): by default one config per kernel, autotune key and
# architecture (a table entry, else the kernel's heuristic default: the first config its pruning keeps),
# timed by nothing; CLIPFAST_AUTOTUNE=max times every config the pruning offers and keeps the results on
# disk; CLIPFAST_AUTOTUNE=0 runs the heuristic default without tables.
AUTOTUNE: bool = config_policy.mode() != "0"


def _untimed(kernel_call, quantiles=None, **kwargs):
    """Benchmark stand-in that runs nothing: every config ties, and the autotuner keeps the first."""
    return [0.0] * len(quantiles) if quantiles else 0.0


def autotune(configs: list[triton.Config], key: list[str], **kwargs: Any) -> Callable:
    """``triton.autotune`` under the autotune policy (``kernels/configs.py``): the kernel's
    ``early_config_prune`` is wrapped so it returns the one config the policy chooses (all it offers in
    ``max`` mode), and the benchmark function times nothing where one config is left.

    Under the interpreter the list collapses to the first config (several configs crash it: it has no
    driver to benchmark with), so the interpreter runs exactly the first shipped config (``forced_config``
    runs any other), except while planning precompiles for a target architecture
    (``CLIPFAST_TARGET_ARCH``, ``clipfast warm``), where the policy chooses as on that GPU. Every kernel that
    autotunes goes through here. The full list stays reachable as ``kernel.shipped_configs`` for the AOT
    check, the policy as ``kernel.policy`` (``kernel.policy.offered``: the kernel's own pruning).
    """
    planning = INTERPRET and config_policy.target_arch() is not None
    chosen = configs[:1] if INTERPRET and not planning else configs
    policy = None
    if not AUTOTUNE:
        kwargs.setdefault("do_bench", _untimed)
    if len(chosen) > 1:
        prune_by = dict(kwargs.pop("prune_configs_by", None) or {})
        policy = config_policy.Policy("", key, prune_by.get("early_config_prune"), kwargs.get("do_bench"),
                                      arch_of=launch_arch)
        kwargs["prune_configs_by"] = {**prune_by, "early_config_prune": policy.prune}
        if AUTOTUNE:
            kwargs["do_bench"] = policy.do_bench

    def decorate(fn):
        tuned = triton.autotune(chosen, key=key, **kwargs)(fn)
        tuned.shipped_configs = list(configs)
        if policy is not None:
            policy.name = config_policy.kernel_name(fn)
            config_policy.install(tuned, policy)
        return tuned

    return decorate


@contextlib.contextmanager
def forced_config(kernel, config: triton.Config):
    """Inside the block, the autotuned ``kernel`` runs ``config`` and nothing else (no pruning, no timing):
    how tests run every shipped tile, on a GPU and under the interpreter, instead of only the one the
    autotuner picks. The launch is otherwise the normal one (same launcher, grid and arguments)."""
    saved = kernel.configs
    kernel.configs = [config]
    try:
        yield
    finally:
        kernel.configs = saved


def seqlen_bucket(n: int) -> int:
    """A sequence length rounded up for autotune keys, so nearby lengths share one tuning: to a multiple
    of 32 up to 1024 (as FlashAttention's Triton kernel keys on ``seqlen // 32``), then to a power of two.
    CLIP's 50, 77, 197, 257, 577 map to 64, 96, 224, 288, 608; padded text lengths 60-64 share 64."""
    n = max(int(n), 1)
    return cdiv(n, 32) * 32 if n <= 1024 else next_power_of_2(n)


def jit_function(kernel) -> "triton.runtime.jit.JITFunction":
    """The bare ``@triton.jit`` function under any number of autotune/heuristics wrappers."""
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------

# Dtypes the interpreter computes wrongly: it runs bf16 arithmetic and ``tl.dot`` on the raw bits
# (triton issue #11584), so under the interpreter these take the eager reference.
INTERPRETER_WRONG_DTYPES = (torch.bfloat16,)


def uses_triton(t: torch.Tensor) -> bool:
    """Whether a tensor's op should run the Triton kernels: CUDA tensors, or CPU tensors under the
    interpreter in a dtype it computes right. Anything else (CPU without the interpreter, MPS, bf16 under
    the interpreter, ...) takes the eager reference; the bf16 case says so once."""
    if t.is_cuda:
        return True
    if not (INTERPRET and t.device.type == "cpu"):
        return False
    if t.dtype in INTERPRETER_WRONG_DTYPES:
        environment.warn_once(f"interpreter_{t.dtype}", f"the Triton interpreter computes {t.dtype} wrongly: "
                  "this op runs in eager PyTorch (on a GPU the kernels run)")
        return False
    return True


def on_tensor_device(launcher: Callable) -> Callable:
    """Decorator for every function that launches a kernel: it runs on the device of its first tensor
    argument, whatever the current CUDA device is (Triton launches on the current device and its stream;
    a model on ``cuda:1`` under ``device_map="auto"`` or pipeline parallelism must not launch on ``cuda:0``).
    Scratch memory allocated inside with ``device="cuda"`` lands there too. Costs one device query when the
    tensors are on the current device, nothing on CPU."""
    @functools.wraps(launcher)
    def run(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if t is None or t.device.type != "cuda" or t.device.index in (None, torch.cuda.current_device()):
            return launcher(*args, **kwargs)
        with torch.cuda.device(t.device):
            return launcher(*args, **kwargs)
    run.on_tensor_device = True
    return run


def device_arch(device: torch.device) -> int:
    """10 x major + minor of ``device``'s compute capability (``capability``): 90 for sm_90; 0 for a device
    that is not a GPU (the interpreter), unless planning stands in for one."""
    major, minor = capability(device)
    return 10 * major + minor


def launch_arch(named_args: dict, operand: str | None = None) -> int:
    """``device_arch`` of a launch: of its ``operand`` argument, or of its first tensor argument; 0 where that
    is not a tensor. What every pruning function and the config tables key on."""
    t = named_args.get(operand) if operand is not None else next(
        (v for v in named_args.values() if isinstance(v, torch.Tensor)), None)
    return device_arch(t.device) if isinstance(t, torch.Tensor) else 0


# ---------------------------------------------------------------------------------------------
# Matmul precision
# ---------------------------------------------------------------------------------------------

def torch_allows_tf32() -> bool:
    """Whether torch lets fp32 matmuls use TF32: ``torch.backends.cuda.matmul.fp32_precision`` where it is set
    ("tf32" / "ieee"), else ``torch.get_float32_matmul_precision() != "highest"`` (what
    ``torch.backends.cuda.matmul.allow_tf32`` and ``set_float32_matmul_precision`` set). The legacy getter
    raises once the newer API was used for any backend (then the matmul setting is its default: no TF32)."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:
        return False


def dot_precision(dtype: torch.dtype) -> str:
    """The ``input_precision`` of every ``tl.dot`` on operands of ``dtype``: the one TF32 policy of the kernels.
    fp32 operands follow torch's fp32 matmul setting (``torch_allows_tf32``): "tf32" where torch lets eager
    matmuls use TF32 (``torch.backends.cuda.matmul.allow_tf32``, ``set_float32_matmul_precision("high")``),
    else "ieee" (exact fp32 products, as eager by default); always "ieee" under the interpreter. fp16/bf16
    operands: "tf32" (Triton ignores it for them)."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if not INTERPRET and torch_allows_tf32() else "ieee"


# ---------------------------------------------------------------------------------------------
# Shared memory per block: the limit, and the estimate tiles are offered by
# ---------------------------------------------------------------------------------------------

# The most shared memory one block may use, in bytes, per architecture (10 x major + minor): the opt-in
# maximum per block (cudaDevAttrMaxSharedMemoryPerBlockOptin, the CUDA programming guide's "maximum amount of
# shared memory per thread block"), which Triton compares a compiled kernel's ``shared`` with at launch
# (OutOfResources above it). A100 / A30 / Orin 163 KB, consumer Ampere / Ada / Blackwell 99 KB, H100 / H200 /
# B200 227 KB. `clipfast aot` fails a compile above its architecture's entry; the offer rules keep every
# tile's estimate (``gemm_shared_estimate``) under it.
MAX_SHARED_PER_BLOCK: dict[int, int] = {
    70: 96 * 1024, 75: 64 * 1024,
    80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024,
    90: 227 * 1024, 100: 227 * 1024, 103: 227 * 1024, 120: 99 * 1024,
}


def max_shared_per_block(arch: int) -> int | None:
    """``MAX_SHARED_PER_BLOCK`` for ``arch`` (10 x major + minor). None for arch 0 (not a GPU: the
    interpreter has no limit). An architecture not in the table gets the smallest entry of its major
    generation, or of sm_80 and newer for an unknown generation (conservative)."""
    if arch <= 0:
        return None
    if arch in MAX_SHARED_PER_BLOCK:
        return MAX_SHARED_PER_BLOCK[arch]
    same_major = [v for a, v in MAX_SHARED_PER_BLOCK.items() if a // 10 == arch // 10]
    return min(same_major or [v for a, v in MAX_SHARED_PER_BLOCK.items() if a >= 80])


# Barriers and other small scratch Triton places next to the operand buffers (measured: 16-56 bytes).
SHARED_SCRATCH_ALLOWANCE = 256


def gemm_shared_estimate(block_m: int, block_n: int, block_k: int, stages: int, element_size: int,
                         epilogue_bytes: int = 0) -> int:
    """An upper bound on the shared memory of a software-pipelined GEMM tile, in bytes: ``stages`` buffers of
    the [block_m, block_k] and [block_k, block_n] operand tiles in ``element_size``-byte elements, plus
    ``epilogue_bytes`` (the accumulator slice the epilogue stages through shared memory) and
    ``SHARED_SCRATCH_ALLOWANCE``. Triton allocates ``stages`` operand buffers for wgmma (sm_90) and
    ``stages - 1`` for cp.async pipelines (sm_80), and reuses the operand buffers for the epilogue where the
    loop has ended (not in persistent kernels that prefetch the next tile), so this is conservative;
    `clipfast aot` fails a case whose compiled ``shared`` exceeds its case's estimate."""
    return stages * (block_m * block_k + block_k * block_n) * element_size + epilogue_bytes + SHARED_SCRATCH_ALLOWANCE


def fits_shared_memory(estimate: int, arch: int) -> bool:
    """Whether a tile estimated at ``estimate`` bytes of shared memory may be offered on ``arch``
    (always on arch 0, the interpreter)."""
    limit = max_shared_per_block(arch)
    return limit is None or estimate <= limit


# Bytes per element of the dtypes the kernels take, by torch dtype and by Triton type name (AOT cases).
ELEMENT_SIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.uint8: 1,
                "fp32": 4, "fp16": 2, "bf16": 2, "u8": 1}


# ---------------------------------------------------------------------------------------------
# Output allocation
# ---------------------------------------------------------------------------------------------

_POISON = os.environ.get("CLIPFAST_POISON_OUTPUTS", "0") == "1"


def set_poison_outputs(enabled: bool) -> bool:
    """Fill every kernel output with NaN (ints with -1) before the kernel writes it, so an element a
    kernel forgets to write fails a test instead of passing by luck. Returns the previous setting."""
    global _POISON
    previous, _POISON = _POISON, bool(enabled)
    return previous


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output (poisoned when testing)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _POISON:
        out.fill_(float("nan") if dtype.is_floating_point else -1)
    return out


# ---------------------------------------------------------------------------------------------
# AOT cases
# ---------------------------------------------------------------------------------------------

@dataclass
class AotCase:
    """One compile of one kernel at one shipped configuration, declared next to the kernel.

    ``signature`` maps every non-constexpr argument to a Triton type ("*fp16", "i32", "fp32", ...);
    ``{dtype}`` in a type is replaced by the case's dtype ("fp16" / "bf16", or "fp32" for the tiles the
    offer rules give fp32). ``constexprs`` holds the constexpr arguments, including the config's
    meta-parameters. ``shared_estimate``: the bytes of shared memory the offer rules estimate for the
    configuration (in the case's dtypes); `clipfast aot` fails a compile that uses more (the estimate would
    not be an upper bound), as it fails one over its architecture's ``MAX_SHARED_PER_BLOCK``.
    """

    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    expects_mma: bool = False
    expects_tma: bool = False  # loads through tensor descriptors: TMA (UTMALDG) on sm_90 and newer
    dtypes: tuple[str, ...] = ("fp16", "bf16")
    quick: bool = True  # part of the quick subset CI runs
    tags: dict[str, Any] = field(default_factory=dict)
    # Arguments compiled as multiples of 16 (bytes for pointers, value for integers), as the JIT specializes
    # them at run time: torch allocations are 16-byte aligned and CLIP's widths and strides are multiples of
    # 16. None means every pointer argument; () compiles with no alignment assumption at all.
    divisible_by_16: tuple[str, ...] | None = None
    # The architectures (80, 90, ...) the configuration ships for; None means every one the check covers.
    archs: tuple[int, ...] | None = None
    shared_estimate: int | None = None

    def aligned_args(self) -> tuple[str, ...]:
        if self.divisible_by_16 is not None:
            return tuple(self.divisible_by_16)
        return tuple(k for k, v in self.signature.items() if v.startswith("*"))

    def config_text(self) -> str:
        # tile meta-parameters only; feature flags (HAS_*, IS_*) are part of the case name
        meta = ",".join(f"{k}={v}" for k, v in self.constexprs.items()
                        if k.isupper() and not k.startswith(("HAS_", "IS_")))
        return f"{meta},w{self.num_warps},s{self.num_stages}"


def cases_from_configs(name: str, kernel, signature: dict[str, str], constexprs: dict[str, Any],
                       expects_mma: bool = False, quick_first_only: bool = True) -> list[AotCase]:
    """One AOT case per shipped autotune config of ``kernel``."""
    cases = []
    for i, cfg in enumerate(kernel.shipped_configs):
        cases.append(AotCase(
            name=name, kernel=jit_function(kernel), signature=signature,
            constexprs={**constexprs, **cfg.kwargs}, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            expects_mma=expects_mma, quick=(i == 0) or not quick_first_only,
        ))
    return cases
