"""The ``bundle`` stage: the final graph (INT8 if a quantize stage ran, else fp32) as an edge bundle.

Artefact: ``ctx.out_dir / "bundle"`` (``model.onnx``, ``tokenizer.json``, ``tasks.json``, and ``config.json`` +
tokenizer config for optimum and transformers), loaded back with the torch-free runtime and run once per task as a check before the stage succeeds.
"""

from __future__ import annotations

from compressor.recipe import BundleStage
from compressor.rundir import Graph
from compressor.stages import StageContext, StageResult

_CHECK_TEXT = "Anna Schmidt works for Acme Corp in Oslo ."
_CHECK_QUESTION = "Where does Anna Schmidt work ?"


def run(ctx: StageContext) -> StageResult:
    from transformers import AutoTokenizer

    from compressor.export.bundle import write_bundle
    from compressor.runtime import Bundle
    from compressor.runtime.spec import GraphSpec

    cfg: BundleStage = ctx.stage
    source_name, source = ctx.latest(Graph, cfg.source)
    spec = GraphSpec.read(source.spec)
    model_dir = source.model_dir
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    quantized = "quantization" in spec.metadata
    directory = write_bundle(ctx.out_dir / "bundle", source.onnx, spec, model_dir / "tokenizer.json",
                             pad_id, {"source_stage": source_name, "format": "onnx-int8" if quantized else "onnx"},
                             model_dir=model_dir, word_splitter=cfg.word_splitter)

    notes = []
    if cfg.check:
        bundle = Bundle.load(directory)
        pairs = [_CHECK_TEXT] if any(t.decoder.get("text_pair") for t in spec.tasks.values()) else None
        result = bundle.predict(_CHECK_TEXT, questions=_CHECK_QUESTION, text_pairs=pairs)[0]
        served = sorted(result["predictions"])
        notes.append(f"bundle loads with the torch-free runtime; check prediction ran for {', '.join(served)}")
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir())}
    notes.insert(0, f"bundle from stage '{source_name}' ({'INT8' if quantized else 'fp32'}): "
                    + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in files.items()))
    outputs = {
        "bundle": str(ctx.final_dir / "bundle"),
        "source_stage": source_name,
        "format": "onnx-int8" if quantized else "onnx",
        "files": files,
        "size_bytes": sum(files.values()),
        "tasks": list(spec.tasks),
    }
    return StageResult(outputs=outputs, notes=notes)
