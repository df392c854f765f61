"""``clipfast.testing.hf_parity``: the pytest plugin and runner that run transformers' own model tests without
and with clipfast. Checked here on stand-ins (no transformers test files are needed): the head widening of
model testers, each mode's hook on model construction, the junit bookkeeping, and one plugin run end to end
on a tiny unittest file written by the test."""
import subprocess
import sys
import textwrap

import pytest
import torch

from clipfast.patching import is_fast
from clipfast.testing import hf_parity

transformers = pytest.importorskip("transformers", reason="transformers is not installed; `pip install -e .[integrations]`")

TEXT = dict(vocab_size=50, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
            max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)


class Tester:
    def __init__(self, **kwargs):
        vars(self).update(kwargs)


def test_widen_heads_keeps_hidden_size_and_makes_heads_wide():
    text = Tester(hidden_size=32, num_attention_heads=4)
    vision = Tester(hidden_size=8, num_attention_heads=2)  # narrower than one wide head: grows
    wide = Tester(hidden_size=64, num_attention_heads=4)  # already 16 wide: untouched
    composite = Tester(text_model_tester=text, vision_model_tester=vision, hidden_size=8)  # a copy of vision's
    hf_parity.widen_heads(composite, 16)
    hf_parity.widen_heads(wide, 16)
    assert (text.hidden_size, text.num_attention_heads) == (32, 2)
    assert (vision.hidden_size, vision.num_attention_heads) == (16, 1)
    assert composite.hidden_size == 16
    assert (wide.hidden_size, wide.num_attention_heads) == (64, 4)
    hf_parity.widen_heads(text, 8)  # wide enough already
    assert text.num_attention_heads == 2


@pytest.mark.parametrize("mode", ["patch", "attn"])
def test_mode_switches_clipfast_on_for_models_built_while_installed(mode):
    config = transformers.CLIPTextConfig(**TEXT)
    undo = hf_parity.install(mode)
    try:
        model = transformers.CLIPTextModel(config)
        eager = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT, attn_implementation="eager"))
    finally:
        undo()
    after = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT))
    attention = model.encoder.layers[0].self_attn
    if mode == "patch":
        assert is_fast(attention) and attention.config._attn_implementation == "clipfast"
        assert is_fast(eager.encoder.layers[0].self_attn)  # patch mode patches every model
    else:
        assert not is_fast(attention) and model.config._attn_implementation == "clipfast"
        assert eager.config._attn_implementation == "eager"  # an explicit request stays as it is
    assert not is_fast(after.encoder.layers[0].self_attn)
    assert after.config._attn_implementation == "sdpa"


def test_install_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        hf_parity.install("flash")


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.models.clip.test_modeling_clip.CLIPTextModelTest" name="test_a"/>
<testcase classname="tests.models.clip.test_modeling_clip.CLIPTextModelTest" name="test_b"/>
<testcase classname="tests.models.clip.test_modeling_clip.CLIPTextModelTest" name="test_c">{c}</testcase>
<testcase classname="tests.models.siglip.test_modeling_siglip.SiglipModelTest" name="test_d">{d}</testcase>
</testsuite></testsuites>"""


def test_junit_bookkeeping_lists_baseline_passes_that_fail(tmp_path):
    (tmp_path / "baseline.xml").write_text(JUNIT.format(c='<skipped message="x"/>', d=""))
    (tmp_path / "attn.xml").write_text(JUNIT.format(c="", d='<error message="boom"/>').replace(
        '<testcase classname="tests.models.clip.test_modeling_clip.CLIPTextModelTest" name="test_b"/>', ""))
    baseline, attn = (hf_parity.read_junit(tmp_path / f"{m}.xml") for m in ("baseline", "attn"))
    assert baseline["tests.models.clip.test_modeling_clip.CLIPTextModelTest::test_c"] == "skipped"
    assert attn["tests.models.siglip.test_modeling_siglip.SiglipModelTest::test_d"] == "failed"
    # test_b was not run with clipfast (a reused baseline with a wider selection): not compared; test_c
    # passed only with clipfast: not listed
    assert hf_parity.regressions(baseline, attn) == ["tests.models.siglip.test_modeling_siglip.SiglipModelTest::test_d"]
    # a run that reported nothing (pytest crashed before writing its XML) fails every baseline pass
    assert hf_parity.regressions(baseline, {}) == sorted(t for t, o in baseline.items() if o == "passed")
    text, total = hf_parity.summarize({"baseline": baseline, "attn": attn})
    assert total == 1
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.startswith(("clip/", "siglip/"))}
    assert rows == {"clip/test_modeling_clip": ["1", "0"], "siglip/test_modeling_siglip": ["1", "1"]}


def test_runner_reuses_earlier_results_and_reports(tmp_path, capsys):
    (tmp_path / "baseline.xml").write_text(JUNIT.format(c="", d=""))
    (tmp_path / "patch.xml").write_text(JUNIT.format(c="", d=""))
    (tmp_path / "attn.xml").write_text(JUNIT.format(c='<failure message="x"/>', d=""))
    assert hf_parity.main([str(tmp_path), "tests/models/clip", "--out", str(tmp_path), "--reuse"]) == 1
    out = capsys.readouterr().out
    assert "patch: 0 test(s)" in out and "attn: 1 test(s)" in out
    assert "tests.models.clip.test_modeling_clip.CLIPTextModelTest::test_c" in out
    # a test asserting the implementation name is listed apart in attn mode, and not counted
    (tmp_path / "attn.xml").write_text(JUNIT.format(c="", d="").replace(
        'name="test_a"/>', 'name="test_sdpa_can_dispatch_composite_models"><failure message="x"/></testcase>'))
    for mode in ("baseline", "patch"):
        (tmp_path / f"{mode}.xml").write_text((tmp_path / f"{mode}.xml").read_text().replace(
            'name="test_a"', 'name="test_sdpa_can_dispatch_composite_models"'))
    assert hf_parity.main([str(tmp_path), "tests/models/clip", "--out", str(tmp_path), "--reuse"]) == 0
    assert "attn: 1 more assert the implementation name" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        hf_parity.main([str(tmp_path), "x", "--modes", "baseline,flash"])


UNITTEST_FILE = """
import unittest

