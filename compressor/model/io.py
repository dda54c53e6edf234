"""Save and load a multi-task model directory: safetensors weights, tokenizer files, JSON manifest.

Layout::

    model.safetensors   every tensor of the MultiTaskModel (encoder.* and heads.<task>.*)
    manifest.json       format version, encoder config, per-layer architecture, tasks (plugin, labels, options)
    tokenizer.json ...  the fast tokenizer (save_pretrained)

Loading builds the encoder from the stored config (never the hub), reshapes it per layer, rebuilds each head
through the task registry and loads the weights strictly; nothing is unpickled.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from compressor.errors import CompressorError, ModelDirError
from compressor.fsutil import atomic_dir, atomic_write_text, portable
from compressor.inputs import NAME, NAME_RULE
from compressor.model.architecture import LayerArch, apply_architecture, read_architecture
from compressor.model.multitask import MultiTaskModel
from compressor.tasks import TASKS, build_task

FORMAT = "compressor-model"
#: the largest size a manifest may give (vocabulary, hidden size, layers...): a model is built from these before
#: its weights are read, so a size of 1e9 must fail here, not allocate
MAX_SIZE = 2**24
#: the encoder config's sizes checked (when present): positive integers up to ``MAX_SIZE``
_CONFIG_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "type_vocab_size", "embedding_size")
VERSION = 1
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"


def build_manifest(model: MultiTaskModel, max_length: int, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    config = model.encoder.config.to_dict()
    return {
        "format": FORMAT,
        "version": VERSION,
        "encoder": {"config": config, "source": getattr(model.encoder.config, "_name_or_path", "")},
        "architecture": {
            "hidden_size": model.encoder.config.hidden_size,
            "vocab_size": model.encoder.get_input_embeddings().num_embeddings,
            "layers": [a.to_dict() for a in read_architecture(model.encoder)],
        },
        "tasks": [
            {"plugin": registered_plugin_name(task), **task.describe()} for task in model.tasks.values()
        ],
        "max_length": max_length,
        "parameters": model.num_parameters(),
        **(dict(extra) if extra else {}),
    }


def save_model(model: MultiTaskModel, tokenizer: Any, directory: Path, max_length: int,
               extra: Mapping[str, Any] | None = None) -> Path:
    """Write the model directory atomically: a half-written directory never appears at ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    manifest = portable(build_manifest(model, max_length, extra), directory)  # no build-machine paths
    with atomic_dir(directory) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        tokenizer.save_pretrained(str(tmp))
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2))
    return directory


