"""``mixed_precision``: bf16 where the device computes it natively, fp32 with a warning where it would be emulated."""

from __future__ import annotations

import pytest
import torch

from conftest import FIXTURES
from test_pipeline import recipe_text, tiny_model_path  # noqa: F401  (fixture)

PIPE = FIXTURES / "pipeline"


@pytest.mark.parametrize("native", [True, False])
def test_the_rule_follows_the_hardware(monkeypatch, native):
    import compressor.model.forward as fw

    monkeypatch.setattr(fw, "native_bf16", lambda device: native)
    cpu = torch.device("cpu")
    assert fw.use_bf16("bf16", cpu) is native
    assert fw.use_bf16("auto", cpu) is False and fw.use_bf16("no", cpu) is False
    assert (fw.precision_note("bf16", cpu) is None) is native
    assert fw.precision_note("auto", cpu) is None and fw.precision_note("no", cpu) is None


def test_native_bf16_agrees_with_the_cpu_flags():
    from compressor.model.forward import native_bf16

    with open("/proc/cpuinfo") as f:
        flags = {w for line in f if line.lower().startswith(("flags", "features")) for w in line.split()}
    if flags & {"avx512_bf16", "amx_bf16", "bf16"}:
        assert native_bf16(torch.device("cpu"))
    elif "avx512f" not in flags:  # torch's probes can only add AVX512-class CPUs
        assert not native_bf16(torch.device("cpu"))


@pytest.mark.parametrize("native", [True, False])
def test_training_asked_for_bf16_uses_it_only_where_native(tiny_model_path, tmp_path, monkeypatch, capsys, native):
    import compressor.model.forward as fw
    from compressor.data.store import DataStore
    from compressor.model.multitask import build_model
    from compressor.recipe import load_recipe
    from compressor.train.loop import train_model

    monkeypatch.setattr(fw, "native_bf16", lambda device: native)
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(tiny_model_path, epochs=1, baselines=False))
    recipe = load_recipe(path)
    data = DataStore(recipe.data_options(), PIPE)
    data.fit_labels()
    model, tok = build_model(str(tiny_model_path), data.tasks)
    cfg = recipe.stages[0].model_copy(update={"mixed_precision": "bf16", "steps_per_epoch": 2})
    result = train_model(model, tok, data, cfg, seed=1)
    said = capsys.readouterr()
    assert result.mixed_precision == ("bf16" if native else "no")
    assert ("no native bf16" in said.out + said.err) is not native
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast only: the weights stay fp32
