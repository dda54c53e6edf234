"""YAML recipes, validated by pydantic. Torch-free, so ``compressor validate`` is fast.

Errors name the YAML path, the line and what was expected::

    recipes/x.yaml:14: stages[0].epochs: Input should be greater than 0 (got -1)

Each stage kind has a config model here with ``kind: Literal[...]``; ``Stage`` is the union discriminated on
``kind``. A new stage adds its config class to ``Stage`` and its kind to ``compressor.stages.STAGE_KINDS``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compressor.errors import RecipeError
from compressor.train.options import LossWeighting, Sampling, TrainOptions

NAME = r"^[A-Za-z_][A-Za-z0-9_\-]*$"
DATA_ROOT_ENV = "COMPRESSOR_DATA_ROOT"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- model and tasks --------------------------------------------------------------------------------------
class ModelSpec(Strict):
    encoder: str = Field("offline-default", description="HF name or local path; 'offline-default' = all-MiniLM-L6-v2")
    max_length: int = Field(128, ge=8, le=4096)
    trust_remote_code: bool = False


class SplitFile(Strict):
    """A split given with its own reader format (e.g. the same SQuAD file read as ``squad-train``/``squad-dev``)
    and/or its own text encoding (``latin-1``, ``cp1252``...; default: the task's ``encoding``, else UTF-8)."""

    path: str
    format: str | None = None
    encoding: str | None = None

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str | None) -> str | None:
        return _known_codec(v)


def _known_codec(v: str | None) -> str | None:
    if v is not None:
        import codecs

        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(f"unknown text encoding '{v}' (e.g. utf-8, latin-1, cp1252, utf-16)") from None
    return v


class Splits(Strict):
    """Paths relative to the data root (or absolute); a plain string or ``{path, format}``."""

    train: str | SplitFile | None = None
    dev: str | SplitFile | None = None
    test: str | SplitFile | None = None

    def get(self, split: str) -> SplitFile | None:
        value = getattr(self, split)
        return SplitFile(path=value) if isinstance(value, str) else value


class Limits(Strict):
    """Subsample a split to its first N examples (after a seeded shuffle); reports say so."""

    train: int | None = Field(None, gt=0)
    dev: int | None = Field(None, gt=0)
    test: int | None = Field(None, gt=0)


class TaskSpec(Strict):
    name: str = Field(pattern=NAME)
    plugin: str
    data: Splits
    format: str | None = None
    encoding: str | None = Field(None, description="text encoding of every split without its own (default utf-8)")
    labels: list[str] | None = None
    limit: Limits = Limits()
    dev_from_train: float | None = Field(
        None, gt=0, lt=1, description="no dev file: hold out this share of the training file (seeded) as the dev "
        "split; the rest is the training split")
    options: dict[str, Any] = {}

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str | None) -> str | None:
        return _known_codec(v)

    @model_validator(mode="after")
    def _one_dev_source(self) -> TaskSpec:
        if self.dev_from_train is not None and self.data.dev is not None:
            raise ValueError("give data.dev or dev_from_train, not both")
        if self.dev_from_train is not None and self.data.train is None:
            raise ValueError("dev_from_train needs data.train")
        return self

    def has_dev(self) -> bool:
        """A dev file, or a dev split held out of train (``dev_from_train``)."""
        return self.data.dev is not None or self.dev_from_train is not None


# ---- stages -----------------------------------------------------------------------------------------------
class TrainStage(TrainOptions):
    """Joint training of the multi-task teacher (and, with ``baselines``, one single-task model per task)."""

    kind: Literal["train"]
    name: str = Field("teacher", pattern=NAME)
    baselines: bool = False
    baseline_steps: Literal["task_share", "epochs"] = Field(
        "task_share", description="task_share: each single-task twin takes as many steps per epoch as the "
        "multi-task sampler gives its task (same exposure to its data); epochs: one pass over its data per epoch")