def read_manifest(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ModelDirError(f"{directory}: model directory does not exist")
    if not path.is_file():
        raise ModelDirError(f"{path}: missing manifest (is this a compressor model directory?)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelDirError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
    except UnicodeDecodeError as exc:
        raise ModelDirError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    if not isinstance(manifest, dict):
        raise ModelDirError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise ModelDirError(f"{path}: field 'format' is {manifest.get('format')!r}, expected '{FORMAT}'")
    for key in ("encoder", "architecture", "tasks", "max_length"):
        if key not in manifest:
            raise ModelDirError(f"{path}: missing field '{key}'")
    _check_manifest(path, manifest)
    return manifest


def _check_manifest(path: Path, m: dict[str, Any]) -> None:
    """Field types of a manifest; the error names the field (``tasks[1].options``)."""

    def need(ok: bool, field: str, expected: str, value: Any) -> None:
        if not ok:
            shown = repr(value)
            shown = shown if len(shown) <= 60 else f"{shown[:60]}..."
            raise ModelDirError(f"{path}: field '{field}' must be {expected}, got {type(value).__name__} {shown}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    need(is_int(m["max_length"]) and m["max_length"] > 0, "max_length", "a positive integer", m["max_length"])
    need(isinstance(m["encoder"], dict), "encoder", "an object", m["encoder"])
    need(isinstance(m["encoder"].get("config"), dict), "encoder.config", "an object", m["encoder"].get("config"))
    arch = m["architecture"]
    need(isinstance(arch, dict), "architecture", "an object", arch)
    layers = arch.get("layers")
    need(isinstance(layers, list) and bool(layers), "architecture.layers", "a non-empty list", layers)
    for i, layer in enumerate(layers):
        ok = isinstance(layer, dict) and set(layer) == {"heads", "head_size", "ffn"} and all(
            is_int(v) and v > 0 for v in layer.values())
        need(ok, f"architecture.layers[{i}]", "{heads, head_size, ffn} of positive integers", layer)
    for key in ("hidden_size", "vocab_size"):
        if key in arch:
            need(is_int(arch[key]) and 0 < arch[key] <= MAX_SIZE, f"architecture.{key}",
                 f"a positive integer up to {MAX_SIZE}", arch[key])
    config = m["encoder"]["config"]
    for key in _CONFIG_SIZES:
        if key in config:
            least = 0 if key == "type_vocab_size" else 1
            need(is_int(config[key]) and least <= config[key] <= MAX_SIZE, f"encoder.config.{key}",
                 f"an integer from {least} to {MAX_SIZE}", config[key])
    if "parameters" in m:
        need(is_int(m["parameters"]) and m["parameters"] >= 0, "parameters", "a non-negative integer",
             m["parameters"])
    if "teacher_layers" in m:  # the teacher layer each layer came from (compressor.model.student)
        tl = m["teacher_layers"]
        need(isinstance(tl, list) and len(tl) == len(layers) and all(is_int(v) and v >= 0 for v in tl),
             "teacher_layers", f"a list of {len(layers)} non-negative integers (one per layer)", tl)
    tasks = m["tasks"]
    need(isinstance(tasks, list) and bool(tasks), "tasks", "a non-empty list", tasks)
    names: set[str] = set()
    for i, t in enumerate(tasks):
        need(isinstance(t, dict), f"tasks[{i}]", "an object", t)
        for key in ("name", "plugin", "labels", "options"):
            if key not in t:
                raise ModelDirError(f"{path}: tasks[{i}]: missing field '{key}'")
        need(isinstance(t["name"], str) and re.match(NAME, t["name"]) is not None, f"tasks[{i}].name",
             f"a task name ({NAME_RULE.removeprefix('expected a name: ')})", t["name"])
        if t["name"] in names:
            raise ModelDirError(f"{path}: field 'tasks[{i}].name': task '{t['name']}' is given twice")
        names.add(t["name"])
        need(isinstance(t["plugin"], str) and bool(t["plugin"]), f"tasks[{i}].plugin", "a non-empty string",
             t["plugin"])
        need(isinstance(t["labels"], list) and all(isinstance(x, str) for x in t["labels"]), f"tasks[{i}].labels",
             "a list of strings", t["labels"])
        need(isinstance(t["options"], dict), f"tasks[{i}].options", "an object", t["options"])


def load_model(directory: Path, device: str | torch.device = "cpu") -> tuple[MultiTaskModel, Any, dict[str, Any]]:
    """Rebuild a saved model: (model in eval mode, tokenizer, manifest)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    directory = Path(directory)
    manifest = read_manifest(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise ModelDirError(f"{directory}: missing weights file {WEIGHTS}")

    cfg = dict(manifest["encoder"]["config"])
    model_type = cfg.pop("model_type", None)
    if not isinstance(model_type, str) or not model_type:
        raise ModelDirError(f"{directory / MANIFEST}: encoder.config has no model_type")
    _check_embedding_fits(directory / MANIFEST, cfg, weights)
    try:
        config = AutoConfig.for_model(model_type, **cfg)
        encoder = AutoModel.from_config(config)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelDirError(f"{directory / MANIFEST}: cannot build encoder '{model_type}': {exc}") from exc
    layers = [LayerArch(**layer) for layer in manifest["architecture"]["layers"]]
    try:
        apply_architecture(encoder, layers)
    except (ValueError, RuntimeError, IndexError) as exc:
        raise ModelDirError(f"{directory / MANIFEST}: architecture does not fit encoder.config: {exc}") from exc

    tasks = {}
    for spec in manifest["tasks"]:
        try:
            tasks[spec["name"]] = build_task(spec["plugin"], spec["name"], spec["labels"], spec["options"])
        except CompressorError as exc:
            raise ModelDirError(f"{directory / MANIFEST}: task '{spec.get('name')}': {exc}") from exc
    model = MultiTaskModel(encoder, tasks)

    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ModelDirError(f"{weights}: not a readable safetensors file: {exc}") from exc
    check_state(model, state, weights)
    check_finite(state, weights)
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    tokenizer = load_tokenizer(directory)
    return model, tokenizer, manifest


def _check_embedding_fits(manifest: Path, config: Mapping[str, Any], weights: Path) -> None:
    """The encoder is built from its config before the weights are read: a vocabulary whose embedding alone
    holds more values than the whole weights file is refused before it is allocated."""
    vocab, width = config.get("vocab_size"), config.get("embedding_size") or config.get("hidden_size")
    if not (isinstance(vocab, int) and isinstance(width, int)):
        return
    try:
        with open(weights, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size)) if 0 < size <= 100_000_000 else None
    except (OSError, ValueError):
        return  # the weights' own check names what is wrong with them
    if not isinstance(header, dict):
        return
    held = 0
    for key, entry in header.items():
        if key != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("shape"), list):
            n = 1
            for d in entry["shape"]:
                n *= d if isinstance(d, int) else 1
            held += n
    if vocab * width > held:
        raise ModelDirError(f"{manifest}: field 'encoder.config.vocab_size' {vocab} x {width} embedding values is "
                            f"more than {weights.name} holds in all ({held}); the manifest does not describe these "
                            "weights")


def load_tokenizer(directory: Path) -> Any:
    """The fast tokenizer saved in a model directory; a missing or corrupt one is a ``ModelDirError``."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file() and not (directory / "vocab.txt").is_file():
        raise ModelDirError(f"{directory}: missing tokenizer files (tokenizer.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), use_fast=True)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises bare Exception for a corrupt tokenizer.json
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ModelDirError(f"{directory / 'tokenizer.json'}: unreadable tokenizer: {first}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ModelDirError(f"{directory}: tokenizer.json missing (a fast tokenizer is required)")
    return tokenizer


def nonfinite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold NaN or infinity."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def check_finite(state: Mapping[str, torch.Tensor], source: Path) -> None:
    """Raise ``ModelDirError`` when a floating-point tensor holds NaN or infinity."""
    bad = nonfinite(state)
    if bad:
        raise ModelDirError(f"{source}: {len(bad)} of {len(state)} tensor(s) hold NaN or infinite values, e.g. "
                            f"{bad[0]} (training diverged? try a lower learning rate)")


def check_model_dir(directory: Path) -> dict[str, Any]:
    """Load a saved model fully (manifest, weights against manifest, finite values, tokenizer); its manifest."""
    _model, _tokenizer, manifest = load_model(directory)
    return manifest


def check_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: Path) -> None:
    """Raise ``ModelDirError`` naming the first tensors where weights and manifest disagree."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {tuple(state[k].shape)} vs manifest {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s) e.g. {missing[0]}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s) e.g. {unexpected[0]}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es) e.g. {wrong[0]}")
    if problems:
        raise ModelDirError(f"{source}: weights do not match the manifest: {'; '.join(problems)}")


def weights_size(directory: Path) -> int:
    return (Path(directory) / WEIGHTS).stat().st_size


def registered_plugin_name(task: Any) -> str:
    if getattr(task, "plugin_name", None):
        return task.plugin_name
    for name in TASKS.names():
        if TASKS.get(name) is type(task):
            return name
    raise ModelDirError(f"task '{task.name}': its plugin class {type(task).__name__} is not registered")
