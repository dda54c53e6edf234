"""Write a compressor model directory as directories that transformers loads (``compressor export-hf``).

Layout of the export::

    OUT/README.md              model card: tasks, labels, the run's results, how it was compressed, limits
    OUT/config.json ...        the encoder: AutoModel / AutoTokenizer (standard weight names, tokenizer files)
    OUT/compressor.json        what the export holds: each task's folder and class, the parity measured
    OUT/<task>/                a task whose head has a transformers class: a complete directory for
                               AutoModelFor{TokenClassification,SequenceClassification,QuestionAnswering}
                               (encoder + head, id2label/label2id, tokenizer), usable in a ``pipeline``
    OUT/<task>/head.safetensors + head.json
                               a task whose head has none (relation extraction, mean pooling): the head's
                               weights, rebuilt with its plugin and run on OUT's ``last_hidden_state``

The same module gives an edge bundle the files optimum and transformers read beside its graph
(:func:`transformers_files`: ``config.json``, tokenizer config) and its ``tokenizer.json`` that truncates to the
model's ``max_length`` (:func:`truncating_tokenizer`).

Pruned models stay exact: heads removed from a layer are declared in ``config.pruned_heads`` (transformers
removes the same number of heads at load time; the kept ones are stored in order), and FFN layers narrower than
the widest are zero-padded to it (a padded neuron has zero input weights, zero bias and a zero output column,
so it adds exactly nothing). A sequence-classification head reads the first token's state directly, where
BERT's classifier reads the pooler (``tanh(dense(h))``): the pooler is set to ``tanh(s * h)`` with ``s`` a power
of two small enough that tanh is the identity in float32 for every value the final LayerNorm can produce, and
the classifier's weights are divided by ``s`` (both exact in binary). Every written model is checked against
compressor's own forward pass before the directory appears.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from compressor.errors import CompressorError, ModelDirError
from compressor.fsutil import atomic_dir, atomic_write_text
from compressor.model.architecture import LayerArch, encoder_layers

INFO = "compressor.json"
CARD = "README.md"
HEAD_WEIGHTS = "head.safetensors"
HEAD_SPEC = "head.json"
#: largest |difference| to compressor's outputs an export may show (the tests hold it to 1e-5)
TOLERANCE = 1e-4
#: transformers' auto class, and pipeline name, of each head kind
AUTO_CLASSES = {
    "token-classification": "AutoModelForTokenClassification",
    "sequence-classification": "AutoModelForSequenceClassification",
    "question-answering": "AutoModelForQuestionAnswering",
}
_PROBE = ["Anna Schmidt works for Acme Corp in Oslo since 2019 .", "Where does she work ?"]
_CONFIG_DROP = ("_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype", "id2label",
                "label2id", "pruned_heads", "finetuning_task", "problem_type")


class ExportError(CompressorError):
    """The model cannot be written as transformers directories, or the written model disagrees with it."""


# ---- config ---------------------------------------------------------------------------------------------------
def hf_config(manifest: Mapping[str, Any], source: str = "manifest.json") -> Any:
    """The transformers config of a saved model's encoder: per-layer heads as ``pruned_heads``, the FFN width
    as the widest layer's (narrower layers are zero-padded), layer count and vocabulary as saved. ``source``
    names the manifest in errors."""
    from transformers import AutoConfig

    cfg = {k: v for k, v in manifest["encoder"]["config"].items() if k not in _CONFIG_DROP}
    model_type = cfg.pop("model_type", None)
    layers = [LayerArch(**layer) for layer in manifest["architecture"]["layers"]]
    heads = int(cfg.get("num_attention_heads", 0))
    hidden = int(cfg.get("hidden_size", 0))
    if not model_type or heads < 1 or hidden % heads:
        raise ExportError(f"{source}: encoder.config needs model_type and num_attention_heads dividing hidden_size "
                          f"(got {model_type!r}, {heads}, {hidden})")
    head_size = hidden // heads
    pruned = {}
    for i, a in enumerate(layers):
        if a.head_size != head_size or a.heads > heads:
            raise ExportError(f"{source}: architecture.layers[{i}] has {a.heads} heads of size {a.head_size}; transformers can only "
                              f"remove some of {heads} heads of size {head_size}")
        if a.heads < heads:
            pruned[i] = list(range(a.heads, heads))
    cfg.update(num_hidden_layers=len(layers), intermediate_size=max(a.ffn for a in layers),
               vocab_size=int(manifest["architecture"]["vocab_size"]), pruned_heads=pruned)
    try:
        return AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{source}: transformers has no config for model type '{model_type}': {exc}") from exc


def hf_config_dict(manifest: Mapping[str, Any], source: str = "manifest.json") -> dict[str, Any]:
    """:func:`hf_config` as the ``config.json`` a bundle carries (optimum reads the model type from it); for a
    model transformers cannot express (per-layer head sizes), the saved encoder config with its layer count."""
    try:
        return hf_config(manifest, source).to_dict()
    except ExportError:
        cfg = {k: v for k, v in manifest["encoder"]["config"].items() if k not in _CONFIG_DROP}
        return {**cfg, "num_hidden_layers": len(manifest["architecture"]["layers"])}


# ---- files beside an ONNX graph ---------------------------------------------------------------------------------
CONFIG = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS = "special_tokens_map.json"


def truncating_tokenizer(tokenizer_file: Path, max_length: int) -> str:
    """The ``tokenizers`` JSON of ``tokenizer_file`` set to truncate to ``max_length`` tokens (special tokens
    included; for a pair, the longer side first) and to pad a batch to its longest text, not to a fixed length."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for malformed files
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ModelDirError(f"{tokenizer_file}: not a Hugging Face tokenizers file: {first}") from exc
    tok.enable_truncation(int(max_length))
    padding = tok.padding
    if padding is not None and padding.get("length") is not None:  # a fixed length (128 in all-MiniLM) -> longest
        tok.enable_padding(direction=padding["direction"], pad_id=padding["pad_id"], pad_type_id=padding["pad_type_id"],
                           pad_token=padding["pad_token"], pad_to_multiple_of=padding["pad_to_multiple_of"])
    return tok.to_str()


