"""The task-plugin contract as a test kit: run it from a plugin's own test suite, or ``compressor tasks check``.

::

    # tests/test_my_plugin.py of a plugin package
    from pathlib import Path
    from compressor.testing import check_plugin, contract_test
    from my_plugin import MyTask

    test_contract = contract_test(MyTask, Path(__file__).parent / "fixture.tsv")   # a pytest test

    def test_contract_with_options():
        check_plugin(MyTask, Path(__file__).parent / "fixture.tsv", options={"dropout": 0.2})

:func:`check_plugin` takes a plugin through every part of the contract on its own small data file with a tiny
random BERT (2 layers, hidden 32; no download) and the project's offline fast tokenizer:
read -> fit_labels -> encode -> collate -> head forward -> loss -> backward -> distill_targets -> decode ->
aggregate -> score -> evaluate -> export_spec and its runtime decoder (on the PyTorch outputs) -> save/load.
The first broken part raises :class:`ContractError`, one line naming the plugin, the method, what was expected
and what came back. Among others it catches: ``collate`` returning something other than a dict of tensors, a
non-bool distillation mask, ``decode`` returning the wrong number of results, an output whose size changes
along an axis its ``onnx_outputs`` does not declare dynamic, labels on sub-tokens other than a word's first in a
token task, and an ``export_spec`` decoder no installed package registers.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.errors import CompressorError
from compressor.tasks import TASKS, DistillTarget, Encoded, TaskPlugin, validate_plugin

IGNORE = -100  # the label of positions a token task does not score (special tokens, non-first sub-tokens)
SAMPLE_QUESTION = "Who works where?"
SAMPLE_PAIR = "Someone works somewhere."


class ContractError(AssertionError, CompressorError):
    """A plugin breaks the contract. The message names the plugin, the method and what was expected."""


@dataclass
class CheckReport:
    """What :func:`check_plugin` ran: the parts checked, data sizes, metrics of the random model."""

    plugin: str
    examples: int
    features: int
    labels: list[str]
    metrics: dict[str, float]
    checked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        notes = f"; note: {'; '.join(self.notes)}" if self.notes else ""
        return (f"plugin '{self.plugin}': contract ok ({len(self.checked)} checks: {', '.join(self.checked)}) on "
                f"{self.examples} examples / {self.features} features, {len(self.labels)} labels{notes}")


class _Checker:
    def __init__(self, name: str):
        self.name = name
        self.checked: list[str] = []

    def fail(self, method: str, message: str) -> ContractError:
        return ContractError(f"plugin '{self.name}': {method}: {message}")

    def ok(self, part: str) -> None:
        if part not in self.checked:
            self.checked.append(part)


def _resolve(plugin: type[TaskPlugin] | str) -> tuple[str | None, type[TaskPlugin]]:
    """(registered name or None, class) of a class or a registered name."""
    if isinstance(plugin, str):
        return plugin, TASKS.get(plugin)
    for name in TASKS.names():
        try:
            if TASKS.get(name) is plugin:
                return name, plugin
        except CompressorError:
            continue  # another plugin's broken entry point is not this plugin's problem
    return None, plugin


def default_tokenizer() -> Any:
    """The offline fast WordPiece tokenizer (``offline-default``), what ``encode`` gets in a real run."""
    from transformers import AutoTokenizer

    from compressor.model.multitask import resolve_encoder_path

    return AutoTokenizer.from_pretrained(resolve_encoder_path("offline-default"), use_fast=True)


def tiny_encoder(vocab_size: int, seed: int = 0) -> Any:
    """A random 2-layer BERT (hidden 32) for contract checks."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=512, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0))


