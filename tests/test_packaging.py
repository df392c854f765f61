"""The source folder ``kernels/`` is installed as ``clipfast.kernels`` and must never shadow Hugging Face's
top-level ``kernels`` package (transformers >= 5.25 imports it), even with the repository root as the
working directory, where ``make test``, ``make demo`` and every contributor run."""
import importlib.metadata
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_at_root(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # "" first on sys.path, as `python -c` and `python -m` put the working directory there
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_top_level_kernels_is_never_our_source_folder():
    result = _run_at_root(
        "import os\n"
        "import kernels\n"
        "found = getattr(kernels, '__file__', None)\n"
        "print('found', os.path.realpath(found) if found else 'placeholder', getattr(kernels, '__version__', '-'))\n"
        "import clipfast.kernels\n"
        "print('clipfast.kernels', os.path.realpath(clipfast.kernels.__file__), len(clipfast.kernels.kernel_modules()))\n")
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()[-2:]
    ours = os.path.realpath(os.path.join(ROOT, "kernels", "__init__.py"))
    kind, path, version = first.split(" ")
    if _hf_kernels_installed():  # Hugging Face's package, whatever the working directory
        assert kind == "found" and path not in (ours, "placeholder") and version != "-", first
    else:  # a placeholder without a file or a version: importers take the package for absent
        assert (kind, path, version) == ("found", "placeholder", "-"), first
    assert second.startswith(f"clipfast.kernels {ours} ") and int(second.split()[-1]) >= 5, second


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_transformers_builds_clip_from_the_repository_root():
    """With Hugging Face's kernels installed (transformers >= 5.25 needs it) and without (older ones check
    whether it is there)."""
    result = _run_at_root(
        "import transformers\n"
        "from transformers import CLIPConfig, CLIPModel\n"
        "cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,\n"
        "                 num_attention_heads=2), vision_config=dict(hidden_size=32, intermediate_size=64,\n"
        "                 num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16))\n"
        "import clipfast\n"
        "model = CLIPModel(cfg)\n"
        "report = clipfast.patch(model)\n"
        "print('patched', transformers.__version__)\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1].startswith("patched "), result.stdout