class StudentFromTeacher(Strict):
    """Copy the teacher, keeping some layers (0-based), and optionally fewer heads / FFN neurons per layer."""

    layers: Literal["every_other"] | int | list[int] = Field(
        "every_other", description="'every_other' (1, 3, 5...), N evenly spaced layers (top kept), or 0-based indices"
    )
    heads: int | None = Field(None, gt=0, description="attention heads kept per layer (largest weight norm)")
    ffn: int | None = Field(None, gt=0, description="FFN neurons kept per layer (largest weight norm)")


class StudentFromConfig(Strict):
    """A fresh, randomly initialised BERT with the teacher's vocabulary and tasks."""

    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    heads: int = Field(gt=0)
    ffn: int | None = Field(None, gt=0, description="default: 4 * hidden_size")

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> StudentFromConfig:
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of heads {self.heads}")
        return self


class StudentSpec(Strict):
    """Exactly one of ``from_teacher``, ``from_config``, ``from_previous: true`` (the latest model, e.g. pruned)."""

    from_teacher: StudentFromTeacher | None = None
    from_config: StudentFromConfig | None = None
    from_previous: bool = False

    @model_validator(mode="after")
    def _exactly_one(self) -> StudentSpec:
        given = [k for k in ("from_teacher", "from_config") if getattr(self, k) is not None]
        given += ["from_previous"] if self.from_previous else []
        if len(given) != 1:
            raise ValueError(f"give exactly one of from_teacher, from_config, from_previous (got {given or 'none'})")
        return self


class DistillWeights(Strict):
    """Weights of the distillation terms (their sum is scaled by ``1 - alpha``)."""

    logits: float = Field(1.0, ge=0)
    hidden: float = Field(0.0, ge=0)
    attention: float = Field(0.0, ge=0)


class LoadStage(Strict):
    """Start from a model directory written earlier (e.g. a teacher trained by another run).

    The first ``load`` or ``train`` stage of a recipe provides the teacher that later stages compare against.
    """

    kind: Literal["load"]
    name: str = Field("teacher", pattern=NAME)
    path: str = Field(description="model directory (manifest.json + model.safetensors), relative to the cwd")
    evaluate: bool = True


class DistillStage(Strict):
    """Distil the teacher (the first train stage's model) into a smaller student on all tasks at once."""

    kind: Literal["distill"]
    name: str = Field("distill", pattern=NAME)
    student: StudentSpec = StudentSpec(from_teacher=StudentFromTeacher())
    layer_map: dict[int, int] | None = Field(None, description="student layer -> teacher layer (0-based); default uniform")
    alpha: float = Field(0.5, ge=0, le=1, description="task-loss weight; 1 - alpha weighs distillation")
    temperature: float = Field(2.0, gt=0)
    weights: DistillWeights = DistillWeights()
    relation_heads: int | None = Field(None, gt=0, description="MiniLM relation heads where head counts differ")
    epochs: int = Field(3, gt=0)
    steps: int | None = Field(None, gt=0, description="total steps; overrides epochs * steps_per_epoch")
    steps_per_epoch: int | None = Field(None, gt=0, description="default: one pass over all tasks' training batches")
    batch_size: int = Field(16, gt=0)
    eval_batch_size: int = Field(64, gt=0)
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0)
    sampling: Sampling = Sampling()
    seed: int | None = Field(None, description="default: the recipe's seed")
    mixed_precision: Literal["auto", "no", "bf16"] = Field(
        "auto", description="bf16 autocast: auto = on CUDA only; bf16 = on the CPU too (faster on CPUs with "
        "bf16 support, losses compared in fp32); no = fp32")
    early_stopping_patience: int | None = Field(
        None, gt=0, description="stop after this many epochs without a better mean dev retention (student / "
        "teacher dev metric, every task); null: run every epoch")
    keep_best: bool = Field(True, description="end with the weights of the epoch with the best mean dev retention")
    single_task_students: bool = Field(
        False, description="also distil one student per task (same architecture, same teacher, the steps the "
        "multi-head student spent on that task), saved as single-<task>/ for row (d) of `compressor benchmark`")


