"""Build a smaller student from a teacher: keep some layers, fewer heads and FFN neurons, or start fresh.

Two ways:

* :func:`student_from_teacher` copies the teacher and keeps chosen encoder layers (their weights copied), and
  optionally fewer attention heads and FFN neurons per layer (the ones with the largest weight magnitude).
* :func:`student_from_config` builds a fresh, randomly initialised BERT with the teacher's tasks and new heads;
  its hidden width may differ (distillation then learns a projection).

Layer indices are 0-based block indices (``encoder.layer[i]``) everywhere in this module.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from compressor.errors import RecipeError
from compressor.model.architecture import encoder_layers, set_attention_heads
from compressor.model.multitask import MultiTaskModel
from compressor.tasks import TaskPlugin, build_task

LayerChoice = Sequence[int] | Literal["every_other"] | int


def select_layers(choice: LayerChoice, num_layers: int) -> list[int]:
    """The 0-based teacher layers a student keeps.

    Args:
        choice: explicit indices; ``"every_other"`` (layers 1, 3, 5, ...: the top layer stays when the count is
            even); or N = keep N evenly spaced layers, always including the top one (layer ``ceil(k*L/N) - 1``).
        num_layers: the teacher's layer count.

    Raises:
        RecipeError: an index that does not exist, a repeated index, or an impossible count.
    """
    if isinstance(choice, str):
        if choice != "every_other":
            raise RecipeError(f"student layers: unknown choice '{choice}'; use 'every_other', a count or a list")
        return list(range(1, num_layers, 2)) or [num_layers - 1]
    if isinstance(choice, int) and not isinstance(choice, bool):
        if not 1 <= choice <= num_layers:
            raise RecipeError(f"student layers: cannot keep {choice} of the teacher's {num_layers} layers")
        return [_ceil_div((k + 1) * num_layers, choice) - 1 for k in range(choice)]
    layers = [int(i) for i in choice]
    if not layers:
        raise RecipeError("student layers: the list is empty")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise RecipeError(
            f"student layers: layer {bad[0]} does not exist; the teacher has {num_layers} layers (0..{num_layers - 1})"
        )
    if len(set(layers)) != len(layers):
        raise RecipeError(f"student layers: {layers} names a layer twice")
    return layers


def student_from_teacher(
    teacher: MultiTaskModel,
    layers: LayerChoice | None = None,
    heads: int | None = None,
    ffn: int | None = None,
) -> MultiTaskModel:
    """A new model made of the teacher's chosen layers, optionally with fewer heads and FFN neurons per layer.

    The teacher is not modified. Embeddings and every task head are copied.

    Args:
        teacher: the trained multi-task teacher.
        layers: which layers to keep (see :func:`select_layers`); ``None`` keeps all.
        heads: attention heads per layer to keep (largest weight magnitude first); ``None`` keeps all.
        ffn: FFN neurons per layer to keep (largest weight magnitude first); ``None`` keeps all.

    Raises:
        RecipeError: a layer that does not exist, or more heads/neurons than a layer has.
    """
    student = copy.deepcopy(teacher)
    blocks = encoder_layers(student.encoder)
    kept = select_layers(layers, len(blocks)) if layers is not None else list(range(len(blocks)))
    new_blocks = nn.ModuleList([blocks[i] for i in kept])
    for i, block in enumerate(new_blocks):
        if hasattr(block.attention.self, "layer_idx"):
            block.attention.self.layer_idx = i  # only used by KV caches; keep it consistent anyway
    student.encoder.encoder.layer = new_blocks
    config = student.encoder.config
    config.num_hidden_layers = len(kept)

    for i, block in zip(kept, new_blocks):
        attn = block.attention.self
        if heads is not None:
            if not 1 <= heads <= attn.num_attention_heads:
                raise RecipeError(
                    f"student heads: cannot keep {heads} heads; teacher layer {i} has {attn.num_attention_heads}"
                )
            if heads < attn.num_attention_heads:
                keep_heads(block, head_importance(block).topk(heads).indices.sort().values)
        if ffn is not None:
            width = block.intermediate.dense.out_features
            if not 1 <= ffn <= width:
                raise RecipeError(f"student ffn: cannot keep {ffn} neurons; teacher layer {i} has {width}")
            if ffn < width:
                keep_neurons(block, neuron_importance(block).topk(ffn).indices.sort().values)
    if ffn is not None:
        config.intermediate_size = ffn
    # num_attention_heads stays: HF derives head_size = hidden / heads from it when the encoder is rebuilt;
    # the per-layer architecture in the manifest is what records the kept heads.
    return student


def head_importance(block: nn.Module) -> torch.Tensor:
    """Per-head L2 norm of the head's Q/K/V rows and attention-output columns."""
    attn = block.attention.self
    h, d = attn.num_attention_heads, attn.attention_head_size
    sq = torch.zeros(h)
    with torch.no_grad():
        for lin in (attn.query, attn.key, attn.value):
            sq += lin.weight.detach().float().cpu().pow(2).view(h, d, -1).sum(dim=(1, 2))
        out = block.attention.output.dense.weight.detach().float().cpu()
        sq += out.pow(2).view(out.shape[0], h, d).sum(dim=(0, 2))
    return sq.sqrt()


