"""Export a :class:`MultiTaskModel` to one ONNX graph: the encoder runs once, every head reads its output.

The graph contract (input and output names) is :class:`compressor.runtime.spec.GraphSpec`. Export uses the
TorchScript exporter (``dynamo=False``): it is what optimum uses for BERT-family encoders, handles the per-layer
head counts of pruned models, and needs no ``onnxscript``; batch and sequence axes (and each head's own axes)
are dynamic.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
import torch
from torch import nn

from compressor.errors import CompressorError
from compressor.measure import count_parameters, task_parameters
from compressor.model.multitask import MultiTaskModel
from compressor.runtime.spec import ExtraInput, GraphSpec, TaskGraph
from compressor.tasks import BASE_INPUTS

DEFAULT_OPSET = 17  # LayerNormalization is a native op from 17 on; ORT's fusions know every op of it


def encoder_inputs(model: MultiTaskModel) -> list[str]:
    """The ``BASE_INPUTS`` the encoder takes: ``token_type_ids`` only where it has token-type embeddings."""
    has_types = getattr(getattr(model.encoder, "embeddings", None), "token_type_embeddings", None) is not None
    return [n for n in BASE_INPUTS if n != "token_type_ids" or has_types]


def graph_spec(model: MultiTaskModel, max_length: int, plugin_names: dict[str, str] | None = None) -> GraphSpec:
    """The graph contract of ``model``: inputs, per-task outputs ``f"{task}.{name}"`` and decoder settings."""
    counts = Counter(i.name for task in model.tasks.values() for i in task.onnx_inputs())
    tasks: dict[str, TaskGraph] = {}
    for name, task in model.tasks.items():
        outputs = task.onnx_outputs()
        if not outputs:
            raise CompressorError(f"task '{name}': its plugin declares no ONNX outputs")
        extras = []
        for spec in task.onnx_inputs():
            if spec.name in BASE_INPUTS:
                raise CompressorError(f"task '{name}': extra input '{spec.name}' clashes with an encoder input")
            graph_name = spec.name if counts[spec.name] == 1 else f"{name}.{spec.name}"
            extras.append(ExtraInput(spec.name, graph_name, spec.dtype, dict(spec.dynamic_axes),
                                     tuple(spec.example_shape)))
        plugin = (plugin_names or {}).get(name) or task.plugin_name or type(task).__name__
        tasks[name] = TaskGraph(
            name=name, plugin=plugin, labels=list(task.labels),
            outputs={o.name: f"{name}.{o.name}" for o in outputs}, atol={o.name: float(o.atol) for o in outputs},
            extra_inputs=extras, decoder=dict(task.export_spec()), options=task.options.model_dump(mode="json"),
        )
    metadata = {
        "vocab_size": model.encoder.get_input_embeddings().num_embeddings,
        "hidden_size": model.encoder.config.hidden_size,
        "params": count_parameters(model),
        "task_params": {name: task_parameters(model, name) for name in model.tasks},
    }
    return GraphSpec(encoder_inputs(model), tasks, max_length, metadata)


class _Heads(nn.Module):
    """Every task head in one module, so their nodes share the ``/heads/<task>/`` scope in the graph."""

    def __init__(self, heads: nn.ModuleDict, spec: GraphSpec):
        super().__init__()
        self.tasks = heads
        self.spec = spec

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
                feeds: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        outs: list[torch.Tensor] = []
        for name, task in self.spec.tasks.items():
            extra = {e.name: feeds[e.graph_name] for e in task.extra_inputs}
            result = self.tasks[name](hidden, attention_mask, **extra)
            for out_name in task.outputs:
                if out_name not in result:
                    raise CompressorError(f"task '{name}': the head returned {sorted(result)} but its plugin "
                                          f"declares ONNX output '{out_name}'")
                outs.append(result[out_name])
        return tuple(outs)


class ExportWrapper(nn.Module):
    """Positional inputs in ``spec.input_names`` order -> every output in ``spec.output_names`` order.

    The encoder runs once; node names of the heads start with ``/heads/<task>/`` (see ``HEAD_SCOPE``).
    """

    def __init__(self, model: MultiTaskModel, spec: GraphSpec):
        super().__init__()
        self.encoder = model.encoder
        self.heads = _Heads(model.heads, spec)
        self.input_names = spec.input_names

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = dict(zip(self.input_names, inputs))
        enc = self.encoder(
            input_ids=feeds["input_ids"], attention_mask=feeds["attention_mask"],
            token_type_ids=feeds.get("token_type_ids"), return_dict=True,
        )
        return self.heads(enc.last_hidden_state, feeds["attention_mask"], feeds)


def sample_inputs(model: MultiTaskModel, spec: GraphSpec, batch: int = 2, seq_len: int = 16) -> dict[str, torch.Tensor]:
    """Trace inputs: real vocabulary ids, a padded second row (so masking is traced), extra-input dummies."""
    from compressor.measure import dummy_inputs

    inputs: dict[str, torch.Tensor] = {}
    for name, task in spec.tasks.items():
        dummies = dummy_inputs(model, name, batch, seq_len)
        for k in spec.base_inputs:
            inputs.setdefault(k, dummies[k])
        for e in task.extra_inputs:
            inputs[e.graph_name] = dummies[e.name]
    if batch > 1:
        inputs["attention_mask"] = inputs["attention_mask"].clone()
        inputs["attention_mask"][1, seq_len // 2 :] = 0
    return inputs


def dynamic_axes(spec: GraphSpec) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {k: {0: "batch", 1: "sequence"} for k in spec.base_inputs}
    for task_name, task in spec.tasks.items():
        for e in task.extra_inputs:
            axes[e.graph_name] = {int(k): v for k, v in e.dynamic_axes.items()}
    return axes


def output_axes(model: MultiTaskModel) -> dict[str, dict[int, str]]:
    return {f"{name}.{o.name}": {int(k): v for k, v in o.dynamic_axes.items()}
            for name, task in model.tasks.items() for o in task.onnx_outputs()}


def export_onnx(model: MultiTaskModel, path: Path, spec: GraphSpec, opset: int = DEFAULT_OPSET) -> Path:
    """Write the multi-task graph of ``model`` (CPU, eval mode) to ``path``. No numeric check: see ``parity``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").eval()
    wrapper = ExportWrapper(model, spec).eval()
    inputs = sample_inputs(model, spec)
    args = tuple(inputs[n] for n in spec.input_names)
    axes = {**dynamic_axes(spec), **output_axes(model)}
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript exporter warns that it is legacy, and about traced shape arithmetic it handles
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, args, str(path), dynamo=False, input_names=spec.input_names, output_names=spec.output_names,
            dynamic_axes=axes, opset_version=opset, do_constant_folding=True,
        )
    check_graph_io(path, spec)
    return path


def check_graph_io(path: Path, spec: GraphSpec) -> None:
    """Raise ``CompressorError`` when the graph's input/output names are not exactly the contract's."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    # the exporter drops an input no output depends on; that is a head that ignores its extra input
    if inputs != spec.input_names:
        raise CompressorError(f"{path}: graph inputs {inputs} differ from the contract {spec.input_names} "
                              "(a head that ignores an input it declares in onnx_inputs?)")
    if outputs != spec.output_names:
        raise CompressorError(f"{path}: graph outputs {outputs} differ from the contract {spec.output_names}")


def onnx_param_count(path: Path) -> int:
    """Elements in the graph's initializers (weights, whatever their dtype; a table of 4-bit values packed two to
    a uint8 byte, as ``GatherBlockQuantized`` reads it, counts two per byte)."""
    import math

    import onnx

    model = onnx.load(str(path))
    packed = {n.input[0] for n in model.graph.node if n.op_type == "GatherBlockQuantized"
              and next((a.i for a in n.attribute if a.name == "bits"), 4) == 4}
    return sum(math.prod(int(d) for d in init.dims)
               * (2 if init.name in packed and init.data_type == onnx.TensorProto.UINT8 else 1)
               for init in model.graph.initializer)