class PruneLayerRatios(Strict):
    """Per-layer override of the ratios (``per_layer`` scope); 0 leaves that layer's heads or FFN alone."""

    head_ratio: float | None = Field(None, ge=0, lt=1)
    ffn_ratio: float | None = Field(None, ge=0, lt=1)


class PruneRecovery(Strict):
    """Distillation run after each pruning step (``recovery_steps`` steps of it)."""

    teacher: Literal["teacher", "input"] = Field(
        "teacher", description="'teacher': the first train stage's model (falls back to 'input' if none); "
        "'input': the model as it was before this stage"
    )
    alpha: float = Field(0.5, ge=0, le=1, description="task-loss weight; 1 - alpha weighs distillation")
    temperature: float = Field(2.0, gt=0)
    weights: DistillWeights = DistillWeights()
    lr: float = Field(3e-5, gt=0)
    batch_size: int = Field(16, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0)
    sampling: Sampling = Sampling()
    mixed_precision: Literal["auto", "no", "bf16"] = Field(
        "auto", description="bf16 autocast: auto = on CUDA only; bf16 = on the CPU too (faster on CPUs with "
        "bf16 support, losses compared in fp32); no = fp32")


class RecoveryStop(Strict):
    """Recover after each pruning step until every task's dev metric is back within ``tolerance`` of the
    pre-pruning model's (checked every ``eval_every`` steps), or the budget (``max_steps`` / ``max_epochs``) is
    spent; then the best checked weights are kept."""

    tolerance: float = Field(0.01, gt=0, lt=1, description="largest relative drop of a task's dev metric vs the "
                             "model before this stage")
    eval_every: int = Field(200, gt=0, description="distillation steps between dev checks")
    max_steps: int | None = Field(None, gt=0, description="budget per pruning step, in distillation steps")
    max_epochs: float | None = Field(None, gt=0, description="budget per pruning step, in passes over every "
                                     "task's training batches (the smaller budget wins when both are given)")

    @model_validator(mode="after")
    def _has_budget(self) -> RecoveryStop:
        if self.max_steps is None and self.max_epochs is None:
            raise ValueError("give a budget: max_steps and/or max_epochs")
        return self


class PruneStage(Strict):
    """Structured pruning of the shared encoder: attention heads, FFN neurons and whole layers.

    The hidden size is never pruned, so every task head stays as it is.
    """

    kind: Literal["prune"]
    name: str = Field("prune", pattern=NAME)
    importance: Literal["magnitude", "taylor"] = Field(
        "taylor", description="taylor: |w * grad| of every task's loss on its training batches; magnitude: weight norm"
    )
    head_ratio: float | None = Field(None, gt=0, lt=1, description="share of attention heads to remove")
    ffn_ratio: float | None = Field(None, gt=0, lt=1, description="share of FFN neurons to remove")
    scope: Literal["per_layer", "global"] = Field(
        "per_layer", description="per_layer: every layer loses its share; global: rank across layers "
        "(each layer keeps at least one head and one FFN neuron)"
    )
    layer_ratios: dict[int, PruneLayerRatios] = Field({}, description="per_layer scope: layer -> ratio overrides")
    heads: dict[int, list[int]] = Field({}, description="explicit heads to remove: layer -> head indices (0-based)")
    drop_layers: list[int] = Field([], description="layers to remove (0-based, original numbering)")
    drop_num_layers: int = Field(0, ge=0, description="remove this many more layers, least important first")
    steps: int = Field(1, gt=0, description="reach the ratios over this many pruning steps")
    recovery_steps: int = Field(0, ge=0, description="distillation steps after each pruning step")
    recovery_until: RecoveryStop | None = Field(None, description="instead of a fixed recovery_steps: recover until "
                                                "the dev metric is back, within a budget")
    recovery: PruneRecovery = PruneRecovery()
    importance_batches: int = Field(8, gt=0, description="training batches per task for taylor / layer scores")
    batch_size: int = Field(16, gt=0, description="batch size of the importance batches")
    eval_batch_size: int = Field(64, gt=0)
    seed: int | None = Field(None, description="default: the recipe's seed")

    @model_validator(mode="after")
    def _consistent(self) -> PruneStage:
        if not (self.head_ratio or self.ffn_ratio or self.layer_ratios or self.heads or self.drop_layers
                or self.drop_num_layers):
            raise ValueError("nothing to prune: give head_ratio, ffn_ratio, layer_ratios, heads, drop_layers "
                             "or drop_num_layers")
        if self.scope == "global" and self.layer_ratios:
            raise ValueError("layer_ratios needs scope 'per_layer'")
        if self.recovery_steps and self.recovery_until is not None:
            raise ValueError("give recovery_steps (a fixed budget) or recovery_until (a stop rule), not both")
        if self.heads and (self.head_ratio or any(r.head_ratio for r in self.layer_ratios.values())):
            raise ValueError("give either explicit heads or a head ratio, not both")
        negative = [i for i in [*self.drop_layers, *self.heads, *self.layer_ratios,
                                *(h for hs in self.heads.values() for h in hs)] if i < 0]
        if negative:
            raise ValueError(f"layer and head indices are 0-based and >= 0 (got {negative[0]})")
        return self


