"""A patched model's forward on the kernel path reads nothing back from the GPU: no
``.item()``, no tensor -> bool, no device -> host copy, no data-dependent shapes. That is what CUDA graph
capture needs, and what keeps the host from waiting on the GPU every layer.

Checked without a GPU: the model runs on fake CUDA tensors (``FakeTensorMode``: shapes, dtypes and devices
but no data), the ops take their direct path into the kernel launchers of ``clipfast.kernels`` as they do
on a GPU, the Triton launches are recorded instead of run, and a dispatch mode above the fake tensors fails
on every aten op that would synchronize. Reading a fake tensor's values raises as well, so a sync hidden
below an op (a decomposition) fails the test too. The forward runs with and without gradient recording
(the training forward saves tensors for backward through the same path); the backward is not run: the
autograd engine needs a real CUDA device for CUDA tensors, fake or not.
"""
from __future__ import annotations

import contextlib
import importlib
from collections import Counter

import pytest
import torch
import triton
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import clipfast
import clipfast.nn.attention as nn_attention
from clipfast.kernels import runtime
from clipfast.ops import _custom_op

patch_embed_op = importlib.import_module("clipfast.ops.patch_embed")

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.equal.default,
           aten.nonzero.default, aten.masked_select.default, aten.unique_consecutive.default,
           aten._unique2.default}
COPIES = {aten._to_copy.default, aten.copy_.default, aten.copy.default}


class NoHostSync(TorchDispatchMode):
    """Fails on ops that make the host wait for the device: reading values, data-dependent output shapes,
    copies from a CUDA tensor to the CPU."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING:
            raise AssertionError(f"host sync in the forward: {func}")
        if func in COPIES:
            to_cpu = (kwargs.get("device") or getattr(args[0], "device", None)) if func is aten._to_copy.default \
                else args[0].device
            source = args[0] if func is aten._to_copy.default else args[1]
            if source.device.type == "cuda" and torch.device(to_cpu).type == "cpu":
                raise AssertionError(f"device -> host copy in the forward: {func}")
        return func(*args, **kwargs)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Kernel launches recorded, not run; the CUDA device queries the launchers make answered as an H100's;
    the ops' direct path taken under the fake-tensor mode (as on a GPU, where no mode is active)."""
    launches: Counter = Counter()
    launches.devices = set()  # the current CUDA device at each launch (Triton launches there)
    current = [0]

    @contextlib.contextmanager
    def device(d):
        previous, current[0] = current[0], torch.device(d).index
        try:
            yield
        finally:
            current[0] = previous

    def record(self, grid):
        fn = self
        while not hasattr(fn, "__name__") and hasattr(fn, "fn"):
            fn = fn.fn

        def launch(*args, **kwargs):
            launches.update([getattr(fn, "__name__", type(fn).__name__)])
            launches.devices.add(current[0])
        return launch

    monkeypatch.setattr(triton.runtime.jit.KernelInterface, "__getitem__", record)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(runtime, "sm_count", lambda device: 132)
    monkeypatch.setattr(runtime, "capability", lambda device: (9, 0))
    monkeypatch.setattr(_custom_op, "needs_custom_op", lambda args: False)
    return launches


def _fake_cuda(t: torch.Tensor, requires_grad: bool = False, device: str = "cuda") -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=device, requires_grad=requires_grad)


