"""Quantized embedding tables. Per-row INT8: the lookup stays within half a row's step of fp32 (where one scale per
table loses small rows), the table is stored INT8 with fp32 row scales, the graph shrinks by ~3/4 of the table, and
the quantize stage reports which nodes stayed fp32 and why. INT4 per block: within half a block's step, stored as
packed 4-bit values with fp32 block scales (about 5/8 of INT8's bytes at blocks of 32), only for the largest
table, served by ONNX Runtime's GatherBlockQuantized through the bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from _export_helpers import build_run
from compressor.export.embedding_rows import int4_blocks
from compressor.export.quantize import (
    QuantOptions, embedding_tables, fp32_nodes, integer_op_counts, prepare_source, quantize_embedding_rows,
    quantize_graph, quantized_nodes,
)

WORD_TABLE = "encoder.embeddings.word_embeddings.weight"
WORD_GATHER = "/encoder/embeddings/word_embeddings/Gather"


def _lookup_graph(path: Path, table: np.ndarray) -> Path:
    """ids -> Gather(table) -> emb, and a second consumer-free copy of nothing else."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="lookup")], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["b", "s", table.shape[1]])],
        [numpy_helper.from_array(table, "table")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _run(path: Path, ids: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]


def test_per_row_lookup_within_half_a_step_of_fp32(tmp_path):
    rng = np.random.default_rng(0)
    # rows of very different magnitude: one scale for the table would round the small rows to 0
    table = (rng.standard_normal((5000, 24)) * np.logspace(-3, 0, 5000)[:, None]).astype(np.float32)
    src = _lookup_graph(tmp_path / "fp32.onnx", table)
    records = quantize_embedding_rows(src, tmp_path / "int8.onnx")
    assert [(r.node, r.table, r.shape) for r in records] == [("lookup", "table", (5000, 24))]

    ids = rng.integers(0, 5000, size=(3, 40))
    ref, got = _run(src, ids), _run(tmp_path / "int8.onnx", ids)
    step = np.abs(table).max(axis=1) / 127  # each row's quantization step
    # stated tolerance: every element within half its row's step of fp32, i.e. <= 0.4% of the row's largest value
    assert np.all(np.abs(got - ref) <= 0.5 * step[ids][..., None] * (1 + 1e-5))
    assert np.abs(got - ref).max() == pytest.approx(records[0].max_abs_error, rel=0.05) or \
        np.abs(got - ref).max() <= records[0].max_abs_error
    rel = np.linalg.norm(got - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert rel.max() < 0.01
    # per tensor, a small row's values fall below one step of the table and round to zero
    per_tensor = np.rint(table / (np.abs(table).max() / 127)) * (np.abs(table).max() / 127)
    assert (np.linalg.norm(per_tensor[ids] - ref, axis=-1) / np.linalg.norm(ref, axis=-1)).max() > 0.5

    # stored INT8 with fp32 row scales; the fp32 table is gone
    model = onnx.load(str(tmp_path / "int8.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    assert set(inits) == {"table_int8_rows", "table_row_scales"}
    assert inits["table_int8_rows"].data_type == TensorProto.INT8 and list(inits["table_int8_rows"].dims) == [5000, 24]
    assert inits["table_row_scales"].data_type == TensorProto.FLOAT and list(inits["table_row_scales"].dims) == [5000, 1]
    assert [n.op_type for n in model.graph.node] == ["Gather", "Gather", "Cast", "Mul"]
    assert model.graph.node[-1].output[0] == "emb"  # same output name: sensitivity and parity see the same tensor
    fp32_bytes, int8_bytes = src.stat().st_size, (tmp_path / "int8.onnx").stat().st_size
    assert int8_bytes < 0.3 * fp32_bytes and records[0].quantized_bytes == 5000 * 24 + 5000 * 4


def test_int4_block_lookup_within_half_a_block_step_of_fp32(tmp_path):
    rng = np.random.default_rng(2)
    # 100 columns: 3 full blocks of 32 and a partial one of 4; rows of very different magnitude
    table = (rng.standard_normal((3000, 100)) * np.logspace(-3, 0, 3000)[:, None]).astype(np.float32)
    table[7, 40:64] = 0.0  # a block of zeros keeps a usable scale and decodes to zeros
    src = _lookup_graph(tmp_path / "fp32.onnx", table)
    records = quantize_embedding_rows(src, tmp_path / "int4.onnx", bits=4, block_size=32)
    assert [(r.node, r.table, r.shape, r.bits) for r in records] == [("lookup", "table", (3000, 100), 4)]

    ids = rng.integers(0, 3000, size=(4, 30))
    ids[0, 0] = 7
    ref, got = _run(src, ids), _run(tmp_path / "int4.onnx", ids)
    padded = np.zeros((3000, 128), np.float32)
    padded[:, :100] = table
    step = np.abs(padded.reshape(3000, 4, 32)).max(axis=2) / 7  # each block's quantization step
    step_per_element = np.repeat(step, 32, axis=1)[:, :100]
    # stated tolerance: every element within half its block's step of fp32 (<= 1/14 of the block's largest value)
    assert np.all(np.abs(got - ref) <= 0.5 * step_per_element[ids] * (1 + 1e-5))
    assert np.abs(got - ref).max() <= records[0].max_abs_error * (1 + 1e-6)
    assert np.all(got[0, 0, 40:64] == 0.0)
    # the same numbers as the numpy reference the stage's records are computed from
    _, _, deq = int4_blocks(table, 32)
    assert np.allclose(got, deq[ids], atol=1e-7)

    # stored as packed 4-bit values (two per byte) with fp32 block scales (some of this table's scales are below
    # fp16's normal range: see the next test for fp16 scales); the fp32 table is gone
    model = onnx.load(str(tmp_path / "int4.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    assert set(inits) == {"table_int4_blocks", "table_block_scales"}
    assert inits["table_int4_blocks"].data_type == TensorProto.UINT8 and list(inits["table_int4_blocks"].dims) == [3000, 50]
    assert list(inits["table_block_scales"].dims) == [3000, 4]
    assert [(n.op_type, n.domain) for n in model.graph.node] == [("GatherBlockQuantized", "com.microsoft")]
    assert model.graph.node[0].output[0] == "emb"
    assert records[0].quantized_bytes == 3000 * 50 + 3000 * 4 * 4
    from compressor.export.onnx_export import onnx_param_count

    assert onnx_param_count(tmp_path / "int4.onnx") == 3000 * 100 + 3000 * 4  # two values a byte, plus the scales
    int8 = quantize_embedding_rows(src, tmp_path / "int8.onnx")
    # 50 + 16 bytes a row against 100 + 4: at 100 columns the fp32 block scales are a quarter of the INT4 bytes
    assert (tmp_path / "int4.onnx").stat().st_size < 0.65 * (tmp_path / "int8.onnx").stat().st_size
    assert records[0].max_abs_error > int8[0].max_abs_error  # coarser: what the stage's accuracy check is for


def test_int4_block_scales_are_stored_as_fp16_when_they_fit_and_lose_nothing(tmp_path):
    rng = np.random.default_rng(3)
    table = (rng.standard_normal((2000, 64)) * 0.05).astype(np.float32)  # a word table's magnitude
    src = _lookup_graph(tmp_path / "fp32.onnx", table)
    records = quantize_embedding_rows(src, tmp_path / "int4.onnx", bits=4, block_size=32)
    model = onnx.load(str(tmp_path / "int4.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    assert inits["table_block_scales"].data_type == TensorProto.FLOAT16
    assert [n.op_type for n in model.graph.node] == ["Cast", "GatherBlockQuantized"]
    assert records[0].quantized_bytes == 2000 * 32 + 2000 * 2 * 2  # 2 bytes a scale
    ids = rng.integers(0, 2000, size=(3, 20))
    got = _run(tmp_path / "int4.onnx", ids)
    _, scales, deq = int4_blocks(table, 32)
    assert scales.dtype == np.float16
    # the 4-bit values were computed with the rounded scales: ONNX Runtime returns the reference bit for bit,
    # within half a (rounded) step of fp32
    assert np.array_equal(got, deq[ids])
    step = np.repeat(scales.astype(np.float32), 32, axis=1)
    assert np.all(np.abs(deq - table) <= 0.5 * step * (1 + 1e-6))


def test_int4_goes_to_the_largest_table_only_even_when_it_is_excluded(tmp_path):
    rng = np.random.default_rng(4)
    words, positions = rng.standard_normal((2000, 64)).astype(np.float32), rng.standard_normal((128, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["words", "ids"], ["w"], name="word_lookup"),
         helper.make_node("Gather", ["positions", "pos"], ["p"], name="position_lookup"),
         helper.make_node("Add", ["w", "p"], ["emb"], name="add")], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"]),
         helper.make_tensor_value_info("pos", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(words, "words"), numpy_helper.from_array(positions, "positions")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "g.onnx"))
    records = quantize_embedding_rows(tmp_path / "g.onnx", tmp_path / "q.onnx", bits=4)
    assert {r.table: r.bits for r in records} == {"words": 4, "positions": 8}
    ops = {n.name: n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert ops["word_lookup/int4_blocks"] == "GatherBlockQuantized" and "position_lookup/int8_rows/Gather" in ops
    # an exclusion keeps the word table fp32: the position table does not take its 4 bits
    records = quantize_embedding_rows(tmp_path / "g.onnx", tmp_path / "q2.onnx", bits=4, exclude={"word_lookup"})
    assert {r.table: r.bits for r in records} == {"positions": 8}
    # the accuracy fallback's first step for the 4-bit table is INT8 per row, not fp32 (a 4x larger table);
    # an 8-bit table the fallback names still goes to fp32
    records = quantize_embedding_rows(tmp_path / "g.onnx", tmp_path / "q3.onnx", bits=4,
                                      exclude={"word_lookup", "position_lookup"},
                                      int8_instead={"word_lookup", "position_lookup"})
    assert {r.table: r.bits for r in records} == {"words": 8}
    q3 = onnx.load(str(tmp_path / "q3.onnx"))
    assert {i.name for i in q3.graph.initializer} == {"words_int8_rows", "words_row_scales", "positions"}
    ids, pos = np.array([[5, 1999, 0]]), np.array([[0, 1, 2]])
    got = ort.InferenceSession(str(tmp_path / "q3.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"ids": ids, "pos": pos})[0]
    step = np.abs(words).max(axis=1) / 127.0
    assert np.all(np.abs(got - (words[ids] + positions[pos])) <= step[ids][..., None] / 2 + 1e-6)


@pytest.mark.parametrize("block", [0, 24, 8])
def test_int4_block_size_must_be_a_power_of_two_of_at_least_16(tmp_path, block):
    src = _lookup_graph(tmp_path / "fp32.onnx", np.ones((300, 20), np.float32))
    with pytest.raises(ValueError, match="power of two of at least 16"):
        quantize_embedding_rows(src, tmp_path / "q.onnx", bits=4, block_size=block)
    assert not (tmp_path / "q.onnx").exists()


def test_tied_table_keeps_its_fp32_copy_and_small_tables_stay(tmp_path):
    table = np.random.default_rng(1).standard_normal((100, 8)).astype(np.float32)
    small = np.ones((2, 8), np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="lookup"),
         helper.make_node("Gather", ["small", "ids"], ["emb2"], name="types"),
         helper.make_node("MatMul", ["emb", "tableT"], ["logits"], name="tied"),
         helper.make_node("Transpose", ["table"], ["tableT"], name="t")], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("emb2", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(small, "small")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "g.onnx"))
    assert embedding_tables(onnx.load(str(tmp_path / "g.onnx")), min_elements=100) == {"lookup": "table"}
    records = quantize_embedding_rows(tmp_path / "g.onnx", tmp_path / "q.onnx", min_elements=100)
    assert [r.node for r in records] == ["lookup"]
    inits = {i.name for i in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}
    assert {"table", "small", "table_int8_rows", "table_row_scales"} == inits  # the MatMul still reads "table"
    ids = np.array([[1, 0, 1]])
    a = ort.InferenceSession(str(tmp_path / "g.onnx")).run(None, {"ids": ids})
    b = ort.InferenceSession(str(tmp_path / "q.onnx")).run(None, {"ids": ids})
    assert np.allclose(a[1], b[1]) and np.allclose(a[0], b[0], rtol=0.05, atol=0.05)
    assert quantize_embedding_rows(tmp_path / "g.onnx", tmp_path / "q2.onnx", exclude={"lookup"},
                                   min_elements=100) == []


@pytest.fixture(scope="module")
def run():
    return build_run()


@pytest.fixture(scope="module")
def rows_source(run, tmp_path_factory):
    """The raw four-task export fused without EmbedLayerNormalization (what the stage quantizes), prepared."""
    from compressor.export.optimize import fuse_transformer

    tmp = tmp_path_factory.mktemp("rows")
    fused = fuse_transformer(Path(run.outputs["export"]["raw"]), tmp / "rows.onnx", embed_layer_norm=False)
    assert fused["Attention"] == 2 and "EmbedLayerNormalization" not in fused
    return prepare_source(tmp / "rows.onnx", tmp / "p" / "model.onnx")


def test_dynamic_int8_of_every_big_tensor(rows_source, tmp_path):
    q = quantize_graph(rows_source, tmp_path / "q.onnx", QuantOptions())
    counts = integer_op_counts(q)
    assert counts["QAttention"] == 2 and counts["MatMulInteger"] == 6 and counts["int8_gather"] == 2  # word + pos
    inits = {i.name: i for i in onnx.load(str(q)).graph.initializer}
    assert WORD_TABLE not in inits and inits[f"{WORD_TABLE}_int8_rows"].data_type == TensorProto.INT8
    moved = quantized_nodes(rows_source, q, QuantOptions())
    assert WORD_GATHER in moved and "/encoder/embeddings/position_embeddings/Gather" in moved
    # what stays fp32, and why: the heads (by default) and the 2 x 32 token-type table
    left = fp32_nodes(rows_source, q, QuantOptions())
    reasons = {e["reason"].split(" (")[0] for e in left}
    assert reasons == {"task head", "small table"}, left
    assert not [e for e in left if e["op_type"] in ("MatMul", "Attention") and "/heads/" not in e["node"]]
    # size: ~3/4 of the word table's 30522 x 32 x 4 bytes is gone
    table_bytes = 30522 * 32 * 4
    assert rows_source.stat().st_size - q.stat().st_size > 0.7 * table_bytes + 0.7 * 512 * 32 * 4
    per_tensor = quantize_graph(rows_source, tmp_path / "pt.onnx", QuantOptions(embedding="per_tensor"))
    assert "DequantizeLinear" in {n.op_type for n in onnx.load(str(per_tensor)).graph.node}
    fp32 = quantize_graph(rows_source, tmp_path / "fp.onnx", QuantOptions(embedding="fp32"))
    assert integer_op_counts(fp32).get("int8_gather", 0) == 0 and fp32.stat().st_size > q.stat().st_size + 0.7 * table_bytes
    excluded = quantize_graph(rows_source, tmp_path / "ex.onnx", QuantOptions(exclude_nodes=["*word_embeddings*"]))
    assert integer_op_counts(excluded)["int8_gather"] == 1
    assert {e["node"]: e["reason"] for e in fp32_nodes(rows_source, excluded,
                                                      QuantOptions(exclude_nodes=["*word_embeddings*"]))}[WORD_GATHER] \
        == "exclude_nodes pattern"


def test_the_fallback_sends_the_4_bit_word_table_to_int8_and_an_excluded_one_to_fp32(rows_source, tmp_path):
    four = QuantOptions(embedding="int4_block", embedding_block_size=16)
    q = quantize_graph(rows_source, tmp_path / "q4.onnx", four)
    assert integer_op_counts(q)["int4_gather"] == 1
    fallback = quantize_graph(rows_source, tmp_path / "fb.onnx", four, exclude=[WORD_GATHER])
    counts = integer_op_counts(fallback)
    assert counts.get("int4_gather", 0) == 0 and counts["int8_gather"] == 2  # word table INT8 per row, positions
    assert WORD_GATHER in quantized_nodes(rows_source, fallback, four)
    pattern = QuantOptions(embedding="int4_block", embedding_block_size=16, exclude_nodes=["*word_embeddings*"])
    kept = quantize_graph(rows_source, tmp_path / "kept.onnx", pattern, exclude=[WORD_GATHER])
    assert integer_op_counts(kept).get("int4_gather", 0) == 0 and integer_op_counts(kept)["int8_gather"] == 1
    assert WORD_TABLE in {i.name for i in onnx.load(str(kept)).graph.initializer}  # a user's exclusion stays fp32


def test_stage_quantizes_the_embedding_per_row_and_says_what_stayed_fp32(run):
    out = run.outputs["quantize"]
    q = Path(out["onnx"])
    inits = {i.name: i for i in onnx.load(str(q)).graph.initializer}
    assert inits[f"{WORD_TABLE}_int8_rows"].data_type == TensorProto.INT8 and WORD_TABLE not in inits
    assert out["integer_ops"]["int8_gather"] >= 2 and out["integer_ops"]["QAttention"] == 2
    summary = json.loads((q.parent / "quantization.json").read_text())
    assert summary["embedding"] == "per_row" and "without EmbedLayerNormalization" in summary["source_notes"][0]
    assert all(e["node"] != WORD_GATHER for e in summary["fp32_nodes"])
    assert {e["reason"].split(" (")[0] for e in summary["fp32_nodes"]} <= {"task head", "small table",
                                                                         "accuracy fallback"}
    notes = run.results["quantize"].notes
    assert any(" INT8 embedding table lookup(s) (per_row)" in n for n in notes)
    assert any(n.startswith("left fp32: ") and "task head" in n for n in notes)
    fp32_size = Path(run.outputs["export"]["onnx"]).stat().st_size
    assert q.stat().st_size < 0.4 * fp32_size


def test_auto_mode_keeps_the_faster_graph_within_tolerance(run, tmp_path):
    from _export_helpers import make_run

    r = make_run([{"kind": "export"}, {"kind": "quantize", "mode": "auto", "tolerance": 1.0,
                                       "calibration": {"samples": 8}}], tmp_path, tasks=("sst",))
    r.run_stage(0)
    result = r.run_stage(1)
    compared = result.outputs["compared"]
    assert set(compared) == {"dynamic", "static", "chosen", "rule"} and compared["dynamic"]["passed"]
    assert compared["static"]["passed"] and compared["rule"] == "faster of the modes within every tolerance"
    faster = min(("dynamic", "static"), key=lambda m: compared[m]["latency_ms_p50"])
    assert compared["chosen"] == faster == result.outputs["mode"]
    summary = json.loads((tmp_path / "01-quantize" / "quantization.json").read_text())
    assert summary["mode"] == faster and summary["requested_mode"] == "auto"
    # both graphs store the word embedding INT8 per row
    q = onnx.load(str(result.outputs["onnx"]))
    assert {i.name: i.data_type for i in q.graph.initializer}[f"{WORD_TABLE}_int8_rows"] == TensorProto.INT8
    assert any(n.startswith("static vs dynamic: ") and f"kept {faster}" in n for n in result.notes)


def test_int4_block_stage_stores_the_word_table_in_4_bits_and_the_bundle_serves_it(run, tmp_path):
    from _export_helpers import make_run
    from compressor.runtime import Bundle

    r = make_run([{"kind": "export"}, {"kind": "quantize", "embedding": "int4_block", "embedding_block_size": 16,
                   "tolerance": 1.0}, {"kind": "bundle"}], tmp_path, model_dir=run.model_dir)
    for i in range(3):
        r.run_stage(i)
    out = r.outputs["quantize"]
    q = Path(out["onnx"])
    inits = {i.name: i for i in onnx.load(str(q)).graph.initializer}
    assert WORD_TABLE not in inits and inits[f"{WORD_TABLE}_int4_blocks"].data_type == TensorProto.UINT8
    assert list(inits[f"{WORD_TABLE}_int4_blocks"].dims) == [30522, 16]  # hidden 32: 16 bytes a row
    assert list(inits[f"{WORD_TABLE}_block_scales"].dims) == [30522, 2]
    # the word table in 4 bits, the position table (the smaller one) INT8 per row
    assert out["integer_ops"]["int4_gather"] == 1 and out["integer_ops"]["int8_gather"] == 1
    assert inits["encoder.embeddings.position_embeddings.weight_int8_rows"].data_type == TensorProto.INT8
    summary = json.loads((q.parent / "quantization.json").read_text())
    assert summary["embedding"] == "int4_block" and summary["embedding_block_size"] == 16
    assert all(e["node"] != WORD_GATHER for e in summary["fp32_nodes"])
    assert any("1 INT4 (blocks of 16) and 1 INT8 embedding table lookup(s) (int4_block)" in n
               for n in r.results["quantize"].notes)
    # a word-table row: 16 bytes of 4-bit values + 2 fp32 block scales, against per-row INT8's 32 + 4
    per_row = Path(run.outputs["quantize"]["onnx"])
    assert per_row.stat().st_size - q.stat().st_size > 0.95 * 30522 * (36 - 24)
    # the torch-free runtime loads the contrib op and answers every task
    bundle = Bundle.load(r.outputs["bundle"]["bundle"], threads=1)
    answers = bundle.predict(["Alice works for Acme in Paris ."], questions="Where does Alice work ?")
    assert len(answers) == 1 and set(answers[0]["predictions"]) == set(bundle.tasks) == {"ner", "rel", "sst", "qa"}
    assert answers[0]["predictions"]["sst"]["label"] in bundle.spec.tasks["sst"].decoder["labels"]


def test_recipe_refuses_an_int4_block_size_ort_cannot_read():
    from compressor.recipe.export_stages import QuantizeStage

    with pytest.raises(ValueError, match="(?s)embedding_block_size.*power of two of at least 16"):
        QuantizeStage.model_validate({"kind": "quantize", "embedding": "int4_block", "embedding_block_size": 48})


def _head_graph(path: Path) -> Path:
    """x -> encoder MatMul (300 x 300) -> head hidden MatMul (300 x 300, a relation head's pair layer) -> logits
    MatMul (300 x 5): the head nodes under ``/heads/re/`` as the exporter names them."""
    rng = np.random.default_rng(0)
    weights = {"enc_w": (300, 300), "hid_w": (300, 300), "out_w": (300, 5)}
    nodes = [helper.make_node("MatMul", ["x", "enc_w"], ["h"], name="/encoder/layer.0/MatMul"),
             helper.make_node("MatMul", ["h", "hid_w"], ["g"], name="/heads/re/hidden/MatMul"),
             helper.make_node("MatMul", ["g", "out_w"], ["logits"], name="/heads/re/out/MatMul")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 300])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 5])],
        [numpy_helper.from_array((rng.standard_normal(s) * 0.05).astype(np.float32), n) for n, s in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("heads, int8_nodes", [
    ("large", {"/encoder/layer.0/MatMul", "/heads/re/hidden/MatMul"}),
    (True, {"/encoder/layer.0/MatMul", "/heads/re/hidden/MatMul", "/heads/re/out/MatMul"}),
    (False, {"/encoder/layer.0/MatMul"}),
])
def test_large_head_matrices_are_quantized_and_the_logit_layer_stays_fp32(tmp_path, heads, int8_nodes):
    src = _head_graph(tmp_path / "fp32.onnx")
    options = QuantOptions(quantize_heads=heads, embedding="fp32")
    assert QuantOptions().quantize_heads == "large"  # the default
    q = quantize_graph(src, tmp_path / "int8.onnx", options)
    assert set(quantized_nodes(src, q, options)) == int8_nodes
    left = {e["node"]: e["reason"] for e in fp32_nodes(src, q, options)}
    assert set(left) == {n.name for n in onnx.load(str(src)).graph.node} - int8_nodes
    if heads == "large":
        assert left["/heads/re/out/MatMul"].startswith("task head (quantize_heads: large; 1,500 weight elements")
    # the quantized graph still computes what the fp32 one does
    x = np.random.default_rng(1).standard_normal((4, 300)).astype(np.float32)
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(q), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
