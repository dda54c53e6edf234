"""4-bit MatMul weights (ONNX Runtime's MatMulNBits, block-wise) beside INT8: chosen nodes only, smaller than INT8,
close to fp32, demoted to INT8 (not fp32) by the accuracy fallback, served by the torch-free bundle; a block
size MatMulNBits cannot read is refused naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from _export_helpers import build_run, make_run
from compressor.export.matmul4 import (
    NBitsGroup, check_matmul4_block_size, matmul4_blocks, matmul4_candidates, quantize_matmuls_nbits,
)
from compressor.export.quantize import (
    QuantOptions, integer_matmuls, integer_op_counts, prepare_source, quantize_graph, quantized_nodes,
)

FFN_IN = "/encoder/encoder/layer.0/intermediate/dense/MatMul"


@pytest.fixture(scope="module")
def run():
    return build_run()


@pytest.fixture(scope="module")
def source(run, tmp_path_factory):
    """The fused four-task graph (hidden 32, FFN 64), prepared for quantization, and real feeds."""
    from transformers import AutoTokenizer

    from compressor.export.evaluate import calibration_feeds
    from compressor.runtime.spec import GraphSpec
    from compressor.stages.quantize import plugins_from_manifest

    tmp = tmp_path_factory.mktemp("m4")
    src = prepare_source(Path(run.outputs["export"]["onnx"]), tmp / "p" / "model.onnx")
    spec = GraphSpec.read(Path(run.outputs["export"]["graph"]))
    tokenizer = AutoTokenizer.from_pretrained(str(run.model_dir))
    feeds = calibration_feeds(spec, plugins_from_manifest(run.model_dir), run.data, tokenizer, "dev", 16, 2)
    return src, feeds


def _error(fp32: Path, q: Path, feeds) -> float:
    """Largest relative error of any output over ``feeds``."""
    a, b = ort.InferenceSession(str(fp32)), ort.InferenceSession(str(q))
    names = [o.name for o in a.get_outputs()]
    sse, ss = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    for f in feeds:
        for n, x, y in zip(names, a.run(names, f), b.run(names, f)):
            sse[n] += float(np.sum((x.astype(np.float64) - y) ** 2))
            ss[n] += float(np.sum(x.astype(np.float64) ** 2))
    return max((sse[n] / ss[n]) ** 0.5 for n in names if ss[n])


def _ops(path: Path) -> dict[str, str]:
    return {n.name: n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("k,block,bits", [(64, 16, 4), (40, 32, 4), (64, 16, 8), (40, 32, 8)])  # 40: padded block
def test_matmulnbits_computes_with_the_dequantized_weight(k, block, bits, tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(size=(k, 24)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero column stays exactly zero
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 24])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "g.onnx"))
    assert quantize_matmuls_nbits(tmp_path / "g.onnx", tmp_path / "q.onnx", ["mm"], block, accuracy_level=0,
                                 bits=bits) == ["mm"]
    q = onnx.load(str(tmp_path / "q.onnx"))
    assert [n.op_type for n in q.graph.node] == ["MatMulNBits"] and "w" not in {i.name for i in q.graph.initializer}
    assert next(a.i for a in q.graph.node[0].attribute if a.name == "bits") == bits
    _, _, _, deq = matmul4_blocks(w, block, bits)
    # within half a block's step of the weight: (max - min) / (2^bits - 1) / 2 per block
    cols = np.pad(w, ((0, -k % block), (0, 0))).reshape(-1, block, 24)
    step = (np.maximum(cols.max(1), 0) - np.minimum(cols.min(1), 0)) / (2 ** bits - 1)
    assert np.all(np.abs(deq - w) <= np.repeat(step, block, axis=0)[:k] / 2 + 1e-6)
    assert np.all(deq[:, 3] == 0) and np.abs(deq - w).max() > 0
    x = rng.normal(size=(5, k)).astype(np.float32)
    y = ort.InferenceSession(str(tmp_path / "q.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ deq, rtol=1e-4, atol=1e-4)  # ORT reads the blocks as written


def test_chosen_matmuls_go_to_4_bits_smaller_than_int8_and_close_to_fp32(source, tmp_path):
    src, feeds = source
    int8 = quantize_graph(src, tmp_path / "int8.onnx", QuantOptions())
    four = quantize_graph(src, tmp_path / "four.onnx", QuantOptions(matmul_nbits=[NBitsGroup(("*",), block_size=16)]))
    candidates = matmul4_candidates(src, ["*"], [n for n in _ops(src) if "/heads/" in n])
    assert FFN_IN in candidates and not any("/heads/" in n for n in candidates)
    counts, counts8 = integer_op_counts(four), integer_op_counts(int8)
    # every encoder MatMul with a weight (attention output, FFN in and out: 3 a layer) is 4-bit; the fused
    # Attention nodes stay INT8 (QAttention)
    assert counts["MatMulNBits"] == len(candidates) == 6 and counts["QAttention"] == counts8["QAttention"] == 2
    assert counts.get("MatMulInteger", 0) == counts8.get("MatMulInteger", 0) - 6
    assert integer_matmuls(counts) == integer_matmuls(counts8)
    ops = _ops(four)
    assert f"{FFN_IN}_Q4" in ops and FFN_IN not in ops
    assert set(candidates) <= set(quantized_nodes(src, four, QuantOptions(matmul_nbits=[NBitsGroup(("*",))])))
    graph = onnx.load(str(four)).graph
    inits = {i.name: i for i in graph.initializer}
    packed = inits[next(n for n in graph.node if n.name == f"{FFN_IN}_Q4").input[1]]
    # FFN in: K = 32 rows, N = 64 columns -> 64 x (32 / 16 blocks) x (16 / 2 bytes)
    assert list(packed.dims) == [64, 2, 8] and packed.data_type == onnx.TensorProto.UINT8
    assert four.stat().st_size < int8.stat().st_size
    err4, err8 = _error(src, four, feeds), _error(src, int8, feeds)
    assert err4 < 0.25 and err8 < 0.25, (err4, err8)

    only_ffn = quantize_graph(src, tmp_path / "ffn.onnx", QuantOptions(
        matmul_nbits=[NBitsGroup(("*/intermediate/*",), block_size=16)]))
    assert integer_op_counts(only_ffn)["MatMulNBits"] == 2  # one FFN-in MatMul a layer
    excluded = quantize_graph(src, tmp_path / "ex.onnx", QuantOptions(matmul_nbits=[NBitsGroup(("*",))], exclude_nodes=[FFN_IN]))
    assert _ops(excluded)[FFN_IN] == "MatMul"  # exclude_nodes wins: fp32


def test_groups_mix_4_and_8_bits_and_the_first_group_choosing_a_node_wins(source, tmp_path):
    src, feeds = source
    mixed = quantize_graph(src, tmp_path / "mix.onnx", QuantOptions(matmul_nbits=[
        NBitsGroup(("*/intermediate/*",), bits=4, block_size=16), NBitsGroup(("*",), bits=8, block_size=16)]))
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits")
            for n in onnx.load(str(mixed)).graph.node if n.op_type == "MatMulNBits"}
    # 6 weighted encoder MatMuls: the 2 FFN inputs in 4 bits (first group), the other 4 in 8 (second group)
    assert len(bits) == 6 and bits[f"{FFN_IN}_Q4"] == 4
    assert sorted(b for n, b in bits.items() if "/intermediate/" in n) == [4, 4]
    assert sorted(b for n, b in bits.items() if "/intermediate/" not in n) == [8] * 4
    eight = quantize_graph(src, tmp_path / "eight.onnx",
                           QuantOptions(matmul_nbits=[NBitsGroup(("*",), bits=8, block_size=16)]))
    four = quantize_graph(src, tmp_path / "four.onnx",
                          QuantOptions(matmul_nbits=[NBitsGroup(("*",), bits=4, block_size=16)]))
    # one byte a weight: bigger than 4 bits, and closer to fp32 (same blocks, 17x finer steps)
    assert four.stat().st_size < mixed.stat().st_size < eight.stat().st_size
    assert _error(src, eight, feeds) < _error(src, four, feeds)


def test_the_fallback_sends_a_4_bit_node_to_int8_first(source, tmp_path):
    src, _ = source
    options = QuantOptions(matmul_nbits=[NBitsGroup(("*",), block_size=16)])
    full = integer_op_counts(quantize_graph(src, tmp_path / "a.onnx", options))
    moved = quantize_graph(src, tmp_path / "b.onnx", options, exclude=[FFN_IN])
    counts = integer_op_counts(moved)
    assert counts["MatMulNBits"] == full["MatMulNBits"] - 1
    assert counts["MatMulInteger"] == full.get("MatMulInteger", 0) + 1
    assert FFN_IN not in _ops(moved) and f"{FFN_IN}_Q4" not in _ops(moved)  # INT8 now, not fp32
    # a node that is not 4-bit still goes back to fp32
    other = next(n for n, t in _ops(src).items() if t == "Attention")
    assert _ops(quantize_graph(src, tmp_path / "c.onnx", options, exclude=[other]))[other] == "Attention"


def test_stage_judges_4_bit_nodes_and_the_bundle_serves_them(run, tmp_path):
    from compressor.runtime import Bundle

    # the older name of matmul_nbits, one group
    r = make_run([{"kind": "export"}, {"kind": "quantize", "tolerance": 1.0,
                                       "matmul_int4": {"nodes": ["*"], "block_size": 16}},
                  {"kind": "bundle"}], tmp_path, model_dir=run.model_dir)
    for i in range(3):
        r.run_stage(i)
    out = r.outputs["quantize"]
    assert out["integer_ops"]["MatMulNBits"] == 6
    summary = json.loads((Path(out["onnx"]).parent / "quantization.json").read_text())
    assert summary["matmul_nbits"] == [{"nodes": ["*"], "block_size": 16, "bits": 4, "accuracy_level": 4}]
    assert any("(6 of them block-wise MatMulNBits (*: 4-bit, blocks of 16)" in n for n in r.results["quantize"].notes)
    assert Path(out["onnx"]).stat().st_size < Path(run.outputs["quantize"]["onnx"]).stat().st_size
    bundle = Bundle.load(r.outputs["bundle"]["bundle"], threads=1)
    answers = bundle.predict(["Alice works for Acme in Paris ."], questions="Where does Alice work ?")
    assert set(answers[0]["predictions"]) == {"ner", "rel", "sst", "qa"}
    assert answers[0]["predictions"]["sst"]["label"] in bundle.spec.tasks["sst"].decoder["labels"]


@pytest.mark.parametrize("block", [8, 48, 100])
def test_a_block_size_matmulnbits_cannot_read_is_refused(block, tmp_path):
    from compressor.recipe.export_stages import QuantizeStage

    with pytest.raises(ValueError, match="(?s)matmul_nbits.0.block_size.*power of two of at least 16"):
        QuantizeStage.model_validate({"kind": "quantize", "matmul_int4": {"block_size": block}})
    with pytest.raises(ValueError, match="power of two of at least 16"):
        check_matmul4_block_size(block)
    with pytest.raises(ValueError, match="power of two of at least 16"):
        quantize_matmuls_nbits(tmp_path / "none.onnx", tmp_path / "out.onnx", [], block_size=block)
