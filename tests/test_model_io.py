"""``compressor.model.io``: the one finite-weights check, shared by model loading and the training loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compressor.errors import ModelDirError
from compressor.model.io import check_finite, nonfinite


def test_nonfinite_names_float_tensors_with_nan_or_inf_only():
    state = {"ok": torch.ones(3), "nan": torch.tensor([1.0, float("nan")]), "inf": torch.tensor([float("inf")]),
             "ids": torch.tensor([1, 2])}
    assert nonfinite(state) == ["nan", "inf"]
    assert nonfinite({"ok": torch.zeros(2)}) == []


def test_check_finite_names_the_source_and_the_first_bad_tensor():
    with pytest.raises(ModelDirError, match=r"m/model.safetensors: 1 of 2 tensor\(s\) hold NaN.*e\.g\. b"):
        check_finite({"a": torch.ones(1), "b": torch.tensor([float("nan")])}, Path("m/model.safetensors"))
