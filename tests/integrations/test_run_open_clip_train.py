"""open_clip's own training program (``python -m open_clip_train.main``) under ``clipfast run``, unmodified.

A tiny model config (width 64, head dim 16, 2 layers per tower, 32 x 32 images in 8 x 8 patches, 16-token
context; open_clip's ``local-dir:`` model schema) and a CSV dataset of random PNG images and random captions,
both written by the test; 3 steps on CPU, the kernels through the Triton interpreter (``--interpret``).

- 1 process: ``clipfast run --interpret -m open_clip_train.main ...`` against the same command without
  clipfast: every step's loss agrees, kernels of every family ran (the exit summary), the model's patch
  report was printed once, and the checkpoint the patched run saved loads into plain open_clip with every
  key matched.
- 2 gloo ranks through torchrun, ``--local-loss --gather-with-grad``: the command line the README documents
  (``torchrun --nproc-per-node 2 -m clipfast.cli run -m open_clip_train.main ...``) against plain torchrun.

The harness, not clipfast, adapts open_clip to CPU ranks and records the losses: a ``sitecustomize.py`` on
``PYTHONPATH`` drops the ``device_ids=["cpu"]`` open_clip passes to DistributedDataParallel on CPU (DDP
refuses device ids for CPU modules), and appends every scalar passed to ``Tensor.backward`` (the step's
total loss) with full precision to a file per rank.

Losses: without a float64 run of the training program eager's own error cannot be measured, so each step's
loss is held to the model-level floor of the numerics standard (64 fp32 ulps of the loss, as
``tests/integrations/common.py``), times the number of steps taken (the weights' rounding differences
compound step by step). A wrong kernel is off by 1e-3 and more.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch

from clipfast.numerics import EPS

for _module in ("open_clip", "open_clip_train", "webdataset", "braceexpand", "pandas", "PIL"):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(f"{_module} is not installed (open_clip_torch[training]: `pip install -e .[integrations]`)",
                    allow_module_level=True)

IMAGES, BATCH, STEPS = 12, 4, 3
MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
FAMILIES = ("attention", "attention_varlen", "contrastive_loss", "layer_norm", "mlp", "patch_embed")

SITECUSTOMIZE = '''
import os
if os.environ.get("CLIPFAST_TEST_LOSS_LOG"):
    import torch
    from torch.nn.parallel import DistributedDataParallel

    _init = DistributedDataParallel.__init__

    def __init__(self, module, device_ids=None, *args, **kwargs):
        if device_ids and all(str(d) == "cpu" for d in device_ids):
            device_ids = None  # open_clip_train passes the CPU device; DDP takes no ids for CPU modules
        _init(self, module, device_ids, *args, **kwargs)

    DistributedDataParallel.__init__ = __init__
    _backward = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        if self.dim() == 0:
            path = os.environ["CLIPFAST_TEST_LOSS_LOG"] + "." + os.environ.get("RANK", "0")
            with open(path, "a") as f:
                f.write(repr(self.item()) + "\\n")
        return _backward(self, *args, **kwargs)

    torch.Tensor.backward = backward
'''


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("open_clip_train")
    (root / "images").mkdir()
    (root / "model").mkdir()
    rng, words = np.random.default_rng(0), random.Random(0)
    vocabulary = "a photo of the cat dog red blue small large tree car house river sky boat on in".split()
    lines = ["filepath,title"]
    for i in range(IMAGES):
        path = root / "images" / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        lines.append(f"{path},{' '.join(words.choice(vocabulary) for _ in range(words.randint(2, 9)))}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    (root / "model" / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODEL_CFG}))
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return root


def _train_args(root, name: str, extra=(), batch: int = BATCH) -> list[str]:
    return ["-m", "open_clip_train.main", "--model", f"local-dir:{root / 'model'}",
            "--train-data", str(root / "train.csv"), "--dataset-type", "csv", "--csv-separator", ",",
            "--csv-img-key", "filepath", "--csv-caption-key", "title", "--batch-size", str(batch),
            "--epochs", "1", "--lr", "1e-3", "--warmup", "1", "--workers", "0", "--precision", "fp32",
            "--device", "cpu", "--seed", "0", "--log-every-n-steps", "1", "--save-frequency", "1",
            "--report-to", "none", "--name", name, *extra]  # logs in ./logs: torchrun takes --logs for its --logs-specs


def _run(root, name: str, launcher: list[str], program: list[str]) -> tuple[dict[int, list[float]], str]:
    """Run one training, return ({rank: losses}, stderr + stdout)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CLIPFAST_DISPATCH")}
    env["PYTHONPATH"] = os.pathsep.join([str(root / "site"), *filter(None, [env.get("PYTHONPATH")])])
    env["CLIPFAST_TEST_LOSS_LOG"] = str(root / f"loss_{name}")
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, *launcher, *program], env=env, capture_output=True, text=True,
                          timeout=900, cwd=root)
    output = proc.stderr + proc.stdout
    assert proc.returncode == 0, output[-6000:]
    losses = {}
    for path in root.glob(f"loss_{name}.*"):
        losses[int(path.suffix[1:])] = [float(v) for v in path.read_text().split()]
    return losses, output


