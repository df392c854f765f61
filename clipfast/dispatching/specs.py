"""How the dispatcher sees an op: its candidates (clipfast's path first), its shape key, and the bucketing
of sizes that vary between calls. ``clipfast.dispatching.candidates`` registers every op."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass
class Candidate:
    """One implementation of an op. ``fn`` takes the op's hook arguments; ``None`` means clipfast's own
    path, which the op runs inline (no extra call). ``cuda_only`` candidates are not offered on CPU."""

    name: str
    fn: Optional[Callable]
    cuda_only: bool = False


@dataclass
class OpSpec:
    """How the dispatcher sees one op: its shape key (already bucketed; dtype and gradient flag are added
    here), its candidates (clipfast's first), the one ``torch`` mode runs, clipfast's path as a callable for
    timing, and an optional filter of the candidates a call may use (e.g. the eager loss under a memory cap).
    """

    op: str
    shape_key: Callable[..., tuple]
    candidates: list[Candidate]
    torch_name: str
    kernel_fn: Callable
    eligible: Optional[Callable[..., bool]] = None  # eligible(name, *args) for the non-clipfast candidates
    by_name: dict[str, Candidate] = field(init=False)

    def __post_init__(self):
        self.by_name = {c.name: c for c in self.candidates}

    def runner(self, name: str) -> Callable:
        fn = self.by_name[name].fn
        return self.kernel_fn if fn is None else fn


_specs: dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    _specs[spec.op] = spec
    return spec


def specs() -> dict[str, OpSpec]:
    """Every registered op by name."""
    return _specs


def bucket(n: int) -> int:
    """Sizes that vary between calls (batch, tokens, rows) are rounded up to a power of two."""
    return 1 << (n - 1).bit_length() if n > 1 else n