@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")  # alignment checks read 0
@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_patched_clip_forward_has_no_host_sync_on_the_kernel_path(fake_gpu, monkeypatch, train):
    model = clipfast.models.create("tiny")
    # the unpadded text tower packs the real tokens: data-dependent shapes, one host sync per forward by
    # design (clipfast.unpad); a model meant for CUDA graph capture is patched without it
    clipfast.patch(model, unpad_text=False)
    res, ctx, vocab = model.visual.input_resolution, model.context_length, model.vocab_size
    with clipfast.dispatch("kernel"), FakeTensorMode(allow_non_fake_inputs=True):
        state = {n: _fake_cuda(p, train and p.requires_grad) for n, p in model.named_parameters()}
        state.update({n: _fake_cuda(b) for n, b in model.named_buffers()})
        # The causal mask is recognised once per mask tensor (a value check, cached): the warm-up step before
        # a capture does it. Fake tensors have no values, so the answer comes from the real mask here.
        causal = set()
        for module in model.modules():
            mask = getattr(module, "attn_mask", None)
            if isinstance(mask, torch.Tensor):
                assert nn_attention.is_causal_mask(mask)
                module.attn_mask = _fake_cuda(mask)
                causal.add(id(module.attn_mask))
        recognise = nn_attention.is_causal_mask
        monkeypatch.setattr(nn_attention, "is_causal_mask", lambda m: id(m) in causal or recognise(m))
        images = torch.randn(2, 3, res, res, device="cuda")
        text = torch.randint(1, vocab - 1, (2, ctx), device="cuda")

        with torch.set_grad_enabled(train), NoHostSync():
            image_features, text_features = torch.func.functional_call(model, state, (images, text))[:2]
            loss = clipfast.clip_loss(image_features[:, :8], text_features[:, :8], torch.zeros((), device="cuda"))
    assert loss.device.type == "cuda" and loss.requires_grad == train
    # every family ran its Triton kernels (a fallback to eager PyTorch would not launch them)
    names = set(fake_gpu)
    for kernel in ("_layer_norm_fwd_kernel", "_gemm_kernel", "_attn_fwd_kernel", "_patch_embed_fwd_kernel"):
        assert kernel in names, sorted(names)
    assert any("contrastive" in name for name in names), sorted(names)


@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")
def test_every_launch_runs_on_its_tensors_device_whatever_the_current_device(fake_gpu):
    """A model on cuda:1 while cuda:0 is current (``device_map="auto"``, pipeline parallelism): every
    launcher enters its tensors' device, so each kernel launches there, forward and loss alike."""
    model = clipfast.models.create("tiny")
    clipfast.patch(model, unpad_text=False)
    res = model.visual.input_resolution
    with clipfast.dispatch("kernel"), FakeTensorMode(allow_non_fake_inputs=True):
        state = {n: _fake_cuda(p, device="cuda:1") for n, p in model.named_parameters()}
        images = torch.randn(2, 3, res, res, device="cuda:1")
        features = torch.func.functional_call(model.visual, state_for(state, "visual."), (images,))
        loss = clipfast.clip_loss(features[:, :8], features[:, :8], torch.zeros((), device="cuda:1"))
    assert loss.device == torch.device("cuda:1")
    assert sum(fake_gpu.values()) >= 4 and fake_gpu.devices == {1}, (fake_gpu, fake_gpu.devices)
    assert torch.cuda.current_device() == 0  # restored after every launch


def state_for(state: dict, prefix: str) -> dict:
    return {n[len(prefix):]: t for n, t in state.items() if n.startswith(prefix)}


def test_the_device_guard_is_skipped_on_the_current_device_and_on_cpu(fake_gpu, monkeypatch):
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or contextlib.nullcontext())
    guarded = runtime.on_tensor_device(lambda x, scale=1: x.device)
    with FakeTensorMode():
        assert guarded(torch.empty(2, device="cuda:0")) == torch.device("cuda:0")
        assert guarded(torch.empty(2, device="cuda:3"), scale=2) == torch.device("cuda:3")
    assert guarded(torch.empty(2)) == torch.device("cpu")
    assert entered == [torch.device("cuda:3")]


def test_every_kernel_launching_function_is_device_guarded():
    """Whatever launches a kernel (``kernel[grid](...)``) in clipfast.kernels carries the guard."""
    import ast
    import inspect

    import clipfast.kernels as kernels

    unguarded = []
    for module in kernels.kernel_modules():
        for node in ast.parse(inspect.getsource(module)).body:
            if not isinstance(node, ast.FunctionDef):
                continue
            launches = any(isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript) for n in ast.walk(node))
            if launches and not getattr(getattr(module, node.name), "on_tensor_device", False):
                unguarded.append(f"{module.__name__}.{node.name}")
    assert not unguarded, unguarded


