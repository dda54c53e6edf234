"""Options of the training engine: what :func:`compressor.train.loop.train_model` takes.

Pydantic models without torch; the recipe's ``train`` stage extends :class:`TrainOptions` with what only the
stage needs (its name, the single-task twins), so the engine never depends on the recipe's schema.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from compressor.inputs import InputModel


class _Options(InputModel):
    """Unknown keys and booleans where numbers are expected are refused."""


class Sampling(_Options):
    """How the steps of an epoch are shared among the tasks.

    ``passes`` (default): task t takes exactly ``passes[t]`` (default 1.0) passes over its training batches per
    epoch, interleaved at random, so a small task can be given several passes while a large one takes one.
    ``proportional`` / ``temperature`` (size^(1/tau)) / ``round_robin`` draw the task of each step at random.
    """

    strategy: Literal["passes", "proportional", "temperature", "round_robin"] = "passes"
    tau: float = Field(2.0, gt=0)
    passes: dict[str, float] = Field(
        {}, description="task -> passes over its training batches per epoch (strategy 'passes'; default 1.0)")

    @field_validator("passes")
    @classmethod
    def _positive_passes(cls, passes: dict[str, float]) -> dict[str, float]:
        for task, n in passes.items():
            if not n > 0:
                raise ValueError(f"passes of task '{task}' must be > 0 (got {n})")
        return passes


class LossWeighting(_Options):
    """How the tasks' losses combine: ``uniform``, ``fixed`` weights, learned ``uncertainty`` (Kendall et al.
    2018), or ``pcgrad`` (Yu et al. 2020: one optimizer step per group of consecutive draws of different tasks,
    conflicting encoder gradients projected; compressor.train.pcgrad)."""

    strategy: Literal["uniform", "fixed", "uncertainty", "pcgrad"] = Field("uncertainty", description=(
        "default uncertainty: above or level with uniform, and above pcgrad, on every task's dev set of the "
        "four-task data (reports/balancing-ab.md); a distillation's own loss parts always add uniformly"))
    weights: dict[str, float] = {}

    @model_validator(mode="after")
    def _fixed_needs_weights(self) -> LossWeighting:
        if self.strategy == "fixed" and not self.weights:
            raise ValueError("strategy 'fixed' needs 'weights' (task name -> weight)")
        if self.weights and self.strategy != "fixed":  # they would be ignored (the default strategy is uncertainty)
            raise ValueError(f"'weights' are read by strategy 'fixed' only; this one is '{self.strategy}': add "
                             "strategy: fixed, or drop the weights")
        return self


class TrainOptions(_Options):
    """How a model is trained (the joint multi-task loop)."""

    epochs: int = Field(3, gt=0)
    batch_size: int = Field(16, gt=0)
    eval_batch_size: int = Field(64, gt=0)
    lr: float = Field(5e-5, gt=0)
    head_lr: float = Field(1e-3, gt=0, description="learning rate of the task heads (new, randomly initialised "
                           "layers learn far slower at the encoder's rate)")
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0)
    dropout: float | None = Field(None, ge=0, lt=1)
    freeze_embeddings: bool = False
    word_table_int4: int | None = Field(
        None, description="quantization-aware training of the word table: before the first step, snap the "
        "word-embedding table to the INT4 grid the quantize stage stores it on (`embedding: int4_block` with this "
        "`embedding_block_size`) and keep it frozen, so the rest of the model learns around the 4-bit table (the "
        "export then quantizes it exactly); null: the table trains in fp32")
    freeze_layers: int = Field(0, ge=0)
    sampling: Sampling = Sampling()
    loss_weighting: LossWeighting = LossWeighting()
    early_stopping_patience: int | None = Field(None, gt=0)
    per_task_stopping: bool = Field(True, description="under sampling strategy passes, a task whose dev metric has "
                                    "not improved for early_stopping_patience epochs stops taking steps")
    steps_per_epoch: int | None = Field(None, gt=0, description="default: one pass over all tasks' training batches")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps in all, overriding epochs (the last "
                                  "epoch is cut short); the schedule spans them")
    keep_best: bool = Field(True, description="end with the weights of the best dev epoch (else of the last)")
    mixed_precision: Literal["auto", "no", "bf16"] = Field(
        "auto", description="bf16 autocast: auto = on CUDA only; bf16 = also on a CPU that computes bf16 natively "
        "(AVX512-BF16, AMX, Arm BF16), fp32 with a warning on one that does not (emulated bf16 is many times "
        "slower); no = fp32")
    head_selection: Literal["per_task", "best_mean"] = Field(
        "per_task", description="per_task: the encoder comes from the epoch with the best mean dev metric and each "
        "task's head from its own best dev epoch when that head scores better on dev with that encoder (tasks that "
        "decode over it counted too); best_mean: every part from the best mean epoch")