def transformers_files(model_dir: Path, max_length: int) -> dict[str, str]:
    """``config.json``, ``tokenizer_config.json`` (``model_max_length`` = ``max_length``) and, when the model
    directory has one, ``special_tokens_map.json``: file name -> text."""
    from compressor.model.io import read_manifest

    config = hf_config_dict(read_manifest(model_dir), str(model_dir / "manifest.json"))
    out = {CONFIG: json.dumps(config, indent=2, sort_keys=True)}
    path = model_dir / TOKENIZER_CONFIG
    try:
        tok_config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelDirError(f"{path}: unreadable tokenizer config: {exc}") from None
    if not isinstance(tok_config, dict):
        raise ModelDirError(f"{path}: expected a JSON object")
    tok_config["model_max_length"] = int(max_length)
    out[TOKENIZER_CONFIG] = json.dumps(tok_config, indent=2)
    if (model_dir / SPECIAL_TOKENS).is_file():
        out[SPECIAL_TOKENS] = (model_dir / SPECIAL_TOKENS).read_text(encoding="utf-8")
    return out


# ---- weights --------------------------------------------------------------------------------------------------
_PADDABLE = (".intermediate.dense.weight", ".intermediate.dense.bias", ".output.dense.weight")


def copy_encoder(source: Any, target: Any) -> None:
    """Load ``source`` (compressor's encoder) into ``target`` (the transformers base model built from
    :func:`hf_config`): FFN weights zero-padded to the target's width, the pooler (which compressor's heads do
    not use) zeroed."""
    import torch

    src = source.state_dict()
    dst = target.state_dict()
    state = {}
    for key, want in dst.items():
        if key.startswith("pooler."):
            state[key] = torch.zeros_like(want)
            continue
        if key not in src:
            raise ExportError(f"encoder: transformers expects tensor '{key}', which the model does not have")
        have = src[key].detach().to(want.dtype)
        if have.shape != want.shape:
            if not (key.endswith(_PADDABLE) and "attention" not in key and have.dim() == want.dim()
                    and all(h <= w for h, w in zip(have.shape, want.shape))):
                raise ExportError(f"encoder: tensor '{key}' has shape {tuple(have.shape)}, transformers expects "
                                  f"{tuple(want.shape)}")
            padded = torch.zeros_like(want)
            padded[tuple(slice(0, n) for n in have.shape)] = have
            have = padded
        state[key] = have
    extra = sorted(set(src) - set(dst))
    if extra:
        raise ExportError(f"encoder: tensor '{extra[0]}' has no place in the transformers model")
    target.load_state_dict(state, strict=True)


