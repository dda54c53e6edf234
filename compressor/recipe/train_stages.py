"""Stages that train a model: train, load, distill (and its student), add_task."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from compressor.recipe._base import NAME, Seed, Strict
from compressor.train.options import Sampling, TrainOptions


class TrainStage(TrainOptions):
    """Joint training of the multi-task teacher (and, with ``baselines``, one single-task model per task)."""

    kind: Literal["train"]
    name: str = Field("teacher", pattern=NAME)
    baselines: bool = False
    baseline_steps: Literal["task_share", "epochs"] = Field(
        "task_share", description="task_share: each single-task twin takes as many steps per epoch as the "
        "multi-task sampler gives its task (same exposure to its data); epochs: one pass over its data per epoch")


class FinetuneStage(TrainOptions):
    """Fine-tune a jointly trained multi-task model on one task at a time (MT-DNN: joint training, then per-task
    fine-tuning): one model per task, each starting from the source model with that task's head and the heads of
    the tasks it requires (relations: their entity task), trained on those tasks only. The per-task models are
    scored beside the joint model (label ``<name>:<task>``) and can teach a distillation per task; the run's
    current model stays the source model."""

    kind: Literal["finetune"]
    name: str = Field("finetune", pattern=NAME)
    source: str | None = Field(None, description="earlier model stage to fine-tune (default: the latest model)")
    tasks: list[str] | None = Field(None, description="tasks to fine-tune one at a time (default: every task of "
                                    "the model)")
    epochs: int = Field(2, gt=0)
    lr: float = Field(3e-5, gt=0, description="learning rate of the encoder (lower than joint training's: the "
                      "model is already trained)")
    head_lr: float = Field(3e-4, gt=0, description="learning rate of the (already trained) heads")
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    early_stopping_patience: int | None = Field(1, gt=0)


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
    transfer: float = Field(1.0, ge=0, description="weight of kd_transfer: heads distilled on other tasks' inputs "
                            "(see transfer)")


class LoadStage(Strict):
    """Start from a model directory written earlier (e.g. a teacher trained by another run).

    The first ``load`` or ``train`` stage of a recipe provides the teacher that later stages compare against.
    """

    kind: Literal["load"]
    name: str = Field("teacher", pattern=NAME)
    path: str = Field(description="model directory (manifest.json + model.safetensors), relative to the cwd")
    evaluate: bool = True


class TeacherCacheOptions(Strict):
    """The teacher's outputs computed once and read from disk by every step, epoch, recovery and search trial
    (see docs/distillation.md)."""

    max_mb: float = Field(2048.0, gt=0, description="size cap of the cache (per teacher and set of parts); "
                          "features beyond it are run through the teacher on the fly")
    dtype: Literal["float16", "float32"] = Field("float16", description="storage of the cached outputs")
    path: str | None = Field(None, description="a cache folder of its own (relative to the cwd), e.g. shared by "
                             "several runs of one teacher; null: <run>/teacher-cache, one folder per teacher")
    build_batch_size: int = Field(64, gt=0, description="batch size of the teacher passes that fill the cache")


class UnlabeledText(Strict):
    """A file of unlabeled text that teaches heads through ``transfer``: one text per line (blank lines skipped)."""

    path: str = Field(description="the file, relative to the data root (or absolute)")
    encoding: str = Field("utf-8", description="its text encoding")
    limit: int | None = Field(None, gt=0, description="read at most this many texts (the first ones)")


class DistillOptions(Strict):
    """The distillation loss and its optimizer: one model for the distill stage, the prune stage's recovery and
    the search's recovery."""

    alpha: float = Field(0.5, ge=0, le=1, description="task-loss weight; 1 - alpha weighs distillation")
    temperature: float = Field(2.0, gt=0)
    weights: DistillWeights = DistillWeights()
    relation_heads: int | None = Field(None, gt=0, description="MiniLM relation heads where head counts differ")
    transfer: dict[str, list[str] | Literal["all"]] = Field(
        default_factory=dict, description="head -> the tasks whose training inputs also teach it, or all: on each "
        "batch of such a task the head is distilled from its teacher's soft labels (no gold labels needed; "
        "kd_transfer). Heads that read any text (classification, NER) can; QA and relations need inputs of their own. "
        "A source may also name an unlabeled text set (unlabeled)")
    unlabeled: dict[str, UnlabeledText] = Field(
        default_factory=dict, description="name -> a file of unlabeled text, one per line: every step also draws a "
        "batch of it and distils the heads whose transfer names it")
    batch_size: int = Field(16, gt=0)
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0)
    sampling: Sampling = Sampling()
    mixed_precision: Literal["auto", "no", "bf16"] = Field(
        "auto", description="bf16 autocast: auto = on CUDA only; bf16 = also on a CPU that computes bf16 natively "
        "(AVX512-BF16, AMX, Arm BF16; losses compared in fp32), fp32 with a warning on one that does not (emulated "
        "bf16 is many times slower); no = fp32")
    dropout: float | None = Field(None, ge=0, lt=1, description="the student's dropout while it trains; null: "
                                  "the student's own (the teacher's config)")
    word_table_int4: int | None = Field(
        None, description="quantization-aware recovery of the word table: snap the student's word-embedding table to "
        "the INT4 grid a later quantize stage with `embedding: int4_block` and this `embedding_block_size` stores "
        "it on, and keep it frozen while the rest learns around it (the 4-bit table then costs nothing more at "
        "quantization); null: the table trains in fp32")
    teacher_cache: TeacherCacheOptions | None = Field(
        None, description="compute the teacher's outputs once and read them from disk; null: the teacher runs at "
        "every step")

    @field_validator("word_table_int4")
    @classmethod
    def _int4_block(cls, v: int | None) -> int | None:
        if v is not None and (v < 16 or v & (v - 1)):
            raise ValueError(f"must be a power of two of at least 16, as ONNX Runtime's GatherBlockQuantized "
                             f"requires (got {v})")
        return v