import transformers

from clipfast.patching import is_fast


class Tester:
    hidden_size = 32
    num_attention_heads = 4


class TinyTest(unittest.TestCase):
    def setUp(self):
        self.model_tester = Tester()

    def test_heads_are_wide_and_mode_applies(self):
        tester = self.model_tester
        config = transformers.CLIPTextConfig(vocab_size=50, hidden_size=tester.hidden_size, intermediate_size=37,
                                             num_hidden_layers=1, num_attention_heads=tester.num_attention_heads,
                                             max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = transformers.CLIPTextModel(config)
        attention = model.encoder.layers[0].self_attn
        self.assertEqual(attention.head_dim, 16)
        self.assertEqual(is_fast(attention), {MODE!r} == "patch")
        self.assertEqual(model.config._attn_implementation, {IMPL!r})
"""


def test_plugin_end_to_end(tmp_path, mode="attn", impl="clipfast"):
    (tmp_path / "test_tiny.py").write_text(textwrap.dedent(UNITTEST_FILE).replace("{MODE!r}", repr(mode))
                                           .replace("{IMPL!r}", repr(impl)))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "clipfast.testing.hf_parity",
                          "-p", "no:cacheprovider", f"--clipfast-mode={mode}", "test_tiny.py"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "1 passed" in run.stdout


# ----------------------------------------------------------------------------------------------
# Found by the parity run: from_pretrained builds models on the meta device, so patching at construction
# (patch mode) met vision embeddings whose position_ids had no values yet, and the check crashed
# ----------------------------------------------------------------------------------------------

VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=32,
              patch_size=8)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_models_patched_while_on_the_meta_device_load_and_fuse(tmp_path, family):
    from clipfast import _validate

    cls, config_cls = {"clip": (transformers.CLIPVisionModel, transformers.CLIPVisionConfig),
                       "siglip": (transformers.SiglipVisionModel, transformers.SiglipVisionConfig)}[family]
    reference = cls(config_cls(**VISION)).eval()
    reference.save_pretrained(tmp_path)
    undo = hf_parity.install("patch")
    try:
        model = cls.from_pretrained(tmp_path).eval()  # patched inside, before the weights were loaded
    finally:
        undo()
    embeddings = model.embeddings
    assert is_fast(embeddings) and "_clipfast_positions_ok" not in vars(embeddings)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference(pixel_values=pixels).last_hidden_state
        got = model(pixel_values=pixels).last_hidden_state
    assert vars(embeddings)["_clipfast_positions_ok"] is True  # checked once, on the first forward
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    # ids that are not 0..N-1 once loaded: the original embedding runs, with a one-time warning
    with torch.device("meta"):
        meta = cls(config_cls(**VISION))
    clipfast_report = __import__("clipfast").patch(meta)
    assert any(s.family == "patch_embed" for s in clipfast_report.swapped)
    meta = meta.to_empty(device="cpu").eval()
    meta.load_state_dict(reference.state_dict())
    ids = meta.embeddings.position_ids
    ids.copy_(torch.arange(ids.numel()).flip(0).reshape(ids.shape))
    reference.embeddings.position_ids.copy_(ids)
    _validate._warned.discard("hf_custom_position_ids")
    with pytest.warns(RuntimeWarning, match="position_ids"), torch.no_grad():
        got = meta(pixel_values=pixels).last_hidden_state
    with torch.no_grad():
        torch.testing.assert_close(got, reference(pixel_values=pixels).last_hidden_state, rtol=1e-4, atol=1e-4)
