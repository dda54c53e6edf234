"""Checks of single parts of the contract: collate, first-sub-token labels, output axes, metrics."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from compressor.tasks import Encoded, TaskPlugin
from compressor.testing.base import IGNORE, Checker


def describe_value(value: Any) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__}"


def collate_checked(c: Checker, task: TaskPlugin, feats: list[dict[str, Any]]) -> dict[str, Any]:
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


def check_first_subtoken_labels(c: Checker, encoded: Encoded) -> None:
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


def other_batch(features: list[dict[str, Any]], first: list[dict[str, Any]], batch_size: int):
    """A second batch of another size and, where the data allows, another padded length."""
    width = max(len(f["input_ids"]) for f in first)
    for f in features:
        if len(f["input_ids"]) != width:
            return [f] if len(first) != 1 else [f, f]
    if len(features) > 1:
        return [features[0]] if len(first) != 1 else features[:2]
    return None


def check_axes(c: Checker, out: Any, t: Any, n: int, seq: int, other: Any, other_shape: tuple[int, int] | None):
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


def check_metrics(c: Checker, task: TaskPlugin, metrics: Any, method: str) -> dict[str, float]:
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