def neuron_importance(block: nn.Module) -> torch.Tensor:
    """Per-FFN-neuron L2 norm of its input row and output column."""
    with torch.no_grad():
        w_in = block.intermediate.dense.weight.detach().float().cpu()
        w_out = block.output.dense.weight.detach().float().cpu()
        return (w_in.pow(2).sum(dim=1) + w_out.pow(2).sum(dim=0)).sqrt()


def keep_heads(block: nn.Module, keep: torch.Tensor) -> None:
    """Slice a layer's attention down to the heads in ``keep`` (ascending head indices)."""
    attn = block.attention.self
    d = attn.attention_head_size
    rows = torch.cat([torch.arange(int(h) * d, (int(h) + 1) * d) for h in keep])
    for name in ("query", "key", "value"):
        setattr(attn, name, _slice_linear(getattr(attn, name), rows, dim=0))
    block.attention.output.dense = _slice_linear(block.attention.output.dense, rows, dim=1)
    set_attention_heads(attn, len(keep), d)


def keep_neurons(block: nn.Module, keep: torch.Tensor) -> None:
    """Slice a layer's FFN down to the neurons in ``keep``."""
    block.intermediate.dense = _slice_linear(block.intermediate.dense, keep, dim=0)
    block.output.dense = _slice_linear(block.output.dense, keep, dim=1)


