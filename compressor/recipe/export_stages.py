"""Stages that ship a model: export (one ONNX graph), quantize (INT8, accuracy-aware) and bundle; and the
reference graphs of the teacher (its export and optimum's INT8 of it) that the student is measured against."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from compressor.recipe._base import NAME, Strict, ToleranceTest


class ExportStage(Strict):
    """Export the latest model to ONE ONNX graph (every task's head), checked against PyTorch output by output."""

    kind: Literal["export"]
    name: str = Field("export", pattern=NAME)
    opset: int = Field(17, ge=14, le=21)
    optimize: bool = Field(True, description="ONNX Runtime transformer fusions (checked; basic optimisation if "
                                             "the fused graph fails parity)")
    parity_batches: int = Field(3, gt=0, description="batches per task (dev, then test features) for the parity check")
    parity_batch_size: int = Field(8, gt=0)
    rtol: float = Field(1e-3, ge=0, description="relative tolerance of the parity check, added to each output's atol")
    evaluate: bool = Field(True, description="score every task with ONNX Runtime and add 'onnx' report rows")
    eval_batch_size: int = Field(64, gt=0)


class ReferenceStage(Strict):
    """The teacher as a user gets it without compressor: (b) its checked ONNX export and (c) optimum's dynamic INT8
    of that (``AutoQuantizationConfig.<cpu>(is_static=False, per_channel=False)``, every node, no accuracy loop).
    ``compressor benchmark`` measures both beside the student."""

    kind: Literal["reference"]
    name: str = Field("reference", pattern=NAME)
    target: Literal["auto", "avx512_vnni", "avx2", "arm64"] = Field(
        "auto", description="optimum's quantization preset; auto: this CPU's (avx512_vnni when it has VNNI, else "
        "avx2; arm64 on ARM)")
    parity_batches: int = Field(3, gt=0, description="batches per task for the export's parity check")
    parity_batch_size: int = Field(8, gt=0)
    evaluate: bool = Field(True, description="score every task on both graphs with ONNX Runtime ('reference' "
                           "report rows beside the student's)")
    eval_batch_size: int = Field(64, gt=0)


class QuantCalibration(Strict):
    """Static quantization: activation ranges from task batches."""

    method: Literal["minmax", "percentile", "entropy"] = "minmax"
    split: Literal["train", "dev", "test"] = Field("train", description="falls back to dev/test for a task without it")
    samples: int = Field(64, gt=0, description="features per task (spread over the split)")
    batch_size: int = Field(8, gt=0)
    percentile: float = Field(99.999, gt=0, le=100)
    num_bins: int | None = Field(None, gt=0, description="histogram bins; default 2048 (percentile), 128 (entropy)")


class MatMulNBits(Strict):
    """Block-wise 4- or 8-bit MatMul weights (ONNX Runtime's MatMulNBits) for the MatMuls the patterns choose; the
    other MatMuls stay per-column INT8."""

    nodes: list[str] = Field(["*"], min_length=1, description="node-name patterns (fnmatch) of the MatMuls whose "
                             "constant weights go block-wise, e.g. '*/intermediate/*' for the FFN inputs; '*': every "
                             "MatMul with a constant weight (a fused Attention node is not a MatMul and stays INT8; "
                             "the heads follow quantize_heads; exclude_nodes wins)")
    block_size: int = Field(32, description="elements of a weight column that share one scale and zero point (a "
                            "power of two, at least 16, as ONNX Runtime's MatMulNBits requires)")
    bits: Literal[4, 8] = Field(4, description="bits a weight: 4, or 8 (one byte a weight, a scale per block "
                                "instead of per column; with accuracy_level 4 the activations too get a scale per "
                                "block rather than one per tensor, which is what loses less than dynamic INT8)")
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        4, description="MatMulNBits accuracy_level: 4 quantizes the activations to 8 bits and multiplies in "
        "integers (fastest on CPUs with VNNI / AVX2); 0 dequantizes the weights and multiplies in fp32")

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v < 16 or v & (v - 1):
            raise ValueError(f"must be a power of two of at least 16, as ONNX Runtime's MatMulNBits requires "
                             f"(got {v})")
        return v


