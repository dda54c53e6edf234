"""The models under benchmark, each behind one interface: ``runner(threads)`` with ``run(names, feeds)``.

ONNX candidates run in an ONNX Runtime session; the PyTorch teacher runs through
:class:`compressor.export.onnx_export.ExportWrapper` (:class:`TorchGraph`), so every candidate answers one
request with the same computation: the encoder once, then every task head.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compressor.runtime.session import OrtForward, make_session
from compressor.runtime.spec import GraphSpec
from compressor.tasks import TaskPlugin


class TorchGraph:
    """A PyTorch :class:`MultiTaskModel` behind the graph contract: ``run(names, feeds)`` like an ORT session."""

    def __init__(self, model: Any, spec: GraphSpec):
        from compressor.export.onnx_export import ExportWrapper

        self.spec = spec
        self.wrapper = ExportWrapper(model.to("cpu").eval(), spec).eval()

    def run(self, names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            values = self.wrapper(*(torch.as_tensor(feeds[n]) for n in self.spec.input_names))
        out = dict(zip(self.spec.output_names, values))
        return [out[n].float().numpy() for n in (names or self.spec.output_names)]


@dataclass
class Candidate:
    """One model under benchmark.

    ``group`` names the encoding its test inputs use (models sharing a tokenizer share one). ``model`` is set
    for PyTorch candidates only.
    """

    key: str  # "a", "b", "c", "e-fp32", "e-int8", "d:<task>"
    label: str
    format: str  # "pytorch" | "onnx" | "onnx-int8"
    path: Path  # the weights file measured on disk (model.safetensors or the .onnx graph)
    spec: GraphSpec
    plugins: dict[str, TaskPlugin]
    tokenizer: Any
    params: int
    group: str
    model: Any = None
    integer_matmuls: int | None = None
    notes: list[str] = field(default_factory=list)
    source: str = ""  # where it came from, for the report (default: ``path``)
    scored: list[str] | None = None  # tasks scored (None: every task); a single-task twin: its own task

    @property
    def size_bytes(self) -> int:
        return Path(self.path).stat().st_size

    @property
    def vocab_size(self) -> int:
        return int(self.spec.metadata.get("vocab_size", 30522))

    @contextlib.contextmanager
    def runner(self, threads: int) -> Iterator[Any]:
        """Something with ``run(names, feeds)`` using ``threads`` intra-op threads."""
        if self.model is None:
            yield make_session(self.path, threads)
            return
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield TorchGraph(self.model, self.spec)
        finally:
            torch.set_num_threads(before)

    def evaluate(self, task: str, inputs: TaskInputs, threads: int,
                 batch_size: int = 64) -> tuple[dict[str, float], list[Any]]:
        """The task's metrics on ``inputs`` through the plugin's ``evaluate``, and its predictions (one per
        example of ``inputs.examples``, as the plugin's ``score`` takes them)."""
        if self.model is not None:
            import torch

            from compressor.model.forward import torch_forward

            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                forward = torch_forward(self.model.to("cpu").eval(), "cpu")
                metrics, predictions = self.plugins[task].evaluate(forward, inputs.encoded, inputs.examples,
                                                                   batch_size)
            finally:
                torch.set_num_threads(before)
        else:
            forward = OrtForward(make_session(self.path, threads), self.spec)
            metrics, predictions = self.plugins[task].evaluate(forward, inputs.encoded, inputs.examples, batch_size)
        return {k: float(v) for k, v in metrics.items()}, list(predictions)


@dataclass
class TaskInputs:
    """One task's test data encoded for one tokenizer, with the collated batches the timings use."""

    task: str
    split: str
    examples: list[Any]
    encoded: Any  # compressor.tasks.Encoded
    ones: list[dict[str, np.ndarray]]  # batch-1 batches of the first ``samples`` features, real lengths
    batches: list[dict[str, np.ndarray]]  # batches of ``batch`` features over the same features

    @property
    def mean_length(self) -> float:
        return float(np.mean([int(np.asarray(b["attention_mask"]).sum()) for b in self.ones])) if self.ones else 0.0


def task_inputs(plugins: Mapping[str, TaskPlugin], data: Any, tokenizer: Any, max_length: int, samples: int,
                batch: int, tasks: Sequence[str] | None = None) -> dict[str, TaskInputs]:
    """Test split (else dev) of every task, encoded by the model's own plugins and tokenizer."""
    from compressor.errors import CompressorError

    out: dict[str, TaskInputs] = {}
    for name in tasks or list(plugins):
        split = next((s for s in ("test", "dev") if data.has(name, s)), None)
        if split is None:
            raise CompressorError(f"task '{name}': the recipe gives no test (or dev) split to benchmark on")
        plugin = plugins[name]
        examples = data.examples(name, split)
        encoded = plugin.encode(examples, tokenizer, max_length, False)
        feats = encoded.features[:samples]
        # whole batches only (when there is at least one), so a short last batch does not skew throughput
        usable = feats[: (len(feats) // batch) * batch] if len(feats) >= batch else feats

        def collate(chunk: list[dict[str, Any]], plugin: TaskPlugin = plugin) -> dict[str, np.ndarray]:
            return {k: v.numpy() for k, v in plugin.collate(chunk).items()}

        out[name] = TaskInputs(name, split, examples, encoded, [collate([f]) for f in feats],
                               [collate(usable[i : i + batch]) for i in range(0, len(usable), batch)])
    return out


def parity_batches(plugins: Mapping[str, TaskPlugin], inputs: Mapping[str, TaskInputs],
                   n_batches: int = 3, batch_size: int = 8) -> list[tuple[str, dict[str, np.ndarray]]]:
    """``(task, collated batch)`` pairs from the test features, for ``check_parity``."""
    out = []
    for name, ti in inputs.items():
        feats = ti.encoded.features[: n_batches * batch_size]
        for i in range(0, len(feats), batch_size):
            out.append((name, {k: v.numpy() for k, v in plugins[name].collate(feats[i : i + batch_size]).items()}))
    return out


def export_checked(model: Any, spec: GraphSpec, batches: Sequence[tuple[str, dict[str, np.ndarray]]],
                   workdir: Path, threads: int) -> tuple[Path, list[str]]:
    """Export ``model`` to ONNX through the one checked export path (parity with PyTorch, checked fusions);
    returns the graph to use and notes. Raises ``ParityError`` when the raw export disagrees."""
    from compressor.export.checked import export_checked as checked_export
    from compressor.export.reference import export_notes

    checked = checked_export(model, spec, batches, workdir, threads)
    return checked.graph, export_notes(checked)