def identity_scale(encoder: Any) -> float:
    """A power of two ``s`` with ``tanh(s * h) == s * h`` in float32 for every output ``h`` of the encoder's final
    LayerNorm (``|h| <= sqrt(hidden) * max|gamma| + max|beta|``)."""
    norm = encoder_layers(encoder)[-1].output.LayerNorm
    bound = math.sqrt(norm.weight.numel()) * float(norm.weight.abs().max()) + float(norm.bias.abs().max())
    # float32 tanh(y) rounds to y while y**2 / 3 is below half an ulp (|y| < ~4e-4); 2**-14 ~ 6e-5 stays clear
    return 2.0 ** math.floor(math.log2(2.0 ** -14 / max(bound, 1e-30)))


def build_head_model(model: Any, task: str, head: Any, config: Any) -> Any | None:
    """The transformers model of ``task``'s head (encoder + head) or ``None`` when its class does not fit."""
    import torch
    import transformers

    cfg = copy.deepcopy(config)
    if head.labels:
        cfg.id2label = dict(enumerate(head.labels))
        cfg.label2id = {label: i for i, label in enumerate(head.labels)}
    hf = getattr(transformers, AUTO_CLASSES[head.kind]).from_config(cfg)
    linear = model.heads[task].get_submodule(head.linear)
    weight, bias = linear.weight.detach().float(), linear.bias.detach().float()
    with torch.no_grad():
        if head.kind == "sequence-classification":
            pooler = getattr(hf.base_model, "pooler", None)
            if pooler is None or not isinstance(getattr(pooler, "activation", None), torch.nn.Tanh) or not \
                    isinstance(getattr(hf, "classifier", None), torch.nn.Linear):
                return None  # not BERT's pooler -> Linear: the head is written in compressor's form
            copy_encoder(model.encoder, hf.base_model)
            s = identity_scale(model.encoder)
            pooler.dense.weight.copy_(torch.eye(pooler.dense.weight.shape[0]) * s)
            pooler.dense.bias.zero_()
            hf.classifier.weight.copy_(weight / s)
            hf.classifier.bias.copy_(bias)
            return hf.eval()
        copy_encoder(model.encoder, hf.base_model)
        target = hf.classifier if head.kind == "token-classification" else hf.qa_outputs
        if tuple(target.weight.shape) != tuple(weight.shape):
            raise ExportError(f"task '{task}': head weight {tuple(weight.shape)} does not fit transformers' "
                              f"{tuple(target.weight.shape)}")
        target.weight.copy_(weight)
        target.bias.copy_(bias)
    return hf.eval()


