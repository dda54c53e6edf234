"""Stages that shrink a model: prune (with its recovery), prune_vocab and the search over both."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from compressor.recipe._base import NAME, Seed, Strict, ToleranceTest
from compressor.recipe.train_stages import DistillOptions


class PruneLayerRatios(Strict):
    """Per-layer override of the ratios (``per_layer`` scope); 0 leaves that layer's heads or FFN alone."""

    head_ratio: float | None = Field(None, ge=0, lt=1)
    ffn_ratio: float | None = Field(None, ge=0, lt=1)


class PruneRecovery(DistillOptions):
    """Distillation run after each pruning step (``recovery_steps`` steps of it); the distill stage's options
    with recovery's defaults (lr 3e-5, no warm-up, no dropout)."""

    teacher: Literal["teacher", "input"] = Field(
        "teacher", description="'teacher': the first train stage's model (falls back to 'input' if none); "
        "'input': the model as it was before this stage"
    )
    lr: float = Field(3e-5, gt=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    dropout: float | None = Field(
        0.0, ge=0, lt=1, description="dropout of the pruned model while it recovers; null: the model's own. 0 by "
        "default: recovery starts next to the teacher, and dropout noise only moves it away (measured on the "
        "four-task teacher, 25% FFN cut, 60 steps: QA dev retention 0.946 with the model's 0.1, 0.958 with "
        "every dropout 0)")


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


class PostTrainPrune(Strict):
    """Post-training pruning (Kwon et al. 2022): heads and FFN neurons chosen by mask Fisher information within a
    FLOPs and/or parameter budget, then every layer's output projections re-solved by least squares."""

    flops_ratio: float | None = Field(None, gt=0, lt=1, description="share of the encoder layers' FLOPs per token "
                                      "(heads at seq_len, FFN) the pruned model may keep")
    params_ratio: float | None = Field(None, gt=0, lt=1, description="share of the encoder layers' head and FFN "
                                       "parameters the pruned model may keep")
    seq_len: int = Field(128, gt=0, description="sequence length the FLOPs of attention are counted at")
    examples: int = Field(256, gt=0, description="training examples per task: the Fisher information sums their "
                          "squared mask gradients one example at a time, and the reconstruction is solved on them")
    batch_size: int = Field(16, gt=0, description="batch size of the reconstruction's forward passes")
    reconstruct: bool = Field(True, description="re-solve each layer's attention and FFN output projections so the "
                              "pruned layer matches the unpruned one on the examples (least squares)")
    damp: float = Field(0.01, ge=0, description="ridge of the reconstruction toward the current weights, as a "
                        "share of the mean diagonal of the inputs' Gram matrix")

    @model_validator(mode="after")
    def _has_budget(self) -> PostTrainPrune:
        if self.flops_ratio is None and self.params_ratio is None:
            raise ValueError("give flops_ratio and/or params_ratio")
        return self


class PruneStage(Strict):
    """Structured pruning of the shared encoder: attention heads, FFN neurons and whole layers.

    The hidden size is never pruned, so every task head stays as it is.
    """

    kind: Literal["prune"]
    name: str = Field("prune", pattern=NAME)
    method: Literal["iterative", "posttrain"] = Field(
        "iterative", description="iterative: the ratios below, by importance, over steps; posttrain: heads and FFN "
        "neurons by Fisher information within the posttrain budget, with layer-wise reconstruction (then the "
        "recovery, if any)")
    posttrain: PostTrainPrune | None = Field(None, description="method posttrain: its budget and options")
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
    hidden_size: int | None = Field(None, gt=0, description="cut the hidden width (residual stream) to this many "
                                    "channels, the most active ones on the importance batches, in the embeddings, "
                                    "every layer and the task heads (head size and count stay; a multiple of the "
                                    "model's num_attention_heads); applied before the other cuts")
    steps: int = Field(1, gt=0, description="reach the ratios over this many pruning steps")
    recovery_steps: int = Field(0, ge=0, description="distillation steps after each pruning step")
    recovery_until: RecoveryStop | None = Field(None, description="instead of a fixed recovery_steps: recover until "
                                                "the dev metric is back, within a budget")
    recovery: PruneRecovery = PruneRecovery()
    reconstruct: bool = Field(False, description="after each pruning step (before its recovery), re-solve every "
                              "remaining layer's attention and FFN output projections by least squares so its "
                              "output matches the input model's layer it stands for, on the importance batches; "
                              "with drop_num_layers: k and steps: k, layers go one at a time, least important "
                              "first, each followed by a reconstruction")
    importance_batches: int = Field(8, gt=0, description="training batches per task for taylor / layer scores")
    batch_size: int = Field(16, gt=0, description="batch size of the importance batches")
    eval_batch_size: int = Field(64, gt=0)
    seed: Seed | None = Field(None, description="default: the recipe's seed")

    @model_validator(mode="after")
    def _consistent(self) -> PruneStage:
        if self.method == "posttrain":
            if self.posttrain is None:
                raise ValueError("method posttrain needs posttrain: {flops_ratio: ..., params_ratio: ...}")
            if (self.head_ratio or self.ffn_ratio or self.layer_ratios or self.heads or self.drop_layers
                    or self.drop_num_layers or self.steps != 1):
                raise ValueError("method posttrain chooses heads and FFN neurons by its budget in one step: give no "
                                 "head_ratio, ffn_ratio, layer_ratios, heads, drop_layers, drop_num_layers or steps "
                                 "(drop layers in a prune stage before it)")
            if self.recovery_steps and self.recovery_until is not None:
                raise ValueError("give recovery_steps (a fixed budget) or recovery_until (a stop rule), not both")
            return self
        if self.posttrain is not None:
            raise ValueError("posttrain is read only with method posttrain")
        if not (self.head_ratio or self.ffn_ratio or self.layer_ratios or self.heads or self.drop_layers
                or self.drop_num_layers or self.hidden_size):
            raise ValueError("nothing to prune: give head_ratio, ffn_ratio, layer_ratios, heads, drop_layers, "
                             "drop_num_layers or hidden_size")
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


class PruneVocabStage(ToleranceTest):
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
    if_none_within: Literal["keep_full", "fail"] = Field(
        "keep_full", description="when no size, not even every candidate, is within tolerance: keep_full saves the "
        "model with its whole vocabulary (and says so); fail stops the run with one line")
    eval_batch_size: int = Field(64, gt=0)


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
    hidden: list[Annotated[int, Field(gt=0)] | None] = Field(
        [None], min_length=1, description="null: keep the hidden width; n: cut the residual stream to its n most "
        "active channels (embeddings, every layer, the task heads; a multiple of the source's attention heads)")


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
    seed: Seed | None = Field(None, description="default: the recipe's seed")
    importance: Literal["magnitude", "taylor"] = "taylor"
    cut: Literal["iterative", "posttrain"] = Field(
        "iterative", description="how a trial cuts heads and FFN neurons at its ratios: iterative (the prune "
        "stage's importance); posttrain (mask Fisher information over importance_batches x batch_size single "
        "examples a task, then every layer's output projections re-solved by least squares, so the recovery "
        "starts closer to the source)")
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