@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")
def test_unpadded_text_tower_runs_padded_and_sync_free_under_cuda_graph_capture(fake_gpu, monkeypatch):
    """While a CUDA graph is captured nothing may read device values on the host: the unpadded tower (which
    reads the packed lengths) runs its padded path then, with no host sync and no packed-attention launch."""
    model = clipfast.models.create("tiny")
    clipfast.patch(model)  # unpad_text on
    ctx, vocab = model.context_length, model.vocab_size
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with clipfast.dispatch("kernel"), FakeTensorMode(allow_non_fake_inputs=True):
        state = {n: _fake_cuda(p) for n, p in model.named_parameters()}
        state.update({n: _fake_cuda(b) for n, b in model.named_buffers()})
        for module in model.modules():
            mask = getattr(module, "attn_mask", None)
            if isinstance(mask, torch.Tensor):
                assert nn_attention.is_causal_mask(mask)  # the warm-up before a capture marks the mask
                module.attn_mask = _fake_cuda(mask)
                setattr(module.attn_mask, nn_attention._CAUSAL_MARK, 0)
        text = torch.randint(1, vocab - 1, (2, ctx), device="cuda")
        with torch.no_grad(), NoHostSync():
            features = _encode_text(model, state, text)
    assert features.shape == (2, model.text_projection.shape[1])
    assert "_varlen_fwd_kernel" not in fake_gpu and fake_gpu["_attn_fwd_kernel"] > 0, fake_gpu


def _encode_text(model, state, text):
    class EncodeText(torch.nn.Module):
        def __init__(self, clip):
            super().__init__()
            self.clip = clip

        def forward(self, text):
            return self.clip.encode_text(text)
    return torch.func.functional_call(EncodeText(model), {f"clip.{n}": t for n, t in state.items()}, (text,))


def test_sync_check_catches_item_and_device_to_host_copies():
    """The check itself: what it must catch, it catches."""
    with FakeTensorMode():
        x = torch.randn(4, device="cuda")
        with NoHostSync():
            for read in (lambda: x.sum().item(), lambda: bool(x.sum() > 0), lambda: x.cpu(), lambda: x[x > 0]):
                with pytest.raises(Exception):
                    read()
            x.float().add_(1)  # on-device work passes


@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")
def test_uint8_pixels_normalized_in_the_kernel_need_no_sync_after_the_first_call(fake_gpu, monkeypatch):
    """Mean and std given as numbers: checked and converted once on the host, copied to the device once."""
    monkeypatch.setattr(patch_embed_op, "_NORMALIZATIONS", {})  # no fake tensors left behind
    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    # the host part of the warm-up (fake tensors have no values to check)
    clipfast.patch_embed(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.randn(4, 3, 4, 4), mean=mean, std=std)
    fake_gpu.clear()
    with FakeTensorMode(allow_non_fake_inputs=True), clipfast.dispatch("kernel"):
        pixels = torch.empty(2, 3, 16, 16, dtype=torch.uint8, device="cuda")
        weight, cls, pos = (torch.empty(*s, device="cuda") for s in ((32, 3, 8, 8), (32,), (5, 32)))
        clipfast.patch_embed(pixels, weight, cls, pos, mean=mean, std=std)  # warm-up
        with NoHostSync():
            tokens = clipfast.patch_embed(pixels, weight, cls, pos, mean=mean, std=std)
    assert tokens.shape == (2, 5, 32) and fake_gpu["_patch_embed_fwd_kernel"] == 2


def test_zero_std_given_as_numbers_is_still_rejected_on_every_call():
    pixels, weight = torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.randn(4, 3, 4, 4)
    for _ in range(2):
        with pytest.raises(ValueError, match="non-zero"):
            clipfast.patch_embed(pixels, weight, mean=(0.5,) * 3, std=(0.5, 0.0, 0.5))
    clipfast.patch_embed(pixels, weight, mean=(0.5,) * 3, std=(0.5,) * 3)
    clipfast.patch_embed(pixels, weight, mean=0.5, std=0.25)
