"""A patched model trains under DistributedDataParallel (2 processes, gloo, CPU) with the same gradients
as the unpatched model, and both match one process computing the whole batch."""
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

WORLD = 2
BATCH = 4  # per process


def _build():
    import clipfast

    torch.manual_seed(0)
    model = clipfast.models.create("tiny", vision_layers=1, vision_width=64, transformer_width=64, transformer_layers=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(WORLD * BATCH, 3, 32, 32, generator=g)
    text = torch.randint(1, 100, (WORLD * BATCH, 13), generator=g)
    text[:, -1] = 100  # EOT: the highest id
    return images, text


def _loss(model, images, text):
    """CLIP's contrastive loss on the local batch (``model`` may be the DDP wrapper: its forward is CLIP's
    forward, returning (logits_per_image, logits_per_text))."""
    logits_per_image, logits_per_text = model(images, text)
    labels = torch.arange(len(images))
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def _worker(rank, init_file, out_dir):
    import clipfast

    torch.set_num_threads(1)  # two processes share the machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        eager = _build()
        fast = copy.deepcopy(eager)
        report = clipfast.patch(fast)
        images, text = _batch()
        local = slice(rank * BATCH, (rank + 1) * BATCH)
        grads = {}
        for tag, model in (("eager", eager), ("fast", fast)):
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            _loss(ddp, images[local], text[local]).backward()  # DDP all-reduces (averages) the gradients
            grads[tag] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"grads": grads, "report": str(report), "swapped": len(report.swapped)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_patched_gradients_match_unpatched(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert results[0]["swapped"] > 0, results[0]["report"]

    # single process, whole batch: the mean of the per-rank losses has the gradient DDP averages
    reference = _build()
    images, text = _batch()
    loss = sum(_loss(reference, images[r * BATCH:(r + 1) * BATCH], text[r * BATCH:(r + 1) * BATCH])
               for r in range(WORLD)) / WORLD
    loss.backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}

    for rank, result in enumerate(results):
        eager, fast = result["grads"]["eager"], result["grads"]["fast"]
        assert set(fast) == set(eager) == set(expected)
        for name, g in expected.items():
            scale = float(g.abs().max()) + 1e-12
            torch.testing.assert_close(eager[name], g, rtol=1e-4, atol=1e-5 * scale, msg=f"rank {rank} eager {name}")
            torch.testing.assert_close(fast[name], g, rtol=1e-3, atol=1e-4 * scale, msg=f"rank {rank} patched {name}")
