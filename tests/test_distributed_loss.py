"""ClipLoss / SigLipLoss under torch.distributed: 2 processes on gloo (CPU), every local_loss x
gather_with_grad combination, losses and gradients against single-process computations.

Each rank's result is compared with a float64 emulation of open_clip's semantics for that rank (which
gathered copies carry gradients), and with the single-process global loss where the two are related:
the mean of the ranks' losses is the global loss, and the feature gradients are those of the global
loss (times world_size when the gathers carry gradients, as every rank's loss then reaches every rank's
features)."""
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import clipfast

WORLD = 2
N_LOCAL, DIM = 5, 64
COMBOS = [(False, False), (False, True), (True, False), (True, True)]  # (local_loss, gather_with_grad)


def _data():
    g = torch.Generator().manual_seed(1234)
    image = torch.randn(WORLD * N_LOCAL, DIM, generator=g, dtype=torch.float64)
    text = image + torch.randn(WORLD * N_LOCAL, DIM, generator=g, dtype=torch.float64)
    return F.normalize(image, dim=-1).float(), F.normalize(text, dim=-1).float()


def _ce(logits, offset):
    return F.cross_entropy(logits, torch.arange(logits.shape[0]) + offset)


def _clip_rank_loss(rank, local_loss, image_parts, text_parts, scale, keep):
    """Rank ``rank``'s open_clip loss; ``keep(r)`` says whether rank r's slice of the gathered tensors
    carries gradients."""
    all_image = torch.cat([p if keep(r) else p.detach() for r, p in enumerate(image_parts)])
    all_text = torch.cat([p if keep(r) else p.detach() for r, p in enumerate(text_parts)])
    if local_loss:
        offset = rank * N_LOCAL
        return (_ce(scale * image_parts[rank] @ all_text.T, offset)
                + _ce(scale * text_parts[rank] @ all_image.T, offset)) / 2
    logits = scale * all_image @ all_text.T
    return (_ce(logits, 0) + _ce(logits.T, 0)) / 2


def _leaves(image, text, scale):
    image_parts = [p.double().clone().requires_grad_() for p in image.split(N_LOCAL)]
    text_parts = [p.double().clone().requires_grad_() for p in text.split(N_LOCAL)]
    return image_parts, text_parts, scale.double().clone().requires_grad_()


def clip_reference(rank, local_loss, gather_with_grad, image, text, scale):
    """float64 (loss, d image_local, d text_local, d scale) of rank ``rank`` as open_clip computes them."""
    image_parts, text_parts, s = _leaves(image, text, scale)
    if gather_with_grad:
        # all_gather's backward sums the gradients of every rank's loss into the owner's slice
        losses = [_clip_rank_loss(r, local_loss, image_parts, text_parts, s, lambda _: True) for r in range(WORLD)]
        grads = torch.autograd.grad(sum(losses), [image_parts[rank], text_parts[rank]], retain_graph=True)
        ds = torch.autograd.grad(losses[rank], s)[0]
        return losses[rank].detach(), grads[0], grads[1], ds
    # plain all_gather: only the local tensors carry gradients (put back in place unless local_loss)
    loss = _clip_rank_loss(rank, local_loss, image_parts, text_parts, s, lambda r: r == rank and not local_loss)
    grads = torch.autograd.grad(loss, [image_parts[rank], text_parts[rank], s])
    return loss.detach(), *grads


def global_clip(image, text, scale):
    """The single-process loss over the whole batch and its gradients."""
    i, t, s = (x.double().clone().requires_grad_() for x in (image, text, scale))
    logits = s * i @ t.T
    loss = (_ce(logits, 0) + _ce(logits.T, 0)) / 2
    return (loss.detach(), *torch.autograd.grad(loss, [i, t, s]))


