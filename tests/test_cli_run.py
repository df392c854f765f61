"""``clipfast run`` and the command line's edges: every command in ``--help``, the bench targets, the aot
options' help, one clean line for a bad model name or a bad ``CLIPFAST_DISPATCH``, chart labels that fit.

The open_clip training program under ``clipfast run`` is ``tests/integrations/test_run_open_clip_train.py``.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from clipfast import _cli_guard, launcher
from clipfast.cli import _parser

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def _clipfast(*args, env_drop=(), env_set=None, cwd=None, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    env.update(env_set or {})
    return subprocess.run([sys.executable, "-m", "clipfast.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


# ----------------------------------------------------------------------------------------------
# clipfast run
# ----------------------------------------------------------------------------------------------

HF_SCRIPT = r'''
import sys
import torch
from transformers import CLIPConfig, CLIPModel, logging
from clipfast.patching import is_fast

logging.set_verbosity_error()
tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
config = CLIPConfig(text_config=dict(tower, max_position_embeddings=16, vocab_size=100, eos_token_id=99),
                    vision_config=dict(tower, image_size=16, patch_size=8), projection_dim=16)
model = CLIPModel(config)
ids = torch.randint(1, 98, (2, 8)); ids[:, -1] = 99
out = model(input_ids=ids, pixel_values=torch.randn(2, 3, 16, 16))
print("name", __name__, "argv", sys.argv[1:], "patched", any(is_fast(m) for m in model.modules()),
      "finite", bool(torch.isfinite(out.logits_per_image).all()))
'''


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
def test_run_patches_a_hugging_face_script(tmp_path):
    script = tmp_path / "train_hf.py"
    script.write_text(HF_SCRIPT)
    # no TRITON_INTERPRET in the environment: --interpret sets it before Triton is imported (the command
    # starts itself again), so the kernels run through the interpreter
    proc = _clipfast("run", "--interpret", str(script), "--epochs", "1", "-x",
                     env_drop=("TRITON_INTERPRET", "CLIPFAST_DISPATCH"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "name __main__ argv ['--epochs', '1', '-x'] patched True finite True" in proc.stdout
    assert proc.stderr.count("[clipfast] patched CLIPModel from transformers") == 1, proc.stderr[-4000:]
    assert "clipfast.patch:" in proc.stderr and "CPU: Triton interpreter" in proc.stderr
    summary = re.search(r"^\[clipfast\] rank 0: 1 model\(s\) patched; \d+ kernel launches \((.*)\); (.*)$",
                        proc.stderr, re.M)
    assert summary, proc.stderr[-3000:]
    launches = dict(re.findall(r"(\w+) (\d+)", summary.group(1)))
    assert {"attention", "layer_norm", "mlp", "patch_embed"} <= set(launches), summary.group(0)
    assert summary.group(2) == "no fallbacks", summary.group(0)


def test_run_module_exit_code_fallbacks_and_no_kernels_without_interpreter(tmp_path):
    (tmp_path / "prog_mod.py").write_text(
        "import sys, warnings, clipfast\n"
        "from clipfast import _validate\n"
        "warnings.simplefilter('ignore')\n"  # the program silences warnings: fallbacks are still recorded
        "_validate.warn_once('test_fallback', 'something ran PyTorch')\n"
        "print('argv', sys.argv[1:], __name__)\n"
        "sys.exit(3)\n")
    proc = _clipfast("run", "--dispatch", "torch", "--families", "layer_norm,mlp", "-m", "prog_mod", "a", "--b",
                     env_drop=("TRITON_INTERPRET",), env_set={"PYTHONPATH": str(tmp_path)}, cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "argv ['a', '--b'] __main__" in proc.stdout
    line = [l for l in proc.stderr.splitlines() if l.startswith("[clipfast] rank 0")]
    assert line == ["[clipfast] rank 0 (exit: 3): 0 model(s) patched; no clipfast kernel launched (dispatch mode "
                    "torch: PyTorch ran every op); 1 fallback(s): something ran PyTorch [test_fallback]"], proc.stderr


def test_run_options_and_usage():
    assert launcher.split(["--interpret", "-m", "pkg.mod", "--interpret", "x"]) == (
        ["--interpret"], ["-m", "pkg.mod", "--interpret", "x"])
    assert launcher.split(["--families", "mlp", "--dispatch", "kernel", "train.py", "-m", "x"]) == (
        ["--families", "mlp", "--dispatch", "kernel"], ["train.py", "-m", "x"])
    assert launcher.split(["-mpkg", "y"]) == ([], ["-mpkg", "y"])
    proc = _clipfast("run", "--help")
    assert proc.returncode == 0 and "--interpret" in proc.stdout and "torchrun" in proc.stdout
    proc = _clipfast("run")
    assert proc.returncode == 2 and "nothing to run" in proc.stderr
    proc = _clipfast("run", "--families", "atention", "x.py")
    assert proc.returncode == 2 and "unknown kernel family atention" in proc.stderr
    proc = _clipfast("run", "--dispatch", "fast", "x.py")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_torchrun_accepts_the_documented_command_line(tmp_path):
    """``torchrun --nproc-per-node N -m clipfast.cli run ... -m MODULE ARGS``: torchrun hands everything after
    its module to each rank, which runs the program with RANK / WORLD_SIZE set; only rank 0 prints reports."""
    (tmp_path / "rank_prog.py").write_text("import os, sys\nprint('rank', os.environ['RANK'], sys.argv[1:])\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(tmp_path), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "clipfast.cli", "run", "--dispatch", "kernel", "-m", "rank_prog", "--x", "1"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(re.findall(r"rank (\d) \['--x', '1'\]", proc.stdout)) == ["0", "1"], proc.stdout
    assert sorted(re.findall(r"\[clipfast\] rank (\d): 0 model", proc.stderr)) == ["0", "1"], proc.stderr


# ----------------------------------------------------------------------------------------------
# The command line's edges
# ----------------------------------------------------------------------------------------------

def test_help_lists_every_command():
    """Every subcommand the parser has is in ``clipfast --help``: its own line and the description's list."""
    parser = _parser()
    text = parser.format_help()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    commands = list(subparsers.choices)
    assert {"verify", "bench", "tune", "aot", "run"} <= set(commands)
    listed = " ".join(text.split()).split("Commands: ", 1)[1].split(" (", 1)[0]
    assert sorted(c.strip() for c in listed.split(",")) == sorted(commands), listed
    for command in commands:
        assert re.search(rf"^\s+{command}\s+\S", text, re.M), (command, text)