# ---- parity ---------------------------------------------------------------------------------------------------
def probe_batch(tokenizer: Any, max_length: int) -> dict[str, Any]:
    """Two texts of different lengths (so one row is padded), as a PyTorch batch."""
    return dict(tokenizer(_PROBE, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


def max_diff(model: Any, hf: Any, task: str | None, head: Any, batch: Mapping[str, Any]) -> float:
    """Largest |difference| between compressor's output and the transformers model's on ``batch``: the last
    hidden state for the encoder (``task`` None), the head's logits at real tokens for a task."""
    import torch

    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        hf_out = hf(**batch)
        if task is None:
            ours = model.encoder(**batch).last_hidden_state
            return float((hf_out.last_hidden_state - ours).abs().max())
        ours = model.forward_batch(task, batch).outputs
    if head.kind == "question-answering":
        return max(float((hf_out.start_logits - ours["start_logits"])[mask].abs().max()),
                   float((hf_out.end_logits - ours["end_logits"])[mask].abs().max()))
    diff = (hf_out.logits - ours["logits"]).abs()
    return float(diff[mask].max() if head.kind == "token-classification" else diff.max())


def _check(name: str, diff: float) -> None:
    if not diff <= TOLERANCE:
        raise ExportError(f"{name}: the transformers model differs from compressor's by {diff:.3g} "
                          f"(allowed {TOLERANCE}); nothing was written")


# ---- the export -----------------------------------------------------------------------------------------------
def check_out_dir(out: Path) -> None:
    """``out`` must not exist or be an empty directory (an export never mixes with other files)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise ExportError(f"{out}: directory is not empty; choose a new --out (an export never overwrites files)")


def export_hf(model_dir: Path, out: Path) -> dict[str, Any]:
    """Write ``model_dir`` (a compressor model directory) as transformers directories at ``out``.

    Returns what ``compressor.json`` holds. Raises ``ModelDirError`` for a missing or corrupt model directory and
    ``ExportError`` when ``out`` is not empty or the model cannot be written exactly; on any error nothing
    appears at ``out``.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModel

    from compressor.model.io import load_model

    model_dir, out = Path(model_dir), Path(out)
    check_out_dir(out)
    model, tokenizer, manifest = load_model(model_dir)
    max_length = int(manifest["max_length"])
    tokenizer.model_max_length = max_length  # pipelines truncate to what the model was trained on
    config = hf_config(manifest, str(model_dir / "manifest.json"))
    batch = probe_batch(tokenizer, max_length)
    reserved = {CARD, INFO, "config.json", "model.safetensors"}

    encoder = AutoModel.from_config(copy.deepcopy(config))
    with torch.no_grad():
        copy_encoder(model.encoder, encoder)
    encoder.eval()
    parity = {"encoder": max_diff(model, encoder, None, None, batch)}
    _check("encoder", parity["encoder"])

    tasks: dict[str, dict[str, Any]] = {}
    heads: dict[str, Any] = {}
    for name, plugin in model.tasks.items():
        if name in reserved or name.startswith(".") or os.sep in name or not name.strip():
            raise ExportError(f"task '{name}': its name cannot be a folder of the export")
        head = plugin.hf_head()
        hf = build_head_model(model, name, head, config) if head is not None else None
        entry: dict[str, Any] = {"plugin": plugin.plugin_name or type(plugin).__name__, "folder": name,
                                 "labels": list(plugin.labels)}
        if hf is not None:
            parity[name] = max_diff(model, hf, name, head, batch)
            _check(f"task '{name}'", parity[name])
            entry.update({"class": type(hf).__name__, "auto_class": AUTO_CLASSES[head.kind], "pipeline": head.kind,
                          "id2label": list(head.labels)})
            heads[name] = hf
        else:
            entry.update({"class": None, "auto_class": None, "pipeline": None, "form": "compressor-head",
                          "inputs": plugin.input_names(), "outputs": [o.name for o in plugin.onnx_outputs()],
                          "extra_inputs": [_describe_input(i) for i in plugin.onnx_inputs()]})
        tasks[name] = entry

    info = {
        "format": "compressor-hf-export", "version": 1, "source": _source_name(model_dir),
        "model_type": config.model_type, "max_length": max_length,
        "parameters": {"compressor": model.num_parameters(),
                       "compressor_encoder": sum(p.numel() for p in model.encoder.parameters()),
                       "transformers_encoder": sum(p.numel() for p in encoder.parameters())},
        "architecture": manifest["architecture"], "pruned_heads": {str(k): v for k, v in config.pruned_heads.items()},
        "tasks": tasks, "parity_max_abs_diff": parity,
    }
    from compressor.export.hf_card import model_card

    card = model_card(model_dir, manifest, info)
    with atomic_dir(out) as tmp:
        encoder.save_pretrained(str(tmp), safe_serialization=True)
        _save_tokenizer(tokenizer, tmp, max_length)
        for name, entry in tasks.items():
            folder = tmp / entry["folder"]
            if name in heads:
                heads[name].save_pretrained(str(folder), safe_serialization=True)
                _save_tokenizer(tokenizer, folder, max_length)
                continue
            folder.mkdir()
            head_state = {k: v.detach().contiguous().cpu() for k, v in model.heads[name].state_dict().items()}
            save_file(head_state, str(folder / HEAD_WEIGHTS), metadata={"format": "compressor-head"})
            spec = {"format": "compressor-head", "version": 1, "task": name, "plugin": entry["plugin"],
                    **model.tasks[name].describe(), "hidden_size": int(config.hidden_size),
                    "inputs": entry["inputs"], "extra_inputs": entry["extra_inputs"], "outputs": entry["outputs"],
                    "encoder": ".."}
            atomic_write_text(folder / HEAD_SPEC, json.dumps(spec, indent=2))
        atomic_write_text(tmp / INFO, json.dumps(info, indent=2))
        atomic_write_text(tmp / CARD, card)
    return info


def _source_name(model_dir: Path) -> str:
    """The model directory as ``<run>/stages/NN-stage/model`` inside a run, else its name: never an absolute
    path of the machine that exported it."""
    from compressor.rundir import RunDir

    run = RunDir.enclosing(model_dir)
    if run is None:
        return Path(os.path.abspath(model_dir)).name
    return f"{run.path.name}/{Path(os.path.abspath(model_dir)).relative_to(run.path).as_posix()}"


def _save_tokenizer(tokenizer: Any, directory: Path, max_length: int) -> None:
    """The tokenizer files, ``tokenizer.json`` set to truncate to ``max_length`` and pad to the longest text (as
    saved, it carries whatever padding and truncation the tokenizer's last call set)."""
    tokenizer.save_pretrained(str(directory))
    atomic_write_text(directory / "tokenizer.json", truncating_tokenizer(directory / "tokenizer.json", max_length))


def _describe_input(spec: Any) -> dict[str, Any]:
    """An extra head input as ``head.json`` lists it: name, dtype and shape (symbolic dynamic axes)."""
    dims = [spec.dynamic_axes[i] for i in sorted(spec.dynamic_axes)]
    return {"name": spec.name, "dtype": spec.dtype, "shape": [*dims, *spec.example_shape]}


def check_hub(repo: str) -> None:
    """Before exporting: ``repo`` is a valid Hub repository id and the hub is not switched off
    (``HF_HUB_OFFLINE``); an ``ExportError`` otherwise, so nothing is written for a push that cannot happen."""
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise ExportError(f"--push-to-hub: '{repo}' is not a Hub repository id (expected user/name): "
                          f"{str(exc).splitlines()[0]}") from None
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false"):
        raise ExportError(f"--push-to-hub {repo}: the Hub is offline here (HF_HUB_OFFLINE is set); export without "
                          f"--push-to-hub and upload later with `huggingface-cli upload {repo} DIR`")


def push_to_hub(directory: Path, repo: str, private: bool = False) -> str:
    """Upload an export to the Hugging Face Hub as model repository ``repo`` (created if needed); its URL.

    A thin call of ``huggingface_hub``; offline, unauthenticated or unreachable is an ``ExportError`` saying so.
    """
    import huggingface_hub

    check_hub(repo)
    try:
        api = huggingface_hub.HfApi()
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(directory), repo_id=repo, repo_type="model",
                                   commit_message="Upload model exported by compressor")
    except Exception as exc:  # noqa: BLE001 - the hub client raises HTTP, auth and connection errors of several kinds
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ExportError(f"--push-to-hub {repo}: {first} (the export is at {directory})") from exc
    return str(getattr(commit, "repo_url", f"https://huggingface.co/{repo}"))