def check_plugin(
    plugin: type[TaskPlugin] | str,
    data: Path | str,
    *,
    name: str | None = None,
    format: str | None = None,
    options: Mapping[str, Any] | None = None,
    labels: list[str] | None = None,
    siblings: Mapping[str, Mapping[str, Any]] | None = None,
    max_length: int = 64,
    batch_size: int = 4,
    tokenizer: Any = None,
    first_subtoken_labels: bool = True,
    save_load: bool = True,
    runtime: bool = True,
    runtime_inputs: Mapping[str, Any] | None = None,
) -> CheckReport:
    """Run a plugin through the whole contract on ``data``; raise :class:`ContractError` at the first break.

    Args:
        plugin: the plugin class (registered or not) or a registered plugin name.
        data: a small split in a format the plugin reads (a few dozen examples).
        name: the task name (default: the registered name, else the class name in lower case).
        format, options, labels: as a recipe gives them (``labels=None``: ``fit_labels`` on ``data``).
        siblings: tasks the plugin needs beside it (``requires()``), ``{task name: {"plugin", "path", "format",
            "options", "labels"}}`` (``path`` defaults to ``data``).
        max_length: the model's ``max_length``.
        tokenizer: a Hugging Face fast tokenizer (default: the offline one).
        first_subtoken_labels: in a token task (features with ``word_ids`` and per-token ``labels``), only a
            word's first sub-token may carry a label; others must be -100.
        save_load: check that a saved model reloads with identical outputs.
        runtime: decode PyTorch outputs with the plugin's runtime decoder (``export_spec``) as a bundle would,
            over two sample sentences (with a sample question and text pair for decoders that want them).
        runtime_inputs: the texts and extra request inputs of that runtime check, e.g. ``{"texts": [...],
            "spans": [...]}`` for a decoder that reads ``spans`` (see ``Bundle.predict``).

    Returns:
        A :class:`CheckReport`.
    """
    import torch

    registered, cls = _resolve(plugin)
    task_name = name or registered or cls.__name__.lower()
    c = _Checker(registered or task_name)
    try:
        validate_plugin(task_name, cls)
    except CompressorError as exc:
        raise ContractError(f"plugin '{c.name}': registration: {exc}") from None
    c.ok("registration")

    temporary = None
    if registered is None:  # save/load rebuilds tasks by registered name: register for the duration of the check
        temporary = f"{task_name}"
        if temporary in TASKS:
            temporary = f"{task_name}-under-test"
        TASKS.register(temporary, cls, source="<compressor.testing>")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _check(c, cls, registered or temporary, task_name, Path(data), format, options, labels, siblings,
                      max_length, batch_size, tokenizer, first_subtoken_labels, save_load, runtime,
                      dict(runtime_inputs or {}))
    finally:
        torch.set_num_threads(threads)
        if temporary is not None:
            TASKS.unregister(temporary)


