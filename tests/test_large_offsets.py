"""Element offsets past 2**31: views whose rows lie more than 2**31 elements into their storage.

In the sequence-first layout of OpenAI ``clip`` and the reference model, q/k/v are views of the
in-projection output [L, B, 3E] with a row stride of B * 3E, so ``row * stride`` passes 2**31 from a batch
of a few thousand sequences. Index products computed in 32 bits wrap around there (on the GPU, and in the
interpreter, whose integer arithmetic wraps the same way) and read the wrong memory or crash.

The views here have a row stride just over 2**30 into one fp16 storage of ~2**31 elements (4 GiB of address
space). Only the few rows the views cover are ever written, so the pages actually touched are a few KiB;
the test still needs the allocation to succeed and runs only where the memory is available.
"""
import pytest
import torch

from clipfast.kernels import attention as kernel

from .conftest import DEVICE
from .numerics import randn
from .test_attention import check

ROW_STRIDE = 2**30 + 256  # row 2 starts past 2**31 elements
STORAGE_BYTES = 2 * (2 * ROW_STRIDE + 4096)


def _available_bytes() -> int:
    if DEVICE.type == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def big_rows(n_rows: int, width: int, dtype=torch.float16) -> torch.Tensor:
    """[n_rows, width] view with a row stride of ``ROW_STRIDE`` elements, filled with fresh random values."""
    if _available_bytes() < STORAGE_BYTES + 2**30:
        pytest.skip(f"needs {STORAGE_BYTES / 2**30:.1f} GiB of free memory for a storage past 2**31 elements")
    try:
        storage = torch.empty((n_rows - 1) * ROW_STRIDE + width, dtype=dtype, device=DEVICE)
    except (RuntimeError, MemoryError) as exc:  # overcommit limits
        pytest.skip(f"cannot allocate a storage past 2**31 elements: {exc}")
    rows = storage.as_strided((n_rows, width), (ROW_STRIDE, 1))
    rows.copy_(randn(n_rows, width, dtype=dtype, device=DEVICE))
    return rows


def test_wide_offsets_only_where_a_slice_spans_2_to_the_31():
    # ViT-B/16 in-projection views [L=197, B, 3 * 768]: 32-bit indices up to B = 4755, 64-bit from 4756
    for batch, wide in ((4755, False), (4756, True)):
        rows = torch.empty_strided((1, 12, 197, 64), (64, 64, batch * 3 * 768, 1), device="meta")
        assert kernel.has_wide_offsets(rows) is wide


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_reads_rows_past_2_to_the_31(causal):
    # q, k, v: [1, 1, 3, 64] views of in-projection rows [L=3, 3 * 64]; k and v rows 2 start past 2**31
    length, d = 3, 64
    qkv = big_rows(length, 3 * d).view(length, 3, d)
    q, k, v = (qkv[:, i][None, None] for i in range(3))
    assert k.stride(2) == ROW_STRIDE and k.storage_offset() + (length - 1) * ROW_STRIDE > 2**31
    assert kernel.has_wide_offsets(q, k, v)  # the kernels index these in 64 bits
    check(q, k, v, torch.float16, is_causal=causal)
