"""The contract, phase by phase, in the order :func:`compressor.testing.check_plugin` runs it: build and read ->
encode -> collate -> forward (outputs and their dynamic axes) -> loss and backward -> distillation targets ->
decode, aggregate, score, evaluate -> what manifests and bundles store -> runtime decoder -> save/load."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.errors import CompressorError
from compressor.tasks import DistillTarget, Encoded, TaskPlugin
from compressor.testing.base import CheckReport, Checker, ContractError, default_tokenizer, resolve, tiny_encoder
from compressor.testing.parts import (check_axes, check_first_subtoken_labels, check_metrics, collate_checked,
                                      describe_value, other_batch)
from compressor.testing.runtime import check_runtime


@dataclass
class CheckSetup:
    """What :func:`check_plugin` was asked to check (see its arguments)."""

    plugin_name: str
    task_name: str
    data: Path
    format: str | None = None
    options: Mapping[str, Any] | None = None
    labels: list[str] | None = None
    siblings: Mapping[str, Mapping[str, Any]] | None = None
    max_length: int = 64
    batch_size: int = 4
    tokenizer: Any = None
    first_subtoken_labels: bool = True
    save_load: bool = True
    runtime: bool = True
    runtime_inputs: dict[str, Any] = field(default_factory=dict)
    encoding: str | None = None


def run_checks(c: Checker, setup: CheckSetup) -> CheckReport:
    """Every phase in turn; the first broken part raises :class:`ContractError`."""
    from compressor.model.multitask import MultiTaskModel

    if not setup.data.exists():  # a file, or a datasets save_to_disk directory
        raise c.fail("read", f"fixture {setup.data} does not exist")
    tokenizer = setup.tokenizer if setup.tokenizer is not None else default_tokenizer()
    if not getattr(tokenizer, "is_fast", False):
        raise ContractError(f"plugin '{c.name}': check: encode gets a Hugging Face fast tokenizer; got "
                            f"{type(tokenizer).__name__}")
    name = setup.task_name
    tasks, exs = build_and_read(c, setup)
    task = tasks[name]
    encoded = check_encode(c, task, exs, tokenizer, setup)
    feats = encoded.features[: setup.batch_size]
    batch = check_collate(c, task, feats)
    model = MultiTaskModel(tiny_encoder(max(len(tokenizer), tokenizer.vocab_size)), tasks)
    model.train()
    outputs, notes = check_outputs(c, model, task, name, encoded, feats, batch, setup.batch_size)
    check_loss(c, model, task, name, outputs, batch)
    check_distill_targets(c, task, outputs, batch)
    metrics = check_decode_and_score(c, model, task, name, encoded, exs, setup.batch_size)
    check_stored_specs(c, task)
    if setup.runtime:
        check_runtime(c, model, tokenizer, setup.max_length, name, setup.runtime_inputs)
        c.ok("runtime decoder")
    if setup.save_load:
        check_save_load(c, model, tokenizer, task, name, batch, setup.max_length)
    return CheckReport(c.name, len(exs), len(encoded.features), list(task.labels), metrics, c.checked, notes)


def build_and_read(c: Checker, setup: CheckSetup) -> tuple[dict[str, TaskPlugin], list[Any]]:
    """Build the task and its siblings, bind them, read each one's data (in ``setup.encoding``) and fit missing
    labels."""
    from compressor.data.store import read_split
    from compressor.tasks import build_task

    try:
        task = build_task(setup.plugin_name, setup.task_name, setup.labels, setup.options)
    except CompressorError as exc:
        raise c.fail("__init__", str(exc)) from None
    tasks: dict[str, TaskPlugin] = {setup.task_name: task}
    specs: dict[str, Mapping[str, Any]] = {setup.task_name: {"path": setup.data, "format": setup.format}}
    for sib_name, sib in (setup.siblings or {}).items():
        sib_plugin = sib.get("plugin", sib_name)
        sib_plugin = sib_plugin if isinstance(sib_plugin, str) else resolve(sib_plugin)[0] or sib_plugin.__name__
        tasks[sib_name] = build_task(sib_plugin, sib_name, sib.get("labels"), sib.get("options"))
        specs[sib_name] = {"path": Path(sib.get("path", setup.data)), "format": sib.get("format")}
    missing = [r for r in task.requires() if r not in tasks]
    if missing:
        raise c.fail("requires", f"needs task(s) {', '.join(missing)} beside it; pass siblings={{name: {{'plugin': "
                                 "..., 'path': ...}} (CLI: --sibling NAME=PLUGIN)")
    for t in tasks.values():
        t.bind(tasks)
    examples: dict[str, list[Any]] = {}
    for tname, t in tasks.items():
        got = read_split(t, specs[tname]["path"], specs[tname]["format"], setup.encoding)
        if not isinstance(got, list):
            raise c.fail("read", f"returned {type(got).__name__}; expected a list of examples")
        if not got:
            raise c.fail("read", f"read no examples from {specs[tname]['path']}; expected a non-empty list")
        examples[tname] = got
        if not t.labels:
            fitted = t.fit_labels(got)
            if not isinstance(fitted, list) or not all(isinstance(x, str) for x in fitted):
                raise c.fail("fit_labels", f"returned {fitted!r}; expected a list of label strings")
            t.labels = fitted
    c.ok("read")
    c.ok("fit_labels")
    return tasks, examples[setup.task_name]


def check_encode(c: Checker, task: TaskPlugin, exs: list[Any], tokenizer: Any, setup: CheckSetup) -> Encoded:
    max_length = setup.max_length
    encoded = task.encode(exs, tokenizer, max_length, True)
    if not isinstance(encoded, Encoded):
        raise c.fail("encode", f"returned {type(encoded).__name__}; expected compressor.tasks.Encoded")
    if encoded.num_examples != len(exs):
        raise c.fail("encode", f"Encoded.num_examples is {encoded.num_examples}; expected {len(exs)} (the examples "
                               "given)")
    if not encoded.features:
        raise c.fail("encode", "returned no features; expected at least one per example")
    for i, f in enumerate(encoded.features):
        if not isinstance(f, dict):
            raise c.fail("encode", f"feature {i} is {type(f).__name__}; expected a dict")
        if "input_ids" not in f or "example_index" not in f:
            raise c.fail("encode", f"feature {i} lacks {'input_ids' if 'input_ids' not in f else 'example_index'}; "
                                   "expected input_ids (list of ints) and example_index")
        if not 0 <= f["example_index"] < len(exs):
            raise c.fail("encode", f"feature {i} has example_index {f['example_index']}; expected 0..{len(exs) - 1}")
        if len(f["input_ids"]) > max_length:
            raise c.fail("encode", f"feature {i} has {len(f['input_ids'])} input_ids; expected at most max_length "
                                   f"{max_length} (truncate, and count it in Encoded.truncated)")
    c.ok("encode")
    if setup.first_subtoken_labels:
        check_first_subtoken_labels(c, encoded)
    return encoded


def check_collate(c: Checker, task: TaskPlugin, feats: list[dict[str, Any]]) -> dict[str, Any]:
    """A collated batch, with every extra input ``onnx_inputs`` declares in it."""
    batch = collate_checked(c, task, feats)
    n = batch["input_ids"].shape[0]
    for spec_in in task.onnx_inputs():
        if spec_in.name not in batch:
            raise c.fail("collate", f"extra input '{spec_in.name}' (declared by onnx_inputs) is not in the batch")
        t = batch[spec_in.name]
        if t.dim() != 1 + len(spec_in.example_shape) or t.shape[0] != n:
            raise c.fail("onnx_inputs", f"extra input '{spec_in.name}' has shape {tuple(t.shape)}; expected "
                                        f"[batch={n}] + {len(spec_in.example_shape)} more dim(s) (example_shape "
                                        f"{spec_in.example_shape})")
    c.ok("collate")
    return batch


def check_outputs(c: Checker, model: Any, task: TaskPlugin, name: str, encoded: Encoded,
                  feats: list[dict[str, Any]], batch: dict[str, Any], batch_size: int) -> tuple[dict, list[str]]:
    """Forward: the head's outputs are the declared ones, and sizes change only along declared dynamic axes."""
    import torch

    n, seq = batch["input_ids"].shape
    outputs = model.forward_batch(name, batch).outputs
    declared = task.onnx_outputs()
    if list(outputs) != [o.name for o in declared]:
        raise c.fail("build_head", f"the head returned outputs {list(outputs)}; expected {[o.name for o in declared]} "
                                   "(onnx_outputs, in that order)")
    other = other_batch(encoded.features, feats, batch_size)
    second = collate_checked(c, task, other) if other is not None else None
    with torch.no_grad():
        other_out = model.forward_batch(name, second).outputs if second is not None else None
    notes: list[str] = []
    for out in declared:
        check_axes(c, out, outputs[out.name], n, seq,
                   other_out[out.name] if other_out is not None else None,
                   tuple(second["input_ids"].shape) if second is not None else None)
    if second is None or second["input_ids"].shape[1] == seq:
        notes.append("every feature has the same length: undeclared sequence axes could not be detected")
    c.ok("onnx_outputs")
    return outputs, notes