def _check(c: _Checker, cls: type[TaskPlugin], plugin_name: str, task_name: str, data: Path, format: str | None,
           options: Mapping[str, Any] | None, labels: list[str] | None, siblings: Mapping[str, Mapping[str, Any]] | None,
           max_length: int, batch_size: int, tokenizer: Any, first_subtoken_labels: bool, save_load: bool,
           runtime: bool, runtime_inputs: dict[str, Any]) -> CheckReport:
    import torch

    from compressor.model.multitask import MultiTaskModel
    from compressor.model.forward import torch_forward
    from compressor.tasks import build_task

    if not data.is_file():
        raise c.fail("read", f"fixture {data} does not exist")
    tokenizer = tokenizer if tokenizer is not None else default_tokenizer()
    if not getattr(tokenizer, "is_fast", False):
        raise ContractError(f"plugin '{c.name}': check: encode gets a Hugging Face fast tokenizer; got "
                            f"{type(tokenizer).__name__}")

    # ---- build the task and its siblings, bind, read, fit labels ---------------------------------------------
    try:
        task = build_task(plugin_name, task_name, labels, options)
    except CompressorError as exc:
        raise c.fail("__init__", str(exc)) from None
    tasks: dict[str, TaskPlugin] = {task_name: task}
    specs: dict[str, Mapping[str, Any]] = {task_name: {"path": data, "format": format}}
    for sib_name, sib in (siblings or {}).items():
        sib_plugin = sib.get("plugin", sib_name)
        sib_plugin = sib_plugin if isinstance(sib_plugin, str) else _resolve(sib_plugin)[0] or sib_plugin.__name__
        tasks[sib_name] = build_task(sib_plugin, sib_name, sib.get("labels"), sib.get("options"))
        specs[sib_name] = {"path": Path(sib.get("path", data)), "format": sib.get("format")}
    missing = [r for r in task.requires() if r not in tasks]
    if missing:
        raise c.fail("requires", f"needs task(s) {', '.join(missing)} beside it; pass siblings={{name: {{'plugin': "
                                 "..., 'path': ...}} (CLI: --sibling NAME=PLUGIN)")
    for t in tasks.values():
        t.bind(tasks)
    examples: dict[str, list[Any]] = {}
    for tname, t in tasks.items():
        got = t.read(specs[tname]["path"], specs[tname]["format"])
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
    exs = examples[task_name]

    # ---- encode ---------------------------------------------------------------------------------------------
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
    if first_subtoken_labels:
        _check_first_subtoken_labels(c, encoded)

    # ---- collate --------------------------------------------------------------------------------------------
    feats = encoded.features[:batch_size]
    batch = _collate(c, task, feats)
    n, seq = batch["input_ids"].shape
    for spec_in in task.onnx_inputs():
        if spec_in.name not in batch:
            raise c.fail("collate", f"extra input '{spec_in.name}' (declared by onnx_inputs) is not in the batch")
        t = batch[spec_in.name]
        if t.dim() != 1 + len(spec_in.example_shape) or t.shape[0] != n:
            raise c.fail("onnx_inputs", f"extra input '{spec_in.name}' has shape {tuple(t.shape)}; expected "
                                        f"[batch={n}] + {len(spec_in.example_shape)} more dim(s) (example_shape "
                                        f"{spec_in.example_shape})")
    c.ok("collate")

    # ---- forward: outputs and their dynamic axes -------------------------------------------------------------
    model = MultiTaskModel(tiny_encoder(max(len(tokenizer), tokenizer.vocab_size)), tasks)
    model.train()
    outputs = model.forward_batch(task_name, batch).outputs
    declared = task.onnx_outputs()
    if list(outputs) != [o.name for o in declared]:
        raise c.fail("build_head", f"the head returned outputs {list(outputs)}; expected {[o.name for o in declared]} "
                                   "(onnx_outputs, in that order)")
    other = _other_batch(encoded.features, feats, batch_size)
    other_batch = _collate(c, task, other) if other is not None else None
    with torch.no_grad():
        other_out = model.forward_batch(task_name, other_batch).outputs if other_batch is not None else None
    notes: list[str] = []
    for out in declared:
        _check_axes(c, out, outputs[out.name], n, seq,
                    other_out[out.name] if other_out is not None else None,
                    tuple(other_batch["input_ids"].shape) if other_batch is not None else None)
    if other_batch is None or other_batch["input_ids"].shape[1] == seq:
        notes.append("every feature has the same length: undeclared sequence axes could not be detected")
    c.ok("onnx_outputs")

    # ---- loss and backward ----------------------------------------------------------------------------------
    loss = task.loss(outputs, batch)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise c.fail("loss", f"returned {_describe(loss)}; expected a scalar tensor")
    if not math.isfinite(loss.item()):
        raise c.fail("loss", f"returned {loss.item()}; expected a finite value")
    if not loss.requires_grad:
        raise c.fail("loss", "returned a tensor without grad; expected a loss computed from the outputs")
    loss.backward()
    grads = [p.grad for p in model.heads[task_name].parameters()]
    if not grads or any(g is None for g in grads):
        raise c.fail("loss", "a head parameter got no gradient; expected the loss to reach every head parameter")
    if model.encoder.embeddings.word_embeddings.weight.grad is None:
        raise c.fail("loss", "the encoder got no gradient; expected the loss to train the shared encoder")
    c.ok("loss")

    # ---- distillation targets -------------------------------------------------------------------------------
    targets = task.distill_targets(outputs, batch)
    if not isinstance(targets, dict) or not targets:
        raise c.fail("distill_targets", f"returned {_describe(targets)}; expected a non-empty dict of name -> "
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

    # ---- decode, aggregate, score, evaluate ------------------------------------------------------------------
    model.eval()
    forward = torch_forward(model)
    results: list[Any] = []
    for lo in range(0, len(encoded.features), batch_size):
        chunk = encoded.features[lo : lo + batch_size]
        np_batch = {k: v.numpy() for k, v in task.collate(chunk).items()}
        decoded = task.decode(forward(task_name, np_batch), np_batch, chunk)
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
    metrics = _check_metrics(c, task, task.score(predictions, exs), "score")
    c.ok("score")
    metrics, predictions = task.evaluate(forward, encoded, exs, batch_size)
    metrics = _check_metrics(c, task, metrics, "evaluate")
    if len(predictions) != len(exs):
        raise c.fail("evaluate", f"returned {len(predictions)} predictions for {len(exs)} examples")
    c.ok("evaluate")

    # ---- what manifests and bundles store --------------------------------------------------------------------
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
    if runtime:
        _check_runtime(c, model, tokenizer, max_length, task_name, runtime_inputs)
        c.ok("runtime decoder")

    # ---- save -> load ---------------------------------------------------------------------------------------
    if save_load:
        from compressor.model.io import load_model, save_model

        with torch.no_grad():
            before = model.forward_batch(task_name, batch).outputs
        with tempfile.TemporaryDirectory(prefix="compressor-check-") as tmp:
            directory = save_model(model, tokenizer, Path(tmp) / "model", max_length)
            loaded, _, _ = load_model(directory)
            if loaded.tasks[task_name].describe() != task.describe():
                raise c.fail("describe", "a reloaded task describes itself differently; expected describe() to hold "
                                         "everything __init__ needs (labels, options)")
            with torch.no_grad():
                after = loaded.forward_batch(task_name, batch).outputs
        for key in before:
            if not torch.equal(before[key], after[key]):
                raise c.fail("build_head", f"output '{key}' differs after save/load; expected the head's state_dict "
                                           "to hold all its weights")
        c.ok("save/load")
    return CheckReport(c.name, len(exs), len(encoded.features), list(task.labels), metrics, c.checked, notes)


# ---- parts ----------------------------------------------------------------------------------------------------
def _describe(value: Any) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__}"