class PruneVocabStage(Strict):
    """Keep only the vocabulary the tasks' training data uses; shrink the word embeddings and the tokenizer."""

    kind: Literal["prune_vocab"]
    name: str = Field("prune_vocab", pattern=NAME)
    keep_eval_splits: bool = Field(False, description="also keep tokens of the dev/test splits (leaks their vocabulary)")
    extra_tokens: list[str] = Field([], description="vocabulary entries to keep (e.g. '##ing', 'covid')")
    extra_files: list[str] = Field([], description="text files (data-root relative or absolute) whose tokens are kept")
    keep_chars: Literal["none", "ascii", "all"] = Field(
        "ascii", description="keep single-character tokens (and their ## forms) so unseen words split into "
        "characters instead of becoming [UNK]"
    )
    min_count: int = Field(1, ge=1, description="keep a training token only if it occurs at least this often")
    full_train: bool = Field(True, description="take tokens from every task's whole training file, not only the "
                             "recipe's subsample of it (limit.train)")
    english_words: int = Field(30000, ge=0, description="also rank the tokens of the N most frequent English words "
                               "(wordfreq); 0: none")
    sizes: list[Annotated[int, Field(gt=0)]] | None = Field(
        None, min_length=1, description="candidate vocabulary sizes; each is measured on dev (changed sub-tokens, "
        "every task's metric) and the smallest within tolerance is kept; default 8000, 12000, 16000, 20000")
    tolerance: float = Field(0.01, gt=0, lt=1, description="largest relative drop of a task's dev metric a "
                             "vocabulary size may cost")
    eval_batch_size: int = Field(64, gt=0)



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


class QuantCalibration(Strict):
    """Static quantization: activation ranges from task batches."""

    method: Literal["minmax", "percentile", "entropy"] = "minmax"
    split: Literal["train", "dev", "test"] = Field("train", description="falls back to dev/test for a task without it")
    samples: int = Field(64, gt=0, description="features per task (spread over the split)")
    batch_size: int = Field(8, gt=0)
    percentile: float = Field(99.999, gt=0, le=100)
    num_bins: int | None = Field(None, gt=0, description="histogram bins; default 2048 (percentile), 128 (entropy)")


