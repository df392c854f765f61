"""Tiles as data: one ``Tile`` type for every kernel family, and one ``TileTable`` with the one filter that
offers a launch its tiles.

A ``Tile`` row names a kernel configuration (block sizes, warps, pipeline stages, further meta-parameters)
and where it ships: the GPU generations, the Triton versions ``[from, before)`` (register allocation differs
between versions, so a few tiles that spill under one are replaced under it by another row with the same
config), the operand dtypes, the padded head dims or feature widths (``BLOCK_D``), and the kinds of launch it
is kept from (``avoid``: members of the family's ``enum.Flag``, e.g. the GEMM's epilogues that spill at that
tile). A ``TileTable`` holds a kernel's rows, default first, with the family's shared-memory estimate (an upper
bound on what the compiler allocates, which ``clipfast aot`` checks) and the family's own offer rule, if any;
``offered`` is the autotuner's list for one ``Launch`` (architecture, operand dtype, kinds, BLOCK_D).

Nothing here knows a family: ``kernels/gemm.py`` (the MLP's GEMM), ``kernels/patch_embed.py``,
``kernels/contrastive_loss.py`` and ``kernels/layer_norm.py`` build their tables from it, and the attention
kernels' tables (``kernels/attention_common.py``) subclass ``TileTable`` with their own offer rules and estimate.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import triton

from . import runtime

HALF = ("fp16", "bf16")
FP32 = ("fp32",)
ANY_DTYPE = HALF + FP32
EVERY_TRITON = ((3, 0), (99, 0))
BEFORE_3_8 = ((3, 0), (3, 8))
FROM_3_8 = ((3, 8), (99, 0))


def dtype_name(dtype) -> str:
    """"fp16" / "bf16" / "fp32" for a torch dtype or such a name (the AOT check's dtype names)."""
    return dtype if isinstance(dtype, str) else runtime.TRITON_TYPE_NAMES[dtype]


def config_key(config: triton.Config) -> tuple:
    """What identifies a config: its meta-parameters, warps and stages (``Tile.key`` of its row)."""
    return tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages


@dataclass(frozen=True)
class Tile:
    """One shipped configuration of a kernel and where it is offered.

    ``block_m`` / ``block_n`` / ``block_k`` (None where the kernel has no reduction step of its own) are its
    BLOCK_M / BLOCK_N / BLOCK_K, ``meta`` its further meta-parameters as (name, value) pairs (GEMM epilogue
    slices and the persistent variant, attention's SPLIT_DV, the contrastive gradient's BLOCK_D), ``warps`` and
    ``stages`` its launch options. Where it ships: ``archs`` (compute capability majors: 8 Ampere, 9 Hopper;
    None: every one), ``tritons`` (``[from, before)``), ``dtypes`` (operand dtypes), ``block_ds`` (the BLOCK_D
    of the launches it is for; None: any) and ``avoid`` (launch kinds, members of the family's ``enum.Flag``,
    it is kept from; None: none)."""

    block_m: int
    block_n: int
    block_k: int | None = None
    warps: int = 4
    stages: int = 3
    meta: tuple[tuple[str, Any], ...] = field(default=(), kw_only=True)
    archs: tuple[int, ...] | None = field(default=None, kw_only=True)
    tritons: tuple[tuple[int, int], tuple[int, int]] = field(default=EVERY_TRITON, kw_only=True)
    dtypes: tuple[str, ...] = field(default=HALF, kw_only=True)
    block_ds: tuple[int, ...] | None = field(default=None, kw_only=True)
    avoid: enum.Flag | None = field(default=None, kw_only=True)

    @property
    def ships_here(self) -> bool:
        """Whether the running Triton is one this row ships under."""
        return runtime.triton_at_least(*self.tritons[0]) and not runtime.triton_at_least(*self.tritons[1])

    def param(self, name: str, default: Any = None) -> Any:
        """A meta-parameter of the config (``meta``), or ``default``."""
        return dict(self.meta).get(name, default)

    def kwargs(self) -> dict[str, Any]:
        """The config's meta-parameters: BLOCK_M, BLOCK_N (, BLOCK_K) and ``meta``."""
        sizes = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}
        if self.block_k is not None:
            sizes["BLOCK_K"] = self.block_k
        return {**sizes, **dict(self.meta)}

    def config(self) -> triton.Config:
        return triton.Config(self.kwargs(), num_warps=self.warps, num_stages=self.stages)

    def launch_options(self) -> dict[str, Any]:
        """Keyword arguments of a launch that does not autotune: the meta-parameters, num_warps, num_stages."""
        return {**self.kwargs(), "num_warps": self.warps, "num_stages": self.stages}

    def with_meta(self, **meta: Any) -> "Tile":
        """This tile with meta-parameters added or replaced."""
        return replace(self, meta=tuple({**dict(self.meta), **meta}.items()))

    @property
    def key(self) -> tuple:
        return config_key(self.config())