def check_loss(c: Checker, model: Any, task: TaskPlugin, name: str, outputs: Mapping[str, Any],
               batch: dict[str, Any]) -> None:
    """A finite scalar loss whose gradient reaches every head parameter and the shared encoder."""
    import torch

    loss = task.loss(outputs, batch)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise c.fail("loss", f"returned {describe_value(loss)}; expected a scalar tensor")
    if not math.isfinite(loss.item()):
        raise c.fail("loss", f"returned {loss.item()}; expected a finite value")
    if not loss.requires_grad:
        raise c.fail("loss", "returned a tensor without grad; expected a loss computed from the outputs")
    loss.backward()
    grads = [p.grad for p in model.heads[name].parameters()]
    if not grads or any(g is None for g in grads):
        raise c.fail("loss", "a head parameter got no gradient; expected the loss to reach every head parameter")
    if model.encoder.embeddings.word_embeddings.weight.grad is None:
        raise c.fail("loss", "the encoder got no gradient; expected the loss to train the shared encoder")
    c.ok("loss")


def check_distill_targets(c: Checker, task: TaskPlugin, outputs: Mapping[str, Any], batch: dict[str, Any]) -> None:
    import torch

    n = batch["input_ids"].shape[0]
    targets = task.distill_targets(outputs, batch)
    if not isinstance(targets, dict) or not targets:
        raise c.fail("distill_targets", f"returned {describe_value(targets)}; expected a non-empty dict of name -> "
                                        "DistillTarget")
    for key, target in targets.items():
        if not isinstance(target, DistillTarget):
            raise c.fail("distill_targets", f"'{key}' is {type(target).__name__}; expected a DistillTarget")
        if target.logits.shape[0] != n:
            raise c.fail("distill_targets", f"logits of '{key}' have {target.logits.shape[0]} rows; expected the "
                                            f"batch size {n}")
        if target.mask is not None:
            if not isinstance(target.mask, torch.Tensor) or target.mask.dtype != torch.bool:
                dtype = target.mask.dtype if isinstance(target.mask, torch.Tensor) else type(target.mask).__name__
                raise c.fail("distill_targets", f"mask of '{key}' has dtype {dtype}; expected torch.bool (true where "
                                                "distillation compares, e.g. labels != -100)")
            if tuple(target.mask.shape) != tuple(target.logits.shape[:-1]):
                raise c.fail("distill_targets", f"mask of '{key}' has shape {tuple(target.mask.shape)}; expected "
                                                f"the logits' shape without its last dim {tuple(target.logits.shape[:-1])}")
    c.ok("distill_targets")