class QuantizeStage(Strict):
    """INT8 quantization of the export stage's graph, accuracy-aware: sensitive nodes fall back to fp32."""

    kind: Literal["quantize"]
    name: str = Field("quantize", pattern=NAME)
    source: str | None = Field(None, description="export stage to quantize; default: the latest one")
    mode: Literal["dynamic", "static", "auto"] = Field(
        "dynamic", description="auto: quantize both ways and keep the faster graph among those within tolerance")
    target: Literal["avx512_vnni", "avx2", "arm64"] = Field("avx512_vnni", description="optimum AutoQuantizationConfig preset")
    per_channel: bool = False
    reduce_range: bool = Field(False, description="7-bit weights (avx2 only; avoids VPMADDUBSW saturation)")
    op_types: list[str] | None = Field(None, description="op types to quantize; default dynamic: MatMul, Attention, "
                                       "Gather, EmbedLayerNormalization; static: MatMul, Gather")
    exclude_op_types: list[str] = Field([], description="op types kept in fp32, e.g. [Gather, LayerNormalization]")
    exclude_nodes: list[str] = Field([], description="node-name patterns kept in fp32 (fnmatch), e.g. '*/layer.0/*'")
    quantize_heads: bool = Field(False, description="also quantize the task heads (tiny; they write the logits)")
    embedding: Literal["per_row", "per_tensor", "fp32"] = Field(
        "per_row", description="embedding tables: INT8 with one scale per row, dequantized after the lookup "
        "(per_row); ORT's per-tensor Gather quantization (per_tensor); or left fp32")
    calibration: QuantCalibration = QuantCalibration()
    tolerance: float = Field(0.01, ge=0, description="largest relative drop of a task's metric vs the fp32 graph")
    tolerances: dict[str, float] = Field({}, description="per-task override of tolerance")
    eval_split: Literal["dev", "test"] = Field("dev", description="split the accuracy check uses (falls back to the other)")
    max_iterations: int = Field(4, ge=0, description="fallback rounds after the first attempt")
    fallback_step: int = Field(2, gt=0, description="nodes moved to fp32 in the first fallback round; doubles each round")
    sensitivity_batches: int = Field(4, gt=0, description="calibration batches per task used to rank node sensitivity")
    on_failure: Literal["warn", "error"] = Field("warn", description="when no attempt meets every tolerance: keep the "
                                                 "best attempt and report it, or fail the stage")
    eval_batch_size: int = Field(64, gt=0)

    @field_validator("tolerances")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: t for k, t in v.items() if t < 0}
        if bad:
            raise ValueError(f"tolerances must be >= 0 (got {bad})")
        return v


class BundleStage(Strict):
    """Write the edge bundle: the final graph, tokenizer.json and tasks.json, for ``compressor.runtime``."""

    kind: Literal["bundle"]
    name: str = Field("bundle", pattern=NAME)
    source: str | None = Field(None, description="quantize or export stage whose graph to ship; default: the latest")
    check: bool = Field(True, description="load the written bundle and predict one text per task as a smoke check")


class AddTaskStage(Strict):
    """Teach a finished (compressed) model one more task: a new head trained on the frozen shared encoder.

    Every existing task's outputs stay bit-identical (checked before the stage succeeds); later export, quantize
    and bundle stages ship the model with the new output.
    """

    kind: Literal["add_task"]
    name: str = Field("add_task", pattern=NAME)
    task: str = Field(description="the recipe task to add (tasks[].name); the model must not have it yet")
    source: str | None = Field(None, description="earlier stage whose model to extend (a model stage, or an "
                               "export / quantize / bundle stage: the model its graph came from); default: the "
                               "latest model")
    path: str | None = Field(None, description="instead of source: a model directory from another run (relative "
                             "to the cwd), e.g. a finished student")
    compare_to: str | None = Field(None, description="model directory holding the same task trained in (relative to "
                                   "the cwd); default: the run's teacher when it has the task")
    epochs: int = Field(3, gt=0)
    steps: int | None = Field(None, gt=0, description="total optimizer steps; overrides epochs")
    batch_size: int = Field(16, gt=0)
    eval_batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0, description="learning rate of the new head")
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0)
    early_stopping_patience: int | None = Field(None, gt=0, description="epochs without a better dev metric")
    seed: int | None = Field(None, description="default: the recipe's seed")

    @model_validator(mode="after")
    def _one_base(self) -> AddTaskStage:
        if self.source is not None and self.path is not None:
            raise ValueError("give source (an earlier stage) or path (a model directory), not both")
        return self


