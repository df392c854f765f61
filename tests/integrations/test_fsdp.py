"""A patched model trains under FSDP2 (``torch.distributed.fsdp.fully_shard``, 2 processes, gloo, CPU), with
and without activation checkpointing, with the unpatched model's losses and gradients (numerics standard:
float32 patched vs float32 eager vs a float64 copy trained the same way).

The recipe (also in the README): ``clipfast.patch(model)`` first, then ``checkpoint(block)`` (optional) and
``fully_shard(block)`` on every residual block; the root is not wrapped (OpenAI-style CLIP keeps
``logit_scale`` as a 0-dimensional parameter, which FSDP2 cannot shard), so its parameters' gradients stay
local to each process, as they would be in the unpatched model."""
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ..numerics import check

WORLD, BATCH, STEPS, LR = 2, 2, 3, 0.05
VARIANTS = ("fsdp", "fsdp+checkpoint")
MODELS = (("ref", torch.float64), ("eager", torch.float32), ("fast", torch.float32))


def _build():
    import clipfast

    torch.manual_seed(0)
    model = clipfast.models.create("tiny", vision_layers=1, vision_width=64, image_resolution=16, context_length=8,
                                   transformer_width=64, transformer_layers=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _batches(rank):
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(STEPS):
        images = torch.randn(BATCH, 3, 16, 16, generator=g)
        text = torch.randint(1, 100, (BATCH, 8), generator=g)
        text[:, -1] = 100  # EOT: the highest id
        yield images, text


def _loss(model, images, text):
    logits_per_image, logits_per_text = model(images, text)
    labels = torch.arange(len(images))
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def _shard(model, checkpointing):
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import fully_shard

    blocks = list(model.visual.transformer.resblocks) + list(model.transformer.resblocks)
    for block in blocks:
        if checkpointing:
            checkpoint(block)
        fully_shard(block)


def _local(t):
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.detach().clone()


def _worker(rank, init_file, out_dir):
    import clipfast

    torch.set_num_threads(1)  # two processes share the machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for variant in VARIANTS:
            for tag, dtype in MODELS:
                model = _build().to(dtype)
                if tag == "fast":
                    report = clipfast.patch(model)
                    assert report.counts().get("attention", 0) == 2, str(report)
                _shard(model, checkpointing=variant.endswith("checkpoint"))
                optimizer = torch.optim.SGD(model.parameters(), lr=LR)
                steps = []
                for images, text in _batches(rank):
                    optimizer.zero_grad()
                    loss = _loss(model.train(), images.to(dtype), text)
                    loss.backward()
                    steps.append({"loss": loss.detach().clone(),
                                  "grads": {n: _local(p.grad) for n, p in model.named_parameters() if p.grad is not None}})
                    optimizer.step()
                results[variant, tag] = steps
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp2_patched_trains_like_unpatched(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    try:
        from torch.distributed._composable import checkpoint  # noqa: F401
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this torch has no FSDP2 / composable checkpoint ({e})")
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    problems = []
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for variant in VARIANTS:
            for step, (ref, eager, fast) in enumerate(zip(*(results[variant, tag] for tag, _ in MODELS))):
                where = f"rank {rank}, {variant}, step {step}"
                problems.append(check(f"{where}: loss", fast["loss"], eager["loss"], ref["loss"], torch.float32, 4.0, 64.0))
                assert set(fast["grads"]) == set(eager["grads"]) == set(ref["grads"]), where
                assert any("resblocks" in n for n in fast["grads"]), where
                for name, r in ref["grads"].items():
                    problems.append(check(f"{where}: grad of {name}", fast["grads"][name], eager["grads"][name], r,
                                          torch.float32, 4.0, 64.0))
    problems = [p for p in problems if p]
    assert not problems, "\n".join(problems)