class DistillStage(DistillOptions):
    """Distil the teacher (the first train stage's model) into a smaller student on all tasks at once."""

    kind: Literal["distill"]
    name: str = Field("distill", pattern=NAME)
    student: StudentSpec = StudentSpec(from_teacher=StudentFromTeacher())
    layer_map: dict[int, int] | None = Field(None, description="student layer -> teacher layer (0-based); default uniform")
    epochs: int = Field(3, gt=0)
    steps: int | None = Field(None, gt=0, description="total steps; overrides epochs * steps_per_epoch")
    steps_per_epoch: int | None = Field(None, gt=0, description="default: one pass over all tasks' training batches")
    eval_batch_size: int = Field(64, gt=0)
    seed: Seed | None = Field(None, description="default: the recipe's seed")
    early_stopping_patience: int | None = Field(
        None, gt=0, description="stop after this many epochs without a better mean dev retention (student / "
        "teacher dev metric, every task); null: run every epoch")
    keep_best: bool = Field(True, description="end with the weights of the epoch with the best mean dev retention")
    single_task_students: bool = Field(
        False, description="also distil one student per task (same architecture, same teacher, the steps the "
        "multi-head student spent on that task), saved as single-<task>/ for row (d) of `compressor benchmark`")
    teachers: dict[str, str] = Field(
        default_factory=dict, description="task -> the teacher it learns from: an earlier train or load stage's "
        "name (a multi-task model), single:<task> (a twin of a train stage with baselines: true), a finetune "
        "stage's name (its model of that task) or auto (the candidate with the best dev metric on the task); a "
        "task not named learns from the run's teacher")

    @model_validator(mode="after")
    def _teacher_names(self) -> DistillStage:
        for task, name in self.teachers.items():
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"teachers.{task}: expected a stage name, single:<task> or auto, got {name!r}")
        return self


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
    seed: Seed | None = Field(None, description="default: the recipe's seed")

    @model_validator(mode="after")
    def _one_base(self) -> AddTaskStage:
        if self.source is not None and self.path is not None:
            raise ValueError("give source (an earlier stage) or path (a model directory), not both")
        return self

    def needs(self, default: str | None) -> list[tuple[str, str | None]]:
        """A model before it, unless it brings its own (``path``) (``compressor.stage_kinds``)."""
        return [] if self.path else [(default, None)]