def siglip_reference(rank, image, text, scale, bias):
    """open_clip SigLipLoss on rank ``rank``: local images against every rank's texts (exchanged with
    gradients), divided by the local batch."""
    image_parts, text_parts, s = _leaves(image, text, scale)
    b = bias.double().clone().requires_grad_()

    def rank_loss(r):
        logits = s * image_parts[r] @ torch.cat(text_parts).T + b
        labels = -torch.ones_like(logits)
        labels[torch.arange(N_LOCAL), torch.arange(N_LOCAL) + r * N_LOCAL] = 1.0
        return -F.logsigmoid(labels * logits).sum() / N_LOCAL

    losses = [rank_loss(r) for r in range(WORLD)]
    grads = torch.autograd.grad(sum(losses), [image_parts[rank], text_parts[rank]], retain_graph=True)
    return (losses[rank].detach(), *grads, *torch.autograd.grad(losses[rank], [s, b]))


def _close(name, got, want):
    torch.testing.assert_close(got.double(), want.double(), rtol=2e-5, atol=2e-5 * float(want.abs().max()) + 1e-9,
                               msg=lambda m: f"{name}: {m}")


def _check_rank(rank):
    image, text = _data()
    scale = torch.tensor(30.0)
    local = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    g_loss, g_image, g_text, _ = global_clip(image, text, scale)
    for local_loss, gather_with_grad in COMBOS:
        tag = f"rank {rank} local_loss={local_loss} gather_with_grad={gather_with_grad}"
        loss_fn = clipfast.nn.ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank,
                                       world_size=WORLD)
        i = image[local].clone().requires_grad_()
        t = text[local].clone().requires_grad_()
        s = scale.clone().requires_grad_()
        loss = loss_fn(i, t, s)
        loss.backward()
        want = clip_reference(rank, local_loss, gather_with_grad, image, text, scale)
        for name, got, ref in zip(("loss", "d image", "d text", "d logit_scale"), (loss, i.grad, t.grad, s.grad), want):
            _close(f"{tag} {name}", got, ref)
        # the ranks' losses average to the global loss
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        _close(f"{tag} mean loss vs global", mean_loss / WORLD, g_loss)
        if gather_with_grad or not local_loss:
            factor = WORLD if gather_with_grad else 1
            _close(f"{tag} d image vs global", i.grad, factor * g_image[local])
            _close(f"{tag} d text vs global", t.grad, factor * g_text[local])

    bias = torch.tensor(-5.0)
    i, t = image[local].clone().requires_grad_(), text[local].clone().requires_grad_()
    s, b = torch.tensor(10.0, requires_grad=True), bias.clone().requires_grad_()
    loss = clipfast.nn.SigLipLoss(rank=rank, world_size=WORLD)(i, t, s, b)
    loss.backward()
    want = siglip_reference(rank, image, text, torch.tensor(10.0), bias)
    for name, got, ref in zip(("loss", "d image", "d text", "d scale", "d bias"), (loss, i.grad, t.grad, s.grad, b.grad), want):
        _close(f"rank {rank} SigLipLoss {name}", got, ref)


def _worker(rank, init_file, error_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        _check_rank(rank)
    except BaseException:
        with open(os.path.join(error_dir, f"rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_distributed_losses_match_single_process(tmp_path):
    try:
        mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    except Exception as exc:
        reports = sorted(tmp_path.glob("rank*.txt"))
        details = "\n".join(p.read_text() for p in reports)
        pytest.fail(f"a rank failed: {exc}\n{details}")


def test_single_process_module_equals_global_computation():
    image, text = _data()
    scale = torch.tensor(30.0)
    g_loss, g_image, g_text, g_scale = global_clip(image, text, scale)
    i, t, s = (x.clone().requires_grad_() for x in (image, text, scale))
    loss = clipfast.nn.ClipLoss()(i, t, s)
    loss.backward()
    for name, got, ref in zip(("loss", "d image", "d text", "d scale"), (loss, i.grad, t.grad, s.grad),
                              (g_loss, g_image, g_text, g_scale)):
        _close(name, got, ref)
