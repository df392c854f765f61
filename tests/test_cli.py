"""The command line on CPU: bench smoke pass, plots, argument errors, aot quick subset."""
import json
import subprocess
import sys

import pytest

from clipfast.cli import main


def test_bench_smoke_writes_valid_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "speedup.png"
    assert main(["bench", "layer_norm", "--smoke", "--json", str(out), "--plot", str(png)]) == 0
    data = json.loads(out.read_text())
    assert data["smoke"] is True and data["environment"]["torch"]
    impls = {(r["case"], r["impl"], r["mode"]) for r in data["rows"]}
    assert any(i == "clipfast" for _, i, _ in impls) and any(i == "eager" for _, i, _ in impls)
    assert not [r for r in data["rows"] if r["error"]]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_unknown_target_is_a_clear_error(capsys):
    assert main(["bench", "no_such_kernel", "--smoke"]) == 2
    assert "unknown target" in capsys.readouterr().err


def test_bad_arguments_exit_non_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["verify", "--dtype", "fp8"])
    assert exc.value.code != 0
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code != 0


def test_aot_quick_subset_compiles_every_kernel_family(tmp_path):
    """The quick AOT subset of every kernel family: sm_80 and sm_90, fp16 and bf16, no spills, tensor
    cores (HMMA / HGMMA) wherever a kernel has a tl.dot, and TMA loads (UTMALDG) where a kernel reads
    through tensor descriptors."""
    from clipfast.kernels import kernel_modules

    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "clipfast.aot", "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {r["family"] for r in rows} == {m.__name__.rsplit(".", 1)[-1] for m in kernel_modules()}
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"} and {r["dtype"] for r in rows} == {"fp16", "bf16"}
    for r in rows:
        assert r["error"] is None and r["stack"] == 0 and r["local"] == 0 and r["registers"] > 0, r
        if r["expects_mma"]:
            assert r["hgmma"] if r["arch"] == "sm_90" else r["hmma"], r
        if r["expects_tma"]:
            assert r["arch"] == "sm_90" and r["tma"], r
    assert any(r["expects_tma"] for r in rows)  # the MLP GEMM's persistent TMA variant


def test_readme_results_section_is_generated_from_committed_results():
    import os

    from clipfast.gpu_check import summary

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with open("README.md") as f:
            readme = f.read()
        assert summary.render_readme(readme, summary.section(summary.load_results())) == readme, \
            "README results section is stale: run python -m clipfast.gpu_check.summary --write-readme"
    finally:
        os.chdir(cwd)


def test_verify_tiny_reference_model_passes_and_reports_every_swapped_module(tmp_path):
    import clipfast

    out = tmp_path / "verify.json"
    assert main(["verify", "tiny", "--json", str(out), "--no-progress"]) == 0
    data = json.loads(out.read_text())
    assert data["passed"] and data["interpreter"] == (not torch_cuda())
    model = clipfast.models.create("tiny")
    expected_swaps = [s.path for s in clipfast.patch(model).swapped]
    assert data["swapped"] == expected_swaps and expected_swaps
    module_rows = {r["name"] for r in data["rows"] if r["kind"] == "module"}
    assert module_rows | set(data["fused_into_parent"]) | set(data["ran_unpadded"]) == set(expected_swaps)
    assert data["ran_unpadded"] and {p.split(".")[0] for p in data["ran_unpadded"]} == {"transformer", "ln_final"}
    assert len(module_rows) > len(data["fused_into_parent"])
    grads = {r["name"] for r in data["rows"] if r["kind"] == "grad"}
    assert grads == {n for n, _ in model.named_parameters()}
    assert {r["name"] for r in data["rows"] if r["kind"] == "output"} >= {"image_features", "text_features"}


def test_verify_unknown_model_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown model"):
        main(["verify", "ViT-Z-99"])


def torch_cuda():
    import torch

    return torch.cuda.is_available()


def test_loss_scaling_plot_from_timed_rows(tmp_path):
    from clipfast.benchmarks.cli import plot_loss_scaling

    rows = [{"family": "contrastive_loss", "mode": "fwd+bwd", "impl": impl, "error": None, "ms_median": ms * n / 1024,
             "peak_mem_mb": mem * n, "shape": {"N": n, "d": 512}}
            for impl, ms, mem in (("clipfast", 1.0, 0.01), ("eager", 2.0, 0.5)) for n in (1024, 4096, 16384)]
    png = tmp_path / "loss.png"
    assert plot_loss_scaling(rows, str(png))
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert not plot_loss_scaling([{**r, "family": "mlp"} for r in rows], str(tmp_path / "none.png"))