SearchRatio = Annotated[float, Field(ge=0, lt=1)]


class SearchBudget(Strict):
    """How long a search runs: a number of trained trials (resumed runs included) and/or wall time."""

    trials: int | None = Field(None, gt=0, description="trials trained (completed or early-stopped), all sessions")
    seconds: float | None = Field(None, gt=0, description="wall time of one search session; no new trial after it")

    @model_validator(mode="after")
    def _some_budget(self) -> SearchBudget:
        if self.trials is None and self.seconds is None:
            raise ValueError("give trials and/or seconds")
        return self


class SearchSpace(Strict):
    """The knobs a search stage tries; every list holds the values to choose from."""

    layers: list[Annotated[int, Field(gt=0)]] | None = Field(
        None, min_length=1, description="layer counts to keep (least important layers dropped); default: every "
        "count from half the source model's layers (rounded up) to all of them")
    head_ratio: list[SearchRatio] = Field([0.0, 0.25, 0.5], min_length=1,
                                          description="share of each layer's attention heads removed")
    ffn_ratio: list[SearchRatio] = Field([0.0, 0.25, 0.5, 0.75], min_length=1,
                                         description="share of each layer's FFN neurons removed")
    per_layer: bool = Field(False, description="choose head and FFN ratios for every layer separately")
    vocab_min_count: list[Annotated[int, Field(gt=0)] | None] = Field(
        [None], min_length=1, description="null: keep the vocabulary; k: keep the tokens the training data uses at "
        "least k times (and single characters)")
    int8: list[Literal["dynamic", "static", "none"]] = Field(
        ["dynamic"], min_length=1, description="INT8 mode each trial is measured with ('none': fp32 graph)")


class SearchStage(Strict):
    """Search the smallest / fastest student whose every task keeps its retention floor (optuna, resumable)."""

    kind: Literal["search"]
    name: str = Field("search", pattern=NAME)
    retention: float | dict[str, float] = Field(0.97, description="floor of dev metric / teacher dev metric: one "
                                                "value for every task, or task -> value")
    objective: Literal["latency", "size"] = "latency"
    budget: SearchBudget = SearchBudget(trials=20)
    space: SearchSpace = SearchSpace()
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    seed: int | None = Field(None, description="default: the recipe's seed")
    importance: Literal["magnitude", "taylor"] = "taylor"
    importance_batches: int = Field(4, gt=0)
    batch_size: int = Field(16, gt=0, description="batch size of the importance batches")
    recovery_steps: int = Field(40, ge=0, description="short, fixed distillation of every trial")
    full_recovery_steps: int = Field(400, ge=0, description="distillation of the chosen candidate")
    recovery: PruneRecovery = PruneRecovery()
    early_stop_margin: float | None = Field(0.15, gt=0, description="after half the short recovery, stop a trial "
                                            "whose worst task is more than this below its floor; null: never")
    latency_runs: int = Field(20, gt=0)
    latency_warmup: int = Field(3, ge=0)
    latency_threads: int = Field(1, gt=0)
    latency_seq_len: int = Field(128, gt=0)
    eval_batch_size: int = Field(64, gt=0)

    @field_validator("retention")
    @classmethod
    def _floor_in_range(cls, v: float | dict[str, float]) -> float | dict[str, float]:
        if isinstance(v, dict) and not v:
            raise ValueError("give one floor or a floor per task")
        for task, floor in (v.items() if isinstance(v, dict) else [(None, v)]):
            if not 0 < floor <= 1:
                where = f" of task '{task}'" if task else ""
                raise ValueError(f"retention floor{where} must be in (0, 1] (got {floor})")
        return v

    def floors(self, tasks: list[str]) -> dict[str, float]:
        return {t: self.retention[t] if isinstance(self.retention, dict) else self.retention for t in tasks}