class QuantizeStage(ToleranceTest):
    """INT8 quantization of the export stage's graph, accuracy-aware: sensitive nodes fall back to fp32."""

    kind: Literal["quantize"]
    name: str = Field("quantize", pattern=NAME)
    source: str | None = Field(None, description="export stage to quantize; default: the latest one")
    mode: Literal["dynamic", "static", "auto", "search"] = Field(
        "dynamic", description="auto: quantize both ways and keep the faster graph among those within tolerance; "
        "search: the INT8 mode the latest earlier search stage chose (what its trials were measured with)")
    target: Literal["avx512_vnni", "avx2", "arm64"] = Field("avx512_vnni", description="optimum AutoQuantizationConfig preset")
    per_channel: bool = Field(True, description="one weight scale per output channel of each MatMul (measured on the "
                              "four-task teacher, dynamic INT8 of every MatMul and the word table: worst dev drop "
                              "1.5% per channel against 4.9% per tensor, at the latency of optimum's "
                              "per-tensor INT8 of the same teacher); false: one per tensor")
    reduce_range: bool = Field(False, description="7-bit weights (avx2 only; avoids VPMADDUBSW saturation)")
    op_types: list[str] | None = Field(None, description="op types to quantize; default dynamic: MatMul, Attention, "
                                       "Gather, EmbedLayerNormalization; static: MatMul, Gather")
    exclude_op_types: list[str] = Field([], description="op types kept in fp32, e.g. [Gather, LayerNormalization]")
    exclude_nodes: list[str] = Field([], description="node-name patterns kept in fp32 (fnmatch), e.g. '*/layer.0/*'")
    quantize_heads: Union[Literal["large"], bool] = Field(
        "large", description="task heads: 'large' quantizes a head's weight matrices of at least 65,536 elements (a "
        "relation head's hidden layer over pair features) and keeps the small ones that write the logits fp32; "
        "true quantizes every head node like the encoder; false keeps every head node fp32")
    embedding: Literal["per_row", "int4_block", "per_tensor", "fp32"] = Field(
        "per_row", description="embedding tables: INT8 with one scale per row, dequantized after the lookup "
        "(per_row); the word table (the largest) INT4 with one scale per embedding_block_size elements of a row, "
        "looked up by ONNX Runtime's GatherBlockQuantized, and the smaller tables per_row (int4_block: about 5/8 "
        "of the word table's per_row bytes, coarser; the accuracy check applies as for every node, and the fallback "
        "sends the word table to INT8 per row, not to fp32); "
        "ORT's per-tensor Gather quantization (per_tensor); or left fp32")
    embedding_block_size: int = Field(32, description="int4_block: elements of a row that share one scale (a power "
                                      "of two, at least 16; smaller blocks are more accurate and store more scales)")
    matmul_nbits: list[MatMulNBits] | None = Field(
        None, description="store the weights of the chosen MatMuls block-wise in 4 or 8 bits (MatMulNBits) instead "
        "of per-column INT8: one group, or a list where the first group whose patterns choose a node wins (e.g. "
        "the FFN in 4 bits, every other MatMul in 8); the accuracy fallback judges them node by node (a sensitive "
        "one goes to per-column INT8 first); null: none. `matmul_int4` (one group) is the older name")
    calibration: QuantCalibration = QuantCalibration()
    tolerance: float = Field(0.01, ge=0, description="largest relative drop of a task's metric vs the fp32 graph")
    tolerances: dict[str, float] = Field({}, description="per-task override of tolerance")
    eval_split: Literal["dev", "test"] = Field("dev", description="split the accuracy check uses (falls back to the other)")
    max_iterations: int = Field(4, ge=0, description="fallback rounds after the first attempt")
    fallback_step: int = Field(2, gt=0, description="nodes moved to fp32 in the first fallback round; doubles each round")
    fallback_order: Literal["error_per_byte", "error"] = Field(
        "error_per_byte", description="which quantized nodes go back to fp32 first: the most added error per "
        "weight element (accuracy bought per byte, so a big embedding table with a small error goes last), or the "
        "most added error whatever the node's size")
    sensitivity_batches: int = Field(4, gt=0, description="calibration batches per task used to rank node sensitivity")
    on_failure: Literal["warn", "error"] = Field("warn", description="when no attempt meets every tolerance: keep the "
                                                 "best attempt and report it, or fail the stage")
    eval_batch_size: int = Field(64, gt=0)

    @field_validator("embedding_block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v < 16 or v & (v - 1):
            raise ValueError(f"must be a power of two of at least 16, as ONNX Runtime's GatherBlockQuantized "
                             f"requires (got {v})")
        return v

    @model_validator(mode="before")
    @classmethod
    def _older_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and "matmul_int4" in data:
            if "matmul_nbits" in data:
                raise ValueError("give matmul_nbits or its older name matmul_int4, not both")
            data = {("matmul_nbits" if k == "matmul_int4" else k): v for k, v in data.items()}
        return data

    @field_validator("matmul_nbits", mode="before")
    @classmethod
    def _one_group(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict) else v

    @field_validator("tolerances")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: t for k, t in v.items() if t < 0}
        if bad:
            raise ValueError(f"tolerances must be >= 0 (got {bad})")
        return v

    def needs(self, default: str | None) -> list[tuple[str, str | None]]:
        """An export before it; with ``mode: search``, a search stage too (``compressor.stage_kinds``)."""
        return [(default, None)] + ([("search", "mode")] if self.mode == "search" else [])


class BundleStage(Strict):
    """Write the edge bundle: the final graph, tokenizer.json and tasks.json, for ``compressor.runtime``."""

    kind: Literal["bundle"]
    name: str = Field("bundle", pattern=NAME)
    source: str | None = Field(None, description="quantize or export stage whose graph to ship; default: the latest")
    check: bool = Field(True, description="load the written bundle and predict one text per task as a smoke check")
    word_splitter: str = Field("punct", description="how predict splits raw text into words for token tasks: "
                               "punct (the tokenizer's pre-tokenisation: whitespace and punctuation), whitespace, "
                               "or regex:<pattern> (each match a word); see docs/runs.md")

    @field_validator("word_splitter")
    @classmethod
    def _known_splitter(cls, v: str) -> str:
        from compressor.runtime.words import check_splitter

        return check_splitter(v)

