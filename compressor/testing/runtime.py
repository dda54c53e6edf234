"""The runtime part of the contract: the plugin's torch-free decoder (named by ``export_spec``) over PyTorch
outputs, through a ``Bundle`` as an edge deployment would run it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from compressor.testing.base import SAMPLE_PAIR, SAMPLE_QUESTION, Checker


class TorchSession:
    """An ONNX Runtime stand-in over the PyTorch model: ``run(graph output names, feeds by graph input name)``."""

    def __init__(self, model: Any, spec: Any):
        self.model, self.spec = model, spec

    def run(self, names: list[str], feeds: Mapping[str, Any]) -> list[Any]:
        import torch

        values: dict[str, Any] = {}
        for task_name, graph in self.spec.tasks.items():
            wanted = [n for n in graph.outputs.values() if n in names]
            if not wanted:
                continue
            batch = {k: torch.as_tensor(feeds[k]) for k in self.spec.base_inputs if k in feeds}
            for extra in graph.extra_inputs:
                batch[extra.name] = torch.as_tensor(feeds[extra.graph_name])
            with torch.no_grad():
                out = self.model.forward_batch(task_name, batch).outputs
            for name, graph_name in graph.outputs.items():
                values[graph_name] = out[name].float().numpy()
        return [values[n] for n in names]


def check_runtime(c: Checker, model: Any, tokenizer: Any, max_length: int, task_name: str,
                   inputs: dict[str, Any]) -> None:
    """Decode PyTorch outputs with the runtime decoder named by ``export_spec``, as a bundle would."""
    from tokenizers import Tokenizer

    from compressor.export.onnx_export import graph_spec
    from compressor.runtime.bundle import Bundle, BundleError, make_decoders

    spec = graph_spec(model, max_length)
    try:
        decoders = make_decoders(spec, Path("<export_spec>"))
    except BundleError as exc:
        raise c.fail("export_spec", str(exc).replace("<export_spec>: ", "")) from None
    tok = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    tok.no_padding()
    tok.no_truncation()
    bundle = Bundle(Path("<check>"), spec, tok, TorchSession(model, spec), decoders)
    inputs = {"questions": SAMPLE_QUESTION, "text_pairs": SAMPLE_PAIR, **inputs}
    texts = inputs.pop("texts", None) or ["Anna Schmidt works for Acme Corp in Oslo .", "Nothing happened ."]
    try:
        preds = bundle.predict(texts, tasks=[task_name], **inputs)
    except BundleError as exc:
        raise c.fail("runtime decoder", f"decoder {spec.tasks[task_name].decoder.get('decoder')!r}: {exc}") from None
    try:
        json.dumps(preds)
    except TypeError as exc:
        raise c.fail("runtime decoder", f"predictions are not JSON-serialisable ({exc}); expected plain Python "
                                        "values") from None
    for p in preds:
        decoders[task_name].describe(p["predictions"][task_name])