Stage = Annotated[Union[TrainStage, LoadStage, DistillStage, PruneStage, PruneVocabStage, ExportStage, QuantizeStage, BundleStage,
                        SearchStage, AddTaskStage],
                  Field(discriminator="kind")]


class Targets(Strict):
    """The product's targets, written once: the benchmark and ``publish`` check them and say by how much they
    are missed. Ratios are teacher / student (larger is better) unless named otherwise."""

    retention: float = Field(0.97, gt=0, le=1, description="least student metric / teacher metric, every task")
    size_x: float = Field(10.0, gt=0, description="INT8 student at least this many times smaller on disk")
    latency_x: float = Field(6.0, gt=0, description="INT8 student's ORT p50 this many times lower (1 thread)")
    points_vs_c: float = Field(1.0, ge=0, description="most metric points below optimum's INT8 teacher, any task")
    size_vs_d: float = Field(0.3, gt=0, description="most size of the multi-head student / the single-task ones")
    points_vs_d: float = Field(0.5, ge=0, description="most points below each single-task student on its task")
    student_params_ratio: float = Field(0.25, gt=0, description="most student / teacher parameters (PyTorch)")
    student_speedup: float = Field(3.0, gt=0, description="least PyTorch speed-up of the student, every task")


class ReportSpec(Strict):
    targets: Targets = Targets()
    latency: bool = True
    latency_seq_len: int = Field(128, gt=0)
    latency_runs: int = Field(30, gt=0)
    latency_warmup: int = Field(5, ge=0)
    threads: int | None = Field(None, gt=0, description="torch threads for latency; default: all cores")


class Recipe(Strict):
    name: str = Field(pattern=NAME)
    seed: int = 42
    data_root: str | None = None
    model: ModelSpec = ModelSpec()
    tasks: list[TaskSpec] = Field(min_length=1)
    stages: list[Stage] = Field(min_length=1)
    report: ReportSpec = ReportSpec()

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, tasks: list[TaskSpec]) -> list[TaskSpec]:
        _unique([t.name for t in tasks], "task")
        return tasks

    @field_validator("stages")
    @classmethod
    def _unique_stages(cls, stages: list[Any]) -> list[Any]:
        _unique([s.name for s in stages], "stage")
        return stages

    @model_validator(mode="after")
    def _budgets_name_tasks(self) -> Recipe:
        names = [t.name for t in self.tasks]
        for stage in self.stages:
            sampling = getattr(stage, "sampling", None)
            for task in getattr(sampling, "passes", {}) or {}:
                if task not in names:
                    raise ValueError(f"stage '{stage.name}': sampling.passes names task '{task}', which the recipe "
                                     f"does not have (tasks: {', '.join(names)})")
        return self

    @model_validator(mode="after")
    def _search_stages_fit_tasks(self) -> Recipe:
        names = [t.name for t in self.tasks]
        for i, stage in enumerate(self.stages):
            if stage.kind != "search":
                continue
            if isinstance(stage.retention, dict):
                unknown = sorted(set(stage.retention) - set(names))
                missing = [n for n in names if n not in stage.retention]
                if unknown or missing:
                    raise ValueError(f"stages[{i}].retention: " + (f"unknown task(s) {unknown}" if unknown else
                                     f"no floor for task(s) {missing}") + f" (tasks: {', '.join(names)})")
            no_dev = [(j, t.name) for j, t in enumerate(self.tasks) if not t.has_dev()]
            if no_dev:
                j, name = no_dev[0]
                raise ValueError(f"tasks[{j}].data.dev: task '{name}' has no dev split; search stage "
                                 f"'{stage.name}' scores every task on dev")
        return self

    @model_validator(mode="after")
    def _recovery_stop_needs_dev(self) -> Recipe:
        for i, stage in enumerate(self.stages):
            if getattr(stage, "recovery_until", None) is None:
                continue
            no_dev = [(j, t.name) for j, t in enumerate(self.tasks) if not t.has_dev()]
            if no_dev:
                j, name = no_dev[0]
                raise ValueError(f"tasks[{j}].data.dev: task '{name}' has no dev split; stage '{stage.name}' "
                                 "recovers until every task's dev metric is back (recovery_until)")
        return self

    @model_validator(mode="after")
    def _added_tasks_exist(self) -> Recipe:
        names = [t.name for t in self.tasks]
        for i, stage in enumerate(self.stages):
            if stage.kind == "add_task" and stage.task not in names:
                raise ValueError(f"stages[{i}].task: stage '{stage.name}' adds task '{stage.task}', which the recipe "
                                 f"does not have (tasks: {', '.join(names)})")
        return self

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise RecipeError(f"recipe '{self.name}': no task '{name}'")