def check_decode_and_score(c: Checker, model: Any, task: TaskPlugin, name: str, encoded: Encoded, exs: list[Any],
                           batch_size: int) -> dict[str, float]:
    """decode -> aggregate -> score, then evaluate; the metrics of ``evaluate``."""
    from compressor.model.forward import torch_forward

    model.eval()
    forward = torch_forward(model)
    results: list[Any] = []
    for lo in range(0, len(encoded.features), batch_size):
        chunk = encoded.features[lo : lo + batch_size]
        np_batch = {k: v.numpy() for k, v in task.collate(chunk).items()}
        decoded = task.decode(forward(name, np_batch), np_batch, chunk)
        if not isinstance(decoded, list) or len(decoded) != len(chunk):
            got = f"{len(decoded)} result(s)" if isinstance(decoded, list) else type(decoded).__name__
            raise c.fail("decode", f"returned {got} for a batch of {len(chunk)} features; expected a list with one "
                                   "result per feature")
        results.extend(decoded)
    c.ok("decode")
    predictions = task.aggregate(results, encoded)
    if len(predictions) != len(exs):
        raise c.fail("aggregate", f"returned {len(predictions)} predictions for {len(exs)} examples; expected one "
                                  "per example")
    c.ok("aggregate")
    scored = check_metrics(c, task, task.score(predictions, exs), "score")
    check_positional_score(c, task, predictions, exs, scored)
    c.ok("score")
    metrics, predictions = task.evaluate(forward, encoded, exs, batch_size)
    metrics = check_metrics(c, task, metrics, "evaluate")
    if len(predictions) != len(exs):
        raise c.fail("evaluate", f"returned {len(predictions)} predictions for {len(exs)} examples")
    c.ok("evaluate")
    return metrics