def _slice_linear(lin: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping output rows (dim=0) or input columns (dim=1) ``index`` of ``lin``."""
    index = index.to(lin.weight.device)
    weight = lin.weight.detach().index_select(dim, index).clone()
    has_bias = lin.bias is not None
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if has_bias:
            out.bias.copy_(lin.bias.detach().index_select(0, index) if dim == 0 else lin.bias.detach())
    return out


def student_from_config(
    teacher_or_tasks: MultiTaskModel | Mapping[str, TaskPlugin],
    vocab: Any = None,
    *,
    hidden_size: int,
    num_layers: int,
    heads: int,
    ffn: int | None = None,
    seed: int | None = None,
) -> MultiTaskModel:
    """A fresh, randomly initialised BERT-family student with the same tasks (new heads).

    Args:
        teacher_or_tasks: the teacher (its encoder config is the template: model type, positions, dropout,
            vocabulary) or a mapping task name -> plugin (a plain ``BertConfig`` is the template).
        vocab: a tokenizer or a vocabulary size; default: the teacher's embedding count (required with tasks).
        hidden_size: the student's hidden width; must be a multiple of ``heads``.
        num_layers: number of encoder layers.
        heads: attention heads per layer.
        ffn: FFN width; default ``4 * hidden_size``.
        seed: seed for the random initialisation.

    Raises:
        RecipeError: sizes that do not fit together.
    """
    from transformers import AutoConfig, AutoModel, BertConfig

    if hidden_size < 1 or num_layers < 1 or heads < 1 or (ffn is not None and ffn < 1):
        raise RecipeError("student from_config: hidden_size, num_layers, heads and ffn must be positive")
    if hidden_size % heads:
        raise RecipeError(f"student from_config: hidden_size {hidden_size} is not a multiple of heads {heads}")
    if isinstance(teacher_or_tasks, MultiTaskModel):
        teacher = teacher_or_tasks
        source_tasks = teacher.tasks
        base = teacher.encoder.config.to_dict()
        vocab_size = teacher.encoder.get_input_embeddings().num_embeddings
    else:
        base = BertConfig().to_dict()
        source_tasks = dict(teacher_or_tasks)
        vocab_size = None
    if vocab is not None:
        vocab_size = vocab if isinstance(vocab, int) else len(vocab)
    if vocab_size is None:
        raise RecipeError("student from_config: give a tokenizer or vocab_size when there is no teacher")
    for key in ("_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype"):
        base.pop(key, None)
    model_type = base.pop("model_type", "bert")
    base.update(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=heads,
        intermediate_size=ffn or 4 * hidden_size,
    )
    config = AutoConfig.for_model(model_type, **base)
    if seed is not None:
        torch.manual_seed(seed)
    encoder = AutoModel.from_config(config)
    tasks = {}
    for name, plugin in source_tasks.items():
        spec = plugin.describe()
        tasks[name] = build_task(registered_plugin_name(plugin), name, spec["labels"], spec["options"])
    return MultiTaskModel(encoder, tasks)


def registered_plugin_name(task: TaskPlugin) -> str:
    from compressor.model.io import registered_plugin_name as registered_name  # the name the manifest stores

    return registered_name(task)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def recorded_teacher_layers(manifest: Mapping[str, Any], num_layers: int) -> list[int] | None:
    """The run-teacher layer each of a saved model's ``num_layers`` layers stands for, as the stage that made it
    recorded (``teacher_layers``: distill, prune, prune_vocab; models saved before that key: the distill stage's
    ``distilled_by.teacher_layers``); None when not recorded or not one per layer."""
    recorded = manifest.get("teacher_layers")
    if recorded is None:
        recorded = (manifest.get("distilled_by") or {}).get("teacher_layers")
    return [int(i) for i in recorded] if recorded and len(recorded) == num_layers else None


def teacher_layers_entry(teacher_layers: Sequence[int] | None) -> dict[str, list[int]]:
    """The manifest entry :func:`recorded_teacher_layers` reads (for ``save_model``'s ``extra``); empty when the
    teacher layers are unknown."""
    return {"teacher_layers": [int(i) for i in teacher_layers]} if teacher_layers is not None else {}


def default_layer_map(student_layers: int, teacher_layers: int, kept: Sequence[int] | None = None) -> dict[int, int]:
    """Student layer -> teacher layer: the kept layers when known, else uniform (student top = teacher top)."""
    if kept is not None and len(kept) == student_layers:
        return {i: int(t) for i, t in enumerate(kept)}
    return {i: _ceil_div((i + 1) * teacher_layers, student_layers) - 1 for i in range(student_layers)}


def check_layer_map(layer_map: Mapping[int, int], student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Validate a student -> teacher layer map (0-based); ``RecipeError`` names the first missing layer."""
    out = {}
    for s, t in layer_map.items():
        if not 0 <= int(s) < student_layers:
            raise RecipeError(
                f"layer_map: student layer {s} does not exist; the student has {student_layers} layers "
                f"(0..{student_layers - 1})"
            )
        if not 0 <= int(t) < teacher_layers:
            raise RecipeError(
                f"layer_map: teacher layer {t} (for student layer {s}) does not exist; the teacher has "
                f"{teacher_layers} layers (0..{teacher_layers - 1})"
            )
        out[int(s)] = int(t)
    return out