def _unique(names: list[str], what: str) -> None:
    seen = set()
    for n in names:
        if n in seen:
            raise ValueError(f"{what} name '{n}' is used twice")
        seen.add(n)


# ---- loading ----------------------------------------------------------------------------------------------
def load_recipe(path: Path | str) -> Recipe:
    """Parse and validate a YAML recipe; every error names the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RecipeError(f"{path}:{line}: not valid UTF-8 (byte {exc.start}); save the recipe as UTF-8") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else (text[: exc.position].count("\n") + 1 if hasattr(exc, "position") else None)
        where = f"{path}:{line}" if line else str(path)
        problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
        raise RecipeError(f"{where}: malformed YAML: {problem}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}:1: expected a mapping at the top of the recipe, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # a split given as {path, ...}: report what is wrong in the mapping, not that it is not a plain string
        err = next((e for e in errors if "SplitFile" in e["loc"]), errors[0]) if errors[0]["loc"][-1:] == ("str",) \
            else errors[0]
        raw_loc = list(err["loc"])
        loc = [p for k, p in enumerate(raw_loc) if not (
            p == "SplitFile" or (isinstance(p, str) and p in _UNION_TAGS and raw_loc[k - 2 : k - 1] == ["stages"]))]
        line = _line_of(node, loc)
        dotted = _dotted(loc) or "<recipe>"
        got = "" if err["type"] in ("missing", "extra_forbidden") else f" (got {err.get('input')!r})"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "union_tag_invalid":
            msg = f"unknown stage kind; expected one of {err['ctx']['expected_tags']}"
            got = ""
        raise RecipeError(f"{path}:{line}: {dotted}: {msg}{got}") from exc


_UNION_TAGS = {"train", "load", "distill", "prune", "prune_vocab", "export", "quantize", "bundle", "search",
               "add_task"}  # discriminator values pydantic inserts into error locations


def _dotted(loc: list[Any]) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _line_of(node: Any, loc: list[Any]) -> int:
    """1-based line of the deepest YAML node along ``loc``."""
    line = (node.start_mark.line + 1) if node is not None else 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                break
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def resolve_data_root(recipe_root: str | None, cli_root: str | Path | None = None) -> Path:
    """CLI option > recipe field > $COMPRESSOR_DATA_ROOT > ../shared/data (from the cwd or the checkout)."""
    for candidate in (cli_root, recipe_root, os.environ.get(DATA_ROOT_ENV)):
        if candidate:
            return Path(candidate).expanduser()
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        default = base.parent / "shared" / "data"
        if default.is_dir():
            return default
    raise RecipeError(
        f"no data root: set data_root in the recipe, pass --data-root, or set ${DATA_ROOT_ENV} "
        "(default ../shared/data was not found)"
    )
