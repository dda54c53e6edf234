"""One candidate: built from the source model, recovered by distillation, exported, measured and scored.

Built with the toolkit's own parts: :class:`compressor.prune.pruner.StructuredPruner` (torch-pruning dependency
groups) removes layers, heads and FFN neurons; the training engine recovers it by distillation from the teacher
(:func:`compressor.distill.objective.recovery_engine`, reading the teacher's outputs from a
:class:`~compressor.distill.cache.TeacherCache` when the recipe asks); ``compressor.prune.vocab`` cuts the
vocabulary; ``compressor.export`` writes the ONE ONNX graph (fused
when the fused graph passes parity) and, per the candidate's INT8 mode, quantizes it. Every task is scored on its
dev split with ONNX Runtime on the graph that is timed; latency is one ``session.run`` at batch 1 and sequence
``latency_seq_len`` on ``latency_threads`` thread(s); size is the graph file on disk.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compressor.model.architecture import encoder_layers
from compressor.model.multitask import MultiTaskModel
from compressor.search.space import Knobs, prune_config
from compressor.tasks import retention


class EarlyStopped(Exception):
    """A trial fell far below its floor half way through its recovery."""

    def __init__(self, scores: dict[str, float], retention: dict[str, float]):
        super().__init__("early-stopped")
        self.scores, self.retention = scores, retention


@dataclass
class Measured:
    scores: dict[str, float]  # task -> dev primary metric (ONNX Runtime, the measured graph)
    retention: dict[str, float]  # task -> scores / teacher dev
    latency_ms: float  # p50
    latency_p95_ms: float
    size_bytes: int  # graph on disk
    params: int
    vocab_size: int
    architecture: list[dict[str, int]] = field(default_factory=list)
    recovery: dict[str, float] = field(default_factory=dict)


class CandidateBuilder:
    """Builds and measures candidates of one source model.

    Args:
        stage: the ``SearchStage`` config.
        source: the model the candidates are cut from (a distilled student or the teacher); never modified.
        tokenizer: the source's tokenizer.
        teacher: the distillation teacher of the recoveries.
        teacher_layers: source layer -> teacher layer (None: unknown, uniform map).
        data: the run's ``DataStore``.
        max_length: the recipe's ``model.max_length``.
        teacher_dev: task -> the teacher's dev metric.
        eval_threads: ONNX Runtime threads when scoring (latency always uses ``stage.latency_threads``).
        teacher_cache: a :class:`~compressor.distill.cache.TeacherCache` of ``teacher`` the recoveries read
            (None: the teacher runs at every recovery step).
    """

    def __init__(self, stage: Any, source: MultiTaskModel, tokenizer: Any, teacher: MultiTaskModel,
                 teacher_layers: list[int] | None, data: Any, max_length: int, teacher_dev: Mapping[str, float],
                 eval_threads: int | None, seed: int, teacher_cache: Any = None):
        from compressor.prune.importance import task_batches

        self.stage, self.source, self.tokenizer, self.teacher = stage, source, tokenizer, teacher
        self.teacher_layers = teacher_layers
        self.data, self.max_length = data, max_length
        self.teacher_dev = dict(teacher_dev)
        self.eval_threads = eval_threads
        self.seed = seed
        self.teacher_cache = teacher_cache  # the teacher's outputs, computed once for every trial
        self.tasks = list(source.tasks)
        self.higher = {t: source.tasks[t].metric.higher_is_better for t in self.tasks}
        self.num_layers = len(encoder_layers(source.encoder))
        self.batches = task_batches(data, tokenizer, source.tasks, max_length, stage.importance_batches,
                                    stage.batch_size, seed)
        self._fisher_batches: Any = None  # single-example batches of ``cut: posttrain``, built on first use

    # ---- build and recover ----------------------------------------------------------------------------------
    def build(self, knobs: Knobs, seed: int) -> tuple[MultiTaskModel, list[int]]:
        """The pruned candidate (not recovered) and the source layers it kept."""
        from compressor.prune.pruner import StructuredPruner

        torch.manual_seed(seed)
        model = copy.deepcopy(self.source)
        if knobs.hidden is not None:
            from compressor.prune.width import channel_scores, choose_channels, cut_width

            keep = choose_channels(channel_scores(model, self.batches), knobs.hidden)
            cut_width(model, keep, {t: bs[0] for t, bs in self.batches.items()}, f"{self.stage.name}: hidden")
        cfg = prune_config(knobs, self.stage, self.num_layers)
        if cfg is None:
            return model, list(range(self.num_layers))
        if getattr(self.stage, "cut", "iterative") == "posttrain":
            return self._posttrain_build(model, knobs, cfg)
        pruner = StructuredPruner(model, cfg, self.batches)
        pruner.run()
        model.eval()
        return model, list(pruner.layer_ids)

    def _posttrain_build(self, model: MultiTaskModel, knobs: Knobs, cfg: Any) -> tuple[MultiTaskModel, list[int]]:
        """``cut: posttrain``: the least important layers dropped as usual, then each kept layer's heads and FFN
        neurons cut at the knob's ratios by mask Fisher information, and every layer reconstructed."""
        from compressor.prune.importance import task_batches
        from compressor.prune.posttrain import posttrain_prune
        from compressor.prune.pruner import StructuredPruner

        kept = list(range(self.num_layers))
        if knobs.layers < self.num_layers:
            pruner = StructuredPruner(model, cfg.model_copy(update={"head_ratio": None, "ffn_ratio": None,
                                                                    "layer_ratios": {}}), self.batches)
            pruner.run()
            kept = list(pruner.layer_ids)
        if any(knobs.head_ratios[i] or knobs.ffn_ratios[i] for i in kept):
            if self._fisher_batches is None:
                self._fisher_batches = task_batches(self.data, self.tokenizer, self.source.tasks, self.max_length,
                                                    self.stage.importance_batches * self.stage.batch_size, 1,
                                                    self.seed)
            calibration = [b for bs in self.batches.values() for b in bs]
            posttrain_prune(model, self._fisher_batches, calibration=calibration,
                            ratios=([knobs.head_ratios[i] for i in kept], [knobs.ffn_ratios[i] for i in kept]))
        model.eval()
        return model, kept

    def recover(self, model: MultiTaskModel, kept: list[int], steps: int, seed: int,
                floors: Mapping[str, float] | None = None) -> dict[str, float]:
        """``steps`` distillation steps from the teacher; with ``floors`` and an early-stop margin, checks the dev
        retention half way and raises :class:`EarlyStopped` when the worst task is more than the margin below.
        An uncut candidate (as many parameters as the source) is not recovered."""
        from compressor.distill.objective import recovery_engine
        from compressor.model.student import default_layer_map

        if steps <= 0 or model.num_parameters() == self.source.num_parameters():
            return {}  # nothing was cut: the source as it is (recovery would only move it by optimiser noise)
        to_teacher = [self.teacher_layers[i] for i in kept] if self.teacher_layers is not None else None
        layer_map = default_layer_map(len(encoder_layers(model.encoder)), len(encoder_layers(self.teacher.encoder)),
                                      to_teacher)
        engine = recovery_engine(model, self.teacher, self.tokenizer, self.data, self.stage.recovery, steps=steps,
                                 seed=seed, layer_map=layer_map, teacher_cache=self.teacher_cache,
                                 label="search recovery")
        margin = self.stage.early_stop_margin
        if floors is not None and margin and steps >= 2:
            engine.run(steps // 2)
            scores = self.torch_dev(model, self.tokenizer)
            retention = self.retention(scores)
            if min(retention[t] - floors[t] for t in self.tasks) < -margin:
                raise EarlyStopped(scores, retention)
        parts = engine.run(steps - engine.steps_done).means()
        model.eval()
        return parts

    def prune_vocab(self, model: MultiTaskModel, min_count: int | None) -> Any:
        """Cut the vocabulary to the tokens every task's training data uses ``min_count`` times; the tokenizer."""
        if min_count is None:
            return self.tokenizer
        from compressor.prune.vocab import prune_embeddings, prune_tokenizer, select_vocab

        id_lists = [f["input_ids"] for t in self.tasks
                    for f in self.data.encoded(t, "train", self.tokenizer, self.max_length, train=True).features]
        kept, _ = select_vocab(self.tokenizer, id_lists, keep_chars="ascii", min_count=min_count)
        new_tokenizer = prune_tokenizer(self.tokenizer, kept)
        prune_embeddings(model.encoder, kept)
        model.eval()
        return new_tokenizer

    # ---- scoring --------------------------------------------------------------------------------------------
    def retention(self, scores: Mapping[str, float]) -> dict[str, float]:
        return {t: retention(scores[t], self.teacher_dev[t], self.higher[t]) for t in self.tasks}

    def torch_dev(self, model: MultiTaskModel, tokenizer: Any) -> dict[str, float]:
        """Every task's primary dev metric with PyTorch."""
        from compressor.model.forward import dev_metrics

        return dev_metrics(model, tokenizer, self.data, self.tasks, self.max_length, self.stage.eval_batch_size)

    def measure(self, model: MultiTaskModel, tokenizer: Any, int8: str, workdir: Path | None = None,
                keep: Path | None = None) -> Measured:
        """Export ``model`` (fused when parity holds; INT8 per ``int8``), score every task on dev with ONNX
        Runtime and time it. ``keep``: copy the measured graph there."""
        import shutil

        with tempfile.TemporaryDirectory(dir=workdir, prefix=".candidate-") as tmp_str:
            graph, spec = self._graph(model, tokenizer, int8, Path(tmp_str))
            scores, lat = self._score(graph, spec, model, tokenizer)
            size = graph.stat().st_size
            if keep is not None:
                keep.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(graph, keep)
        from compressor.model.architecture import read_architecture

        return Measured(scores=scores, retention=self.retention(scores), latency_ms=lat["p50"],
                        latency_p95_ms=lat["p95"], size_bytes=size, params=model.num_parameters(),
                        vocab_size=model.encoder.get_input_embeddings().num_embeddings,
                        architecture=[a.to_dict() for a in read_architecture(model.encoder)])

    def _graph(self, model: MultiTaskModel, tokenizer: Any, int8: str, tmp: Path) -> tuple[Path, Any]:
        from compressor.export.evaluate import calibration_feeds
        from compressor.export.onnx_export import export_onnx, graph_spec
        from compressor.export.optimize import optimize_checked
        from compressor.export.parity import check_parity, real_batches

        model = model.to("cpu").eval()
        spec = graph_spec(model, self.max_length)
        raw = export_onnx(model, tmp / "model.onnx", spec)
        batches = real_batches(model, tokenizer, self.data, self.max_length, 1, 4)
        result = optimize_checked(raw, tmp / "model.opt.onnx", lambda p: check_parity(
            p, model, spec, batches, threads=self.eval_threads))
        fused = result.path if result.path is not None else raw
        if int8 == "none":
            return fused, spec
        from compressor.export.quantize import QuantOptions, calibrate, prepare_source, quantize_graph

        options = QuantOptions(mode=int8)
        # as the quantize stage does: dynamic on the fused graph, static QDQ on the raw one
        prepared = prepare_source(fused if int8 == "dynamic" else raw, tmp / "src" / "model.onnx")
        ranges = None
        if int8 == "static":
            feeds = calibration_feeds(spec, model.tasks, self.data, tokenizer, "train", 32, 8)
            ranges = calibrate(prepared, feeds, options, tmp)
        return quantize_graph(prepared, tmp / "model.int8.onnx", options, ranges=ranges), spec

    def _score(self, graph: Path, spec: Any, model: MultiTaskModel, tokenizer: Any) -> tuple[dict[str, float],
                                                                                            dict[str, float]]:
        from compressor.export.evaluate import evaluate_split
        from compressor.measure import ort_latency_ms
        from compressor.runtime.session import OrtForward, latency_inputs, make_session

        forward = OrtForward(make_session(graph, self.eval_threads), spec)
        metrics = evaluate_split(forward, model.tasks, self.data, tokenizer, self.max_length, "dev", self.tasks,
                                 self.stage.eval_batch_size)
        scores = {t: float(metrics[t][model.tasks[t].metric.name]) for t in self.tasks}
        session = make_session(graph, self.stage.latency_threads)
        feeds = latency_inputs(spec, int(spec.metadata.get("vocab_size", 30522)), self.stage.latency_seq_len)
        lat = ort_latency_ms(session, feeds, self.stage.latency_runs, self.stage.latency_warmup)
        return scores, lat

    # ---- one trial ------------------------------------------------------------------------------------------
    def trial(self, knobs: Knobs, seed: int, floors: Mapping[str, float], workdir: Path | None = None) -> Measured:
        """Build, short recovery (with the early-stop check), vocabulary cut, export and measure."""
        model, kept = self.build(knobs, seed)
        parts = self.recover(model, kept, self.stage.recovery_steps, seed, floors)
        tokenizer = self.prune_vocab(model, knobs.vocab_min_count)
        measured = self.measure(model, tokenizer, knobs.int8, workdir)
        measured.recovery = parts
        return measured