def test_bench_help_lists_every_target_and_the_unknown_target_message_names_them(capsys):
    from clipfast.benchmarks import case_modules
    from clipfast.benchmarks.cli import CASE_TARGETS, SPECIAL_TARGETS, main_bench

    families = [m.__name__.rsplit(".", 1)[-1] for m in case_modules()]
    assert sorted(CASE_TARGETS) == sorted(families)
    subparsers = next(a for a in _parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    help_text = subparsers.choices["bench"].format_help()
    for target in [*SPECIAL_TARGETS, *families]:
        assert re.search(rf"^\s+{target}\s+\S", help_text, re.M), target
    assert "text" in SPECIAL_TARGETS and "overhead" in SPECIAL_TARGETS
    args = _parser().parse_args(["bench", "nope"])
    assert main_bench(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown target 'nope'" in err
    for target in ["all", "overhead", "text", *families]:
        assert re.search(rf"\b{target}\b", err), target


def test_aot_options_have_help():
    subparsers = next(a for a in _parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in subparsers.choices.items():
        if name == "run":
            continue  # its own parser: clipfast.launcher.parser()
        for action in sub._actions:
            if action.option_strings and action.dest != "help" and name == "aot":
                assert action.help, (name, action.dest)
    for action in launcher.parser()._actions:
        assert action.help, action.dest


@pytest.mark.parametrize("name, expected", [
    ("open_clip:Nope", "clipfast verify: open_clip has no model 'Nope'"),
    ("open_clip:ViT-B-61", "did you mean ViT-B-16"),
    ("hf:clp", "clipfast verify: unknown Hugging Face model 'hf:clp' (did you mean hf:clip"),
    ("Nope", "clipfast verify: unknown model 'Nope'"),
])
def test_verify_bad_model_name_is_one_clean_line(name, expected):
    if name.startswith("open_clip") and importlib.util.find_spec("open_clip") is None:
        pytest.skip("needs open_clip")
    proc = _clipfast("verify", name)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr[-3000:]


@pytest.mark.parametrize("argv", [["--help"], ["run", "-m", "json.tool"], ["verify", "tiny"]])
def test_bad_dispatch_env_is_one_clean_line_from_the_cli(argv):
    proc = _clipfast(*argv, env_set={"CLIPFAST_DISPATCH": "bogus"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("clipfast: CLIPFAST_DISPATCH='bogus' is not a dispatch mode; use one of auto, "
                                   "kernel, torch (or unset it)"), proc.stderr[-3000:]
    # importing the library still raises (a program's import of clipfast is not the command line)
    proc = subprocess.run([sys.executable, "-c", "import clipfast"], capture_output=True, text=True,
                          env=dict(os.environ, CLIPFAST_DISPATCH="bogus"), timeout=600)
    assert proc.returncode == 1 and "ValueError" in proc.stderr


def test_cli_guard_knows_the_dispatch_modes_and_the_command_lines():
    from clipfast.dispatching.modes import MODES

    assert tuple(_cli_guard.MODES) == tuple(MODES)
    guard = _cli_guard.interpreter_options
    assert guard(["python", "-u", "-X", "dev", "-m", "clipfast.cli", "run"]) == (["-u", "-X", "dev"],
                                                                               ["-m", "clipfast.cli", "run"])
    assert guard(["python", "/venv/bin/clipfast", "verify"]) == ([], ["/venv/bin/clipfast", "verify"])
    assert guard(["python", "-c", "import clipfast"]) == ([], None)


def test_chart_labels_fit():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from clipfast.benchmarks.cli import labels_fit, speedup_figure

    rows = []
    for family, case in [("attention", "vision S=197 D=64 B=256 (ViT-B/16)"), ("mlp", "ViT-L/14 fc+quickgelu+proj"),
                         ("layer_norm", "width 1280 rows 65792"), ("contrastive_loss", "N=32768 d=1024 bf16")]:
        for impl in ("clipfast", "eager", "sdpa_flash", "torch.compile"):
            rows.append(dict(family=family, case=case, impl=impl, mode="fwd+bwd", smoke_seconds=1.0, smoke=True,
                             speedup_of_clipfast=1.5))
    for smoke in (True, False):
        for r in rows:
            r["smoke"] = smoke
        fig = speedup_figure(rows)
        try:
            assert labels_fit(fig), f"labels cut off (smoke={smoke})"
        finally:
            plt.close(fig)