def _assert_losses_match(fast: list[float], plain: list[float], what: str) -> None:
    assert len(fast) == len(plain) == STEPS, (what, fast, plain)
    for step, (f, p) in enumerate(zip(fast, plain)):
        allowed = 64 * EPS[torch.float32] * max(abs(p), 1.0) * (step + 1)
        assert abs(f - p) <= allowed, f"{what} step {step}: loss {f!r} with clipfast, {p!r} without (allowed {allowed:.1e})"


def _launches(summary_line: str) -> dict[str, int]:
    return {family: int(n) for family, n in re.findall(r"(\w+) (\d+)", summary_line.split("kernel launches (", 1)[1])}


def _summaries(output: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(0) for m in re.finditer(r"^\[clipfast\] rank (\d+)\b.*$", output, re.M)}


def test_open_clip_train_one_process(workdir):
    plain, _ = _run(workdir, "plain1", [], _train_args(workdir, "plain1"))
    # no TRITON_INTERPRET in the environment: --interpret must set it before Triton is imported
    fast, output = _run(workdir, "fast1", ["-m", "clipfast.cli", "run", "--interpret", "--dispatch", "kernel"],
                        _train_args(workdir, "fast1"))
    _assert_losses_match(fast[0], plain[0], "1 process")

    # the model's report once, the loss said, one summary line with every family launched and no fallback
    assert output.count("[clipfast] patched CLIP from open_clip.create_model_and_transforms") == 1, output[-4000:]
    assert "open_clip.create_loss built ClipLoss: clipfast.nn.ClipLoss" in output
    summaries = _summaries(output)
    assert list(summaries) == [0], output[-4000:]
    assert "1 model(s) patched" in summaries[0] and "no fallbacks" in summaries[0], summaries[0]
    launches = _launches(summaries[0])
    assert all(launches.get(f, 0) > 0 for f in FAMILIES), summaries[0]

    # the patched run's checkpoint loads into plain open_clip, every key matched, with the unpatched run's
    # keys, shapes and dtypes (not its values: Adam turns the rounding noise of gradients that are zero in
    # exact arithmetic, such as the attention key bias's, into lr-sized steps of either sign)
    import open_clip

    checkpoint = torch.load(workdir / "logs" / "fast1" / "checkpoints" / "epoch_1.pt", map_location="cpu",
                            weights_only=False)
    plain_checkpoint = torch.load(workdir / "logs" / "plain1" / "checkpoints" / "epoch_1.pt", map_location="cpu",
                                  weights_only=False)
    model = open_clip.create_model(f"local-dir:{workdir / 'model'}")
    assert type(model).__module__.startswith("open_clip")
    result = model.load_state_dict(checkpoint["state_dict"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert list(checkpoint["state_dict"]) == list(plain_checkpoint["state_dict"])
    for key, value in plain_checkpoint["state_dict"].items():
        mine = checkpoint["state_dict"][key]
        assert (mine.shape, mine.dtype) == (value.shape, value.dtype), key
        assert torch.isfinite(mine).all(), key


def test_open_clip_train_two_gloo_ranks_local_loss(workdir):
    extra = ("--local-loss", "--gather-with-grad", "--dist-backend", "gloo")
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    batch = BATCH // 2  # per rank: the same 4 pairs per step, STEPS steps
    plain, _ = _run(workdir, "plain2", torchrun, _train_args(workdir, "plain2", extra, batch))
    # the documented command line: torchrun ... -m clipfast.cli run [--interpret] -m open_clip_train.main ...
    fast, output = _run(workdir, "fast2", [*torchrun, "-m", "clipfast.cli", "run", "--interpret"],
                        _train_args(workdir, "fast2", extra, batch))
    assert sorted(plain) == sorted(fast) == [0, 1]
    for rank in (0, 1):
        _assert_losses_match(fast[rank], plain[rank], f"rank {rank}")
    assert output.count("[clipfast] patched CLIP from open_clip.create_model_and_transforms") == 1, output[-4000:]
    summaries = _summaries(output)
    assert sorted(summaries) == [0, 1], output[-4000:]
    for line in summaries.values():
        launches = _launches(line)
        assert all(launches.get(f, 0) > 0 for f in FAMILIES), line
        assert "no fallbacks" in line, line
