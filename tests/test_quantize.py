"""INT8 quantization: integer MatMuls in dynamic and static (QDQ) graphs, outputs close to fp32, exclusions,
and the accuracy-aware loop moving sensitive nodes back to fp32 (or reporting that it could not)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from _export_helpers import QA_FILE, build_run, make_run
from compressor.errors import RecipeError
from compressor.export.quantize import (
    QuantizationError, QuantOptions, calibrate, integer_matmuls, integer_op_counts, nodes_to_exclude,
    prepare_source, quantize_graph, quantized_nodes, relative_drop,
)
from compressor.runtime.spec import GraphSpec


@pytest.fixture(scope="module")
def run():
    return build_run()


@pytest.fixture(scope="module")
def prepared(run, tmp_path_factory):
    """The fused and the raw fp32 graphs of the four-task model, prepared for quantization."""
    tmp = tmp_path_factory.mktemp("prepared")
    export = run.outputs["export"]
    return {"fused": prepare_source(Path(export["onnx"]), tmp / "fused" / "model.onnx"),
            "raw": prepare_source(Path(export["raw"]), tmp / "raw" / "model.onnx")}


@pytest.fixture(scope="module")
def feeds(run):
    """Real graph feeds: collated dev batches of every task (different sequence lengths)."""
    from compressor.export.evaluate import calibration_feeds
    from compressor.stages.quantize import plugins_from_manifest
    from transformers import AutoTokenizer

    spec = GraphSpec.read(Path(run.outputs["export"]["graph"]))
    tokenizer = AutoTokenizer.from_pretrained(str(run.model_dir))
    return calibration_feeds(spec, plugins_from_manifest(run.model_dir), run.data, tokenizer, "dev", 16, 4)


def _relative_error(fp32: Path, q: Path, feeds) -> dict[str, float]:
    a, b = ort.InferenceSession(str(fp32)), ort.InferenceSession(str(q))
    names = [o.name for o in a.get_outputs()]
    sse, ss = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    for f in feeds:
        for n, x, y in zip(names, a.run(names, f), b.run(names, f)):
            sse[n] += float(np.sum((x.astype(np.float64) - y) ** 2))
            ss[n] += float(np.sum(x.astype(np.float64) ** 2))
    return {n: (sse[n] / ss[n]) ** 0.5 for n in names}


def test_dynamic_int8_has_integer_matmuls_and_stays_close(prepared, feeds, tmp_path):
    q = quantize_graph(prepared["fused"], tmp_path / "q.onnx", QuantOptions(mode="dynamic"))
    counts = integer_op_counts(q)
    # 2 layers: fused attention -> QAttention; attention output, intermediate and output dense -> MatMulInteger
    assert counts["QAttention"] == 2 and counts["MatMulInteger"] == 6
    assert counts["QEmbedLayerNormalization"] == 1 and counts["DynamicQuantizeLinear"] >= 6
    assert integer_matmuls(counts) == 8
    moved = quantized_nodes(prepared["fused"], q, QuantOptions())
    assert sorted(moved) == sorted(["Attention_0", "Attention_1", "EmbedLayerNormalization_0", *(
        f"/encoder/encoder/layer.{i}/{m}/MatMul" for i in (0, 1)
        for m in ("attention/output/dense", "intermediate/dense", "output/dense"))])
    graph = onnx.load(str(q)).graph
    heads = [n for n in graph.node if n.name.startswith("/heads/")]
    assert heads and not [n for n in heads if n.op_type in ("MatMulInteger", "DynamicQuantizeLinear")]
    assert q.stat().st_size < 0.4 * prepared["fused"].stat().st_size  # int8 embedding table and weights
    errors = _relative_error(prepared["fused"], q, feeds)
    assert max(errors.values()) < 0.05, errors


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_static_qdq_calibrated_on_batches_of_different_shapes(prepared, feeds, tmp_path, method):
    assert len({f["input_ids"].shape for f in feeds}) > 1  # ORT's histogram calibrators stack tensors: not here
    options = QuantOptions(mode="static", calibration=method, per_channel=True)
    ranges = calibrate(prepared["raw"], feeds, options, tmp_path)
    assert len(list(ranges.keys())) > 10
    q = quantize_graph(prepared["raw"], tmp_path / "q.onnx", options, ranges=ranges)
    counts = integer_op_counts(q)
    # query, key, value, attention output, intermediate and output dense of 2 layers are QDQ MatMuls at least
    assert counts["qdq_matmul"] >= 12 and counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] > 0
    moved = quantized_nodes(prepared["raw"], q, options)
    assert len([n for n in moved if "/MatMul" in n]) == counts["qdq_matmul"]  # attention scores included
    assert not [n for n in moved if n.startswith("/heads/")]
    errors = _relative_error(prepared["raw"], q, feeds)
    assert max(errors.values()) < 0.25, errors


def test_exclusions_keep_op_types_and_name_patterns_fp32(prepared, tmp_path):
    options = QuantOptions(exclude_op_types=["EmbedLayerNormalization"], exclude_nodes=["*/layer.1/*"])
    excluded = nodes_to_exclude(prepared["fused"], options)
    assert any("layer.1" in n for n in excluded) and "EmbedLayerNormalization_0" in excluded
    q = quantize_graph(prepared["fused"], tmp_path / "q.onnx", options)
    graph = onnx.load(str(q)).graph
    ops = {n.op_type for n in graph.node}
    assert "EmbedLayerNormalization" in ops and "QEmbedLayerNormalization" not in ops
    layer1 = [n for n in graph.node if "/layer.1/" in n.name and n.op_type.startswith("MatMul")]
    assert layer1 and all(n.op_type == "MatMul" for n in layer1)
    assert integer_op_counts(q)["MatMulInteger"] == 3  # layer 0 only


def test_stage_rows_and_artefacts(run):
    out = run.outputs["quantize"]
    q = Path(out["onnx"])
    assert q.is_file() and out["integer_matmuls"] == integer_matmuls(integer_op_counts(q)) > 0
    summary = json.loads((q.parent / "quantization.json").read_text())
    assert summary["mode"] == "dynamic" and summary["attempts"][0]["iteration"] == 0
    assert set(summary["reference"]) == {"ner", "rel", "sst", "qa"}
    rows = [r for r in run.reporter.rows if r["stage"] == "quantize"]
    assert {(r["task"], r["split"]) for r in rows} == {(r["task"], r["split"]) for r in run.reporter.rows
                                                         if r["stage"] == "export"}
    fp32_size = Path(run.outputs["export"]["onnx"]).stat().st_size
    for r in rows:
        assert r["format"] == "onnx-int8" and r["size_bytes"] == q.stat().st_size < fp32_size
        assert r["integer_matmuls"] == out["integer_matmuls"] and r["latency_ms_p50"] > 0
    spec = GraphSpec.read(Path(out["graph"]))
    assert spec.metadata["quantization"]["mode"] == "dynamic"


def test_relative_drop():
    assert relative_drop(0.8, 0.76) == pytest.approx(0.05)
    assert relative_drop(0.8, 0.9) < 0
    assert relative_drop(2.0, 2.2, higher_is_better=False) == pytest.approx(0.1)
    assert relative_drop(0.0, -0.1) == pytest.approx(0.1)


# ---- the accuracy-aware loop ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fragile(tmp_path_factory):
    """A QA model with LayerNorm activation outliers (per-tensor INT8 hurts it) and a dev set whose reference
    answers are that model's own fp32 predictions: fp32 scores F1 = 1 exactly, so any answer INT8 changes
    counts, and only moving nodes back to fp32 can recover it."""
    from compressor.model.io import load_model
    from compressor.model.forward import torch_forward

    root = tmp_path_factory.mktemp("fragile")
    base = make_run([{"kind": "export"}], root / "base", tasks=("qa",), ln_outlier=10.0)
    model, tokenizer, _ = load_model(base.model_dir)
    examples = base.data.examples("qa", "dev")
    encoded = base.data.encoded("qa", "dev", tokenizer, base.recipe.model.max_length)
    _, predictions = model.tasks["qa"].evaluate(torch_forward(model), encoded, examples)
    squad = json.loads(QA_FILE.read_text())
    answers = iter(predictions)
    for article in squad["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                p = next(answers)
                qa["answers"] = [{"text": p["text"], "answer_start": p["start"]}]
    relabelled = root / "qa_self.json"
    relabelled.write_text(json.dumps(squad))
    return base.model_dir, relabelled


def _fragile_run(fragile, root: Path, **quantize):
    model_dir, relabelled = fragile
    r = make_run([{"kind": "export", "evaluate": False}, {"kind": "quantize", "tolerance": 0.0, **quantize}], root,
                 tasks=("qa",), overrides={"qa": {"dev": str(relabelled)}}, model_dir=model_dir)
    r.run_stage(0)
    return r


def test_fallback_moves_sensitive_nodes_to_fp32_until_tolerance_met(fragile, tmp_path):
    r = _fragile_run(fragile, tmp_path, max_iterations=6, fallback_step=1, fallback_order="error")
    result = r.run_stage(1)
    summary = json.loads((tmp_path / "01-quantize" / "quantization.json").read_text())
    attempts = summary["attempts"]
    assert summary["reference"] == {"qa": 1.0}
    assert attempts[0]["failing"] == ["qa"] and attempts[0]["metrics"]["qa"] < 1.0
    assert summary["passed"] and attempts[-1]["failing"] == [] and attempts[-1]["metrics"]["qa"] == 1.0
    # each round keeps the most sensitive nodes fp32, doubling: 1, 2, 4, ..., but only nodes that add error
    top = summary["sensitivity_top"]
    adding = sum(1 for _, s in top if s > 0)
    cap = adding if adding < len(top) else float("inf")  # the top list is cut: every node in it adds error
    assert [len(a["excluded"]) for a in attempts[1:]] == [min(2**i, cap) for i in range(len(attempts) - 1)]
    ranked = [s for _, s in summary["sensitivity_top"]]
    assert ranked == sorted(ranked, reverse=True)
    assert attempts[-1]["excluded"] == [n for n, _ in summary["sensitivity_top"][: len(attempts[-1]["excluded"])]]
    scores = dict(summary["sensitivity_top"])
    assert all(scores[n] > 0 for n in attempts[-1]["excluded"])  # a node that adds no error is never moved
    assert result.outputs["passed"] and result.outputs["fallback_nodes"] == attempts[-1]["excluded"]
    assert result.outputs["integer_matmuls"] > 0  # not everything went back to fp32
    assert any("within tolerance" in n for n in result.notes)


def test_rank_per_byte_buys_the_most_accuracy_per_weight_first():
    from compressor.export.quant_nodes import rank_per_byte

    ranking = [("word_table", 0.02), ("attention", 0.09), ("ffn_out", 0.08), ("pos_table", 0.019), ("free", 0.0)]
    elements = {"word_table": 30522 * 384, "attention": 3 * 384 * 384, "ffn_out": 1536 * 384,
                "pos_table": 512 * 384, "free": 10}
    # per element: attention 2.03e-7, pos_table 9.7e-8, ffn_out 1.36e-7, word_table 1.7e-9
    assert rank_per_byte(ranking, elements) == [("attention", 0.09), ("ffn_out", 0.08), ("pos_table", 0.019),
                                                ("word_table", 0.02), ("free", 0.0)]


def test_size_aware_fallback_restores_accuracy_per_byte_and_passes(fragile, tmp_path):
    from compressor.export.quant_nodes import weight_elements

    r = _fragile_run(fragile, tmp_path, max_iterations=6, fallback_step=1)  # default order: error_per_byte
    result = r.run_stage(1)
    summary = json.loads((tmp_path / "01-quantize" / "quantization.json").read_text())
    assert summary["passed"] and summary["attempts"][-1]["metrics"]["qa"] == 1.0
    top = summary["sensitivity_top"]
    # the quantized source is the fused graph, re-fused without EmbedLayerNormalization (its Gathers are the raw
    # export's), so a node is in one or the other
    names = [n for n, _ in top]
    elements = {**weight_elements(tmp_path / "00-export" / "model.onnx", names),
                **weight_elements(tmp_path / "00-export" / "model.opt.onnx", names)}
    assert set(elements) == {n for n, _ in top} and all(elements.values())
    per = [s / elements[n] for n, s in top if s > 0]
    assert len(per) > 1 and per == sorted(per, reverse=True)
    assert result.outputs["fallback_nodes"] == [n for n, _ in top[: len(result.outputs["fallback_nodes"])]]


def test_impossible_tolerance_is_reported_or_fails_the_stage(fragile, tmp_path):
    r = _fragile_run(fragile, tmp_path / "warn", max_iterations=0)
    result = r.run_stage(1)
    assert result.outputs["passed"] is False and result.outputs["failing"] == ["qa"]
    assert any(n.startswith("WARNING: quantization missed the tolerance of task(s) qa") for n in result.notes)
    assert any("missed the tolerance" in n for n in r.reporter.notes)
    rows = [row for row in r.reporter.rows if row["format"] == "onnx-int8"]
    assert rows and all(row["within_tolerance"] is False for row in rows)

    r = _fragile_run(fragile, tmp_path / "error", max_iterations=1, on_failure="error")
    with pytest.raises(QuantizationError, match=r"missed the tolerance of task\(s\) qa after 1 fallback round"):
        r.run_stage(1)


def test_tolerance_for_unknown_task_is_a_recipe_error(run, tmp_path):
    r = make_run([{"kind": "export"}, {"kind": "quantize", "tolerances": {"nerr": 0.1}}], tmp_path,
                 model_dir=run.model_dir)
    r.outputs["export"] = run.outputs["export"]
    with pytest.raises(RecipeError, match=r"unknown task\(s\) \['nerr'\]"):
        r.run_stage(1)


def test_quantize_needs_an_export_stage(run, tmp_path):
    r = make_run([{"kind": "quantize"}], tmp_path, model_dir=run.model_dir)
    with pytest.raises(RecipeError, match="needs an export stage before it"):
        r.run_stage(0)


def test_recipe_accepts_the_new_stage_kinds(tmp_path):
    from compressor.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("""\
name: edge
tasks:
  - {name: sst, plugin: classification, data: {train: a.txt}}
stages:
  - {kind: export, optimize: false}
  - kind: quantize
    mode: static
    calibration: {method: entropy, samples: 32}
    tolerances: {sst: 0.02}
  - {kind: bundle}
""")
    recipe = load_recipe(path)
    assert [s.kind for s in recipe.stages] == ["export", "quantize", "bundle"]
    assert recipe.stages[1].calibration.method == "entropy" and recipe.stages[1].tolerances == {"sst": 0.02}
    path.write_text(path.read_text().replace("mode: static", "mode: int4"))
    with pytest.raises(RecipeError, match=r"r\.yaml:7: stages\[1\]\.mode"):
        load_recipe(path)
