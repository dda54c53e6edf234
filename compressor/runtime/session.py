"""ONNX Runtime sessions over a multi-task graph: feeds, a numpy ``Forward`` per task, and latency.

Torch-free: onnxruntime, numpy and the standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compressor.runtime.spec import ExtraInput, GraphSpec


#: ONNX Runtime graph optimisers every session leaves out: ``SkipLayerNormFusion`` would fuse the residual ``Add``
#: and ``LayerNormalization`` pairs our exports keep apart, into a CPU kernel measured 3-7x slower (see
#: :func:`compressor.export.optimize.fuse_transformer`); with the pairs apart an INT8 student ran 28% faster.
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def make_session(path: Path | str, threads: int | None = None) -> Any:
    """A CPU ``InferenceSession`` (all graph optimisations on but :data:`DISABLED_OPTIMIZERS`; ``threads`` =
    intra-op threads, None = ORT default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # ORT's own warnings (e.g. unused initializers) are not the user's problem
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(DISABLED_OPTIMIZERS))


def dummy_extra(spec: ExtraInput, batch: int) -> np.ndarray:
    """A well-formed placeholder for an extra input no task of this run reads (indices 0, masks on)."""
    shape = spec.dummy_shape(batch)
    if spec.dtype == "bool":
        return np.ones(shape, dtype=bool)
    return np.zeros(shape, dtype=np.dtype(spec.dtype))


def build_feeds(spec: GraphSpec, batch: Mapping[str, np.ndarray], active: Sequence[str]) -> dict[str, np.ndarray]:
    """Graph feeds from a batch: encoder inputs, the extra inputs of ``active`` tasks, dummies for the rest.

    Raises ``KeyError`` naming an input the batch lacks.
    """
    if "input_ids" not in batch:
        raise KeyError("input_ids")
    ids = np.asarray(batch["input_ids"])
    n = ids.shape[0]
    feeds: dict[str, np.ndarray] = {}
    for name in spec.base_inputs:
        if name in batch:
            feeds[name] = np.asarray(batch[name], dtype=np.int64)
        elif name == "token_type_ids":
            feeds[name] = np.zeros_like(ids, dtype=np.int64)
        elif name == "attention_mask":
            feeds[name] = np.ones_like(ids, dtype=np.int64)
        else:
            raise KeyError(name)
    for task_name, task in spec.tasks.items():
        for extra in task.extra_inputs:
            if task_name in active:
                if extra.name not in batch and extra.graph_name not in batch:
                    raise KeyError(extra.name)
                value = batch[extra.name] if extra.name in batch else batch[extra.graph_name]
                feeds[extra.graph_name] = np.asarray(value, dtype=np.dtype(extra.dtype))
            elif extra.graph_name not in feeds:
                feeds[extra.graph_name] = dummy_extra(extra, n)
    return feeds


class OrtForward:
    """A ``compressor.tasks.Forward`` over an ONNX Runtime session of a multi-task graph.

    ``forward(task, batch)`` feeds the batch's inputs (placeholders for other tasks' extra inputs), fetches only
    ``task``'s outputs and returns them under the plugin's output names.
    """

    def __init__(self, session: Any, spec: GraphSpec):
        self.session = session
        self.spec = spec
        self.calls = 0

    def __call__(self, task: str, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        graph = self.spec.tasks[task]
        names = list(graph.outputs)
        values = self.session.run([graph.outputs[n] for n in names], build_feeds(self.spec, batch, [task]))
        self.calls += 1
        return dict(zip(names, values))

    def run_all(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every graph output by graph name."""
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, dict(feeds))))


def latency_inputs(spec: GraphSpec, vocab_size: int, seq_len: int, batch: int = 1) -> dict[str, np.ndarray]:
    """Feeds of :func:`compressor.measure.dummy_tokens` for a latency run, placeholders for extra inputs."""
    from compressor.measure import dummy_tokens

    return build_feeds(spec, dummy_tokens(vocab_size, seq_len, batch), active=[])


def session_threads(session: Any) -> int | None:
    """The intra-op thread count a session was created with (0 means ORT's default: one per physical core)."""
    try:
        return int(session.get_session_options().intra_op_num_threads)
    except Exception:  # noqa: BLE001 - older ORT builds lack the accessor; the report then says "default"
        return None