@dataclass(frozen=True)
class Launch:
    """What a launch is, as the offer rules see it: the architecture (10 x major + minor; 0: any, the
    interpreter), the operand dtype ("fp16" / "bf16" / "fp32"), its kinds (members of the family's
    ``enum.Flag``; None: none) and its BLOCK_D (None: the kernel has none)."""

    arch: int = 0
    dtype: str = "fp16"
    kinds: enum.Flag | None = None
    block_d: int | None = None


def _names(kinds: enum.Flag) -> str:
    return ", ".join(m.name.lower() for m in type(kinds) if m in kinds)


@dataclass(frozen=True)
class TileTable:
    """A kernel's rows, default first, the family's shared-memory ``estimate`` (bytes, an upper bound, for a
    tile and a launch) and the family's own offer ``rule`` (a reason, or None where it allows the tile)."""

    tiles: tuple[Tile, ...]
    estimate: Callable[[Tile, Launch], int]
    rule: Callable[[Tile, Launch], str | None] | None = None

    def shipped(self) -> tuple[Tile, ...]:
        """The rows that ship under the running Triton, the first per config, in table order."""
        first: dict[tuple, Tile] = {}
        for t in self.tiles:
            if t.ships_here:
                first.setdefault(t.key, t)
        return tuple(first.values())

    def configs(self) -> list[triton.Config]:
        """One config per shipped row (``shipped``), in table order: the autotuner's list."""
        return [t.config() for t in self.shipped()]

    def tile_of(self, config: triton.Config) -> Tile:
        """The shipped row of ``config``."""
        key = config_key(config)
        return next(t for t in self.shipped() if t.key == key)

    def _runs(self, tile: Tile, launch: Launch) -> str | None:
        """Why ``tile`` cannot take ``launch`` at all (Triton version, BLOCK_D, the family's rule), or None."""
        if not tile.ships_here:
            return "shipped for triton %d.%d up to (not including) %d.%d only" % (*tile.tritons[0], *tile.tritons[1])
        if tile.block_ds is not None and launch.block_d not in tile.block_ds:
            return f"shipped for BLOCK_D {'/'.join(map(str, tile.block_ds))} only"
        return self.rule(tile, launch) if self.rule is not None else None

    def why_not_offered(self, tile: Tile, launch: Launch) -> str | None:
        """Why ``tile`` is not among ``offered(launch)``, or None where it is: a row for another Triton version
        or BLOCK_D, the family's rule, another operand dtype or GPU generation, a kind it avoids, or a
        shared-memory estimate over the architecture's per-block maximum (``runtime.MAX_SHARED_PER_BLOCK``)."""
        if tile in self.offered(launch):
            return None
        return self._reason(tile, launch) or "another tile is offered there"

    def _reason(self, tile: Tile, launch: Launch) -> str | None:
        reason = self._runs(tile, launch)
        if reason:
            return reason
        if launch.dtype not in tile.dtypes:
            return f"offered to {'/'.join(tile.dtypes)} operands only"
        if launch.arch and tile.archs is not None and launch.arch // 10 not in tile.archs:
            return f"offered on compute capability {'/'.join(map(str, tile.archs))}.x only"
        if tile.avoid is not None and launch.kinds is not None and tile.avoid & launch.kinds:
            return f"not offered to {_names(tile.avoid & launch.kinds)} launches"
        estimate = self.estimate(tile, launch)
        if not runtime.fits_shared_memory(estimate, launch.arch):
            return (f"needs up to {estimate} B of shared memory ({launch.dtype} operands), over sm_{launch.arch}'s "
                    f"{runtime.max_shared_per_block(launch.arch)} B per block")
        return None

    def offered(self, launch: Launch) -> list[Tile]:
        """The shipped rows offered to ``launch`` (``why_not_offered``), in table order: the first is the
        default. Where none is (a GPU whose shared memory fits none of them, e.g. Volta / Turing), the one with
        the smallest estimate of those that can take the launch at all (``rule``, Triton version, BLOCK_D)."""
        shipped = self.shipped()
        kept = [t for t in shipped if self._reason(t, launch) is None]
        if kept:
            return kept
        runnable = [t for t in shipped if self._runs(t, launch) is None] or list(shipped)
        return [min(runnable, key=lambda t: self.estimate(t, launch))]

    def prune(self, configs, launch: Launch) -> list[triton.Config]:
        """``early_config_prune``'s answer for ``launch``: the configs of the offered rows, in the order
        offered (the first is the default; the interpreter's single config is kept as it is)."""
        by_key = {config_key(c): c for c in configs}
        kept = [by_key[t.key] for t in self.offered(launch) if t.key in by_key]
        return kept or list(configs[:1])