def check_positional_score(c: Checker, task: TaskPlugin, predictions: list[Any], exs: list[Any],
                           scored: dict[str, float]) -> None:
    """``score`` reads its two lists by position: the same pairs reversed, or every pair twice, score the same
    primary metric. The bootstrap tolerance test rescores resamples drawn with replacement (an example more than
    once, in any order), so a score that looks examples up by id or by their place in the split breaks it."""
    name = task.metric.name
    for how, preds, golds in (("reversed", predictions[::-1], exs[::-1]),
                              ("every pair twice", predictions * 2, exs * 2)):
        value = check_metrics(c, task, task.score(list(preds), list(golds)), "score")[name]
        if not math.isclose(value, scored[name], rel_tol=1e-6, abs_tol=1e-9):
            raise c.fail("score", f"scored '{name}' {value!r} on the same (prediction, example) pairs {how}, "
                                  f"{scored[name]!r} in order; expected the same: score must read the two lists by "
                                  "position, pair i with pair i, whatever their order and however often an example "
                                  "occurs (the bootstrap tolerance test rescores resamples)")


def check_stored_specs(c: Checker, task: TaskPlugin) -> None:
    """What manifests (``describe``) and bundles (``export_spec``) store is plain JSON."""
    try:
        json.dumps(task.describe())
    except TypeError as exc:
        raise c.fail("describe", f"not JSON-serialisable ({exc}); expected plain labels and options") from None
    try:
        spec = json.loads(json.dumps(task.export_spec()))
    except TypeError as exc:
        raise c.fail("export_spec", f"not JSON-serialisable ({exc})") from None
    if not isinstance(spec, dict) or "decoder" not in spec:
        raise c.fail("export_spec", f"returned {spec!r}; expected a dict with a 'decoder' key (a registered "
                                    "decoder name, or None for raw outputs)")
    c.ok("export_spec")


def check_save_load(c: Checker, model: Any, tokenizer: Any, task: TaskPlugin, name: str, batch: dict[str, Any],
                    max_length: int) -> None:
    """A saved model reloads with the same task description and identical outputs."""
    import torch

    from compressor.model.io import load_model, save_model

    with torch.no_grad():
        before = model.forward_batch(name, batch).outputs
    with tempfile.TemporaryDirectory(prefix="compressor-check-") as tmp:
        directory = save_model(model, tokenizer, Path(tmp) / "model", max_length)
        loaded, _, _ = load_model(directory)
        if loaded.tasks[name].describe() != task.describe():
            raise c.fail("describe", "a reloaded task describes itself differently; expected describe() to hold "
                                     "everything __init__ needs (labels, options)")
        with torch.no_grad():
            after = loaded.forward_batch(name, batch).outputs
    for key in before:
        if not torch.equal(before[key], after[key]):
            raise c.fail("build_head", f"output '{key}' differs after save/load; expected the head's state_dict "
                                       "to hold all its weights")
    c.ok("save/load")
