"""Edge footprint: a child process loads a bundle with the torch-free runtime, serves predictions and reports
its resident memory; nothing heavy may be imported there."""

from __future__ import annotations

import pytest

from _export_helpers import build_run
from compressor.runtime.footprint import measure_footprint


@pytest.fixture(scope="module")
def bundle_dir():
    return build_run().outputs["bundle"]["bundle"]


def test_footprint_of_a_bundle_is_measured_in_a_torch_free_child(bundle_dir):
    requests = [{"text": "Anna works for Acme in Oslo .", "question": "Who works ?"}, {"text": "Paris is nice ."}]
    out = measure_footprint(bundle_dir, requests, predictions=7, threads=1)
    assert out["heavy_modules"] == []
    assert out["predictions"] == 7 and out["threads"] == 1
    assert set(out["tasks"]) == {"ner", "rel", "sst", "qa"}
    # the process holds at least the interpreter; loading a graph cannot shrink the peak below what was resident
    assert 0 < out["rss_after_import_mib"] <= out["peak_rss_mib"]
    assert out["rss_after_load_mib"] <= out["peak_rss_mib"]
    assert out["load_s"] > 0 and out["predict_s"] > 0


def test_footprint_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="at least one request"):
        measure_footprint(tmp_path, [])
    with pytest.raises(RuntimeError, match="footprint of .* failed"):
        measure_footprint(tmp_path / "missing", [{"text": "x"}])