def _collate(c: _Checker, task: TaskPlugin, feats: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    batch = task.collate(feats)
    if not isinstance(batch, dict):
        raise c.fail("collate", f"returned {type(batch).__name__}; expected a dict of name -> torch.Tensor "
                                "(input_ids, attention_mask, extra inputs, labels)")
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            raise c.fail("collate", f"batch['{key}'] is {type(value).__name__}; expected a torch.Tensor")
    for key in ("input_ids", "attention_mask"):
        if key not in batch:
            raise c.fail("collate", f"the batch lacks '{key}'; expected input_ids and attention_mask (and "
                                    "token_type_ids where the features have them)")
    n, seq = batch["input_ids"].shape
    if n != len(feats) or tuple(batch["attention_mask"].shape) != (n, seq):
        raise c.fail("collate", f"input_ids {tuple(batch['input_ids'].shape)} / attention_mask "
                                f"{tuple(batch['attention_mask'].shape)} for {len(feats)} features; expected "
                                f"[{len(feats)}, sequence] for both")
    return batch


def _check_first_subtoken_labels(c: _Checker, encoded: Encoded) -> None:
    """Token tasks: labels only at each word's first sub-token (the runtime's word decoders read it there)."""
    applies = False
    for i, f in enumerate(encoded.features):
        word_ids, labels = f.get("word_ids"), f.get("labels")
        if word_ids is None or not isinstance(labels, list) or len(labels) != len(f["input_ids"]):
            continue
        applies = True
        seen: set[int] = set()
        for pos, (w, lab) in enumerate(zip(word_ids, labels)):
            first = w is not None and w not in seen
            if w is not None:
                seen.add(w)
            if not first and lab != IGNORE:
                where = "a special token" if w is None else f"a non-first sub-token of word {w}"
                raise c.fail("encode", f"feature {i} labels position {pos} ({where}) with {lab}; expected {IGNORE} "
                                       "everywhere but each word's first sub-token (decoders read words there)")
    if applies:
        c.ok("first-sub-token labels")


def _other_batch(features: list[dict[str, Any]], first: list[dict[str, Any]], batch_size: int):
    """A second batch of another size and, where the data allows, another padded length."""
    width = max(len(f["input_ids"]) for f in first)
    for f in features:
        if len(f["input_ids"]) != width:
            return [f] if len(first) != 1 else [f, f]
    if len(features) > 1:
        return [features[0]] if len(first) != 1 else features[:2]
    return None


def _check_axes(c: _Checker, out: Any, t: Any, n: int, seq: int, other: Any, other_shape: tuple[int, int] | None):
    axes = dict(out.dynamic_axes)
    if axes and max(axes) >= t.dim():
        raise c.fail("onnx_outputs", f"output '{out.name}' declares dynamic axes {axes} but has rank {t.dim()}")
    for axis, axis_name in axes.items():
        if axis_name == "batch" and t.shape[axis] != n:
            raise c.fail("onnx_outputs", f"output '{out.name}' axis {axis} ('batch') has size {t.shape[axis]}; expected "
                                         f"the batch size {n}")
        if axis_name == "sequence" and t.shape[axis] != seq:
            raise c.fail("onnx_outputs", f"output '{out.name}' axis {axis} ('sequence') has size {t.shape[axis]}; "
                                         f"expected the sequence length {seq}")
    if not out.atol > 0:
        raise c.fail("onnx_outputs", f"output '{out.name}' has atol {out.atol}; expected a positive tolerance")
    if other is None:
        return
    if other.dim() != t.dim():
        raise c.fail("build_head", f"output '{out.name}' has rank {t.dim()} on one batch and {other.dim()} on another")
    for axis in range(t.dim()):
        if t.shape[axis] != other.shape[axis] and axis not in axes:
            what = ("the batch" if (t.shape[axis], other.shape[axis]) == (n, other_shape[0]) else
                    "the sequence" if (t.shape[axis], other.shape[axis]) == (seq, other_shape[1]) else "the input")
            suggestion = {**axes, axis: "batch" if what == "the batch" else "sequence" if what == "the sequence"
                          else f"dim{axis}"}
            raise c.fail("onnx_outputs", f"output '{out.name}' changes size along axis {axis} with {what} "
                                         f"({t.shape[axis]} vs {other.shape[axis]}) but its dynamic_axes {axes} do not "
                                         f"declare it; expected e.g. {suggestion}")


def _check_metrics(c: _Checker, task: TaskPlugin, metrics: Any, method: str) -> dict[str, float]:
    if not isinstance(metrics, Mapping) or task.metric.name not in metrics:
        raise c.fail(method, f"returned {metrics!r}; expected a dict holding the primary metric '{task.metric.name}'")
    for k, v in metrics.items():
        try:
            ok = math.isfinite(float(v))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise c.fail(method, f"metric '{k}' is {v!r}; expected a finite number")
    return {k: float(v) for k, v in metrics.items()}


class _TorchSession:
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


def _check_runtime(c: _Checker, model: Any, tokenizer: Any, max_length: int, task_name: str,
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
    bundle = Bundle(Path("<check>"), spec, tok, _TorchSession(model, spec), decoders)
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


# ---- pytest -----------------------------------------------------------------------------------------------------
def contract_test(plugin: type[TaskPlugin] | str, data: Path | str, **kwargs: Any) -> Callable[[], None]:
    """A pytest test function running :func:`check_plugin`: ``test_contract = contract_test(MyTask, FIXTURE)``."""

    def test_plugin_contract() -> None:
        check_plugin(plugin, data, **kwargs)

    label = plugin if isinstance(plugin, str) else plugin.__name__
    test_plugin_contract.__doc__ = f"{label} passes the compressor task-plugin contract on {data}."
    return test_plugin_contract
