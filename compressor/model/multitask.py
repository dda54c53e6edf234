"""The multi-task model: one shared encoder, one head per task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compressor.model.config import OFFLINE_DEFAULT, resolve_encoder_path  # noqa: F401  (public here too)
from compressor.tasks import TaskPlugin


@dataclass
class ModelOutput:
    outputs: dict[str, torch.Tensor]  # head outputs, keyed by the task's onnx output names
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings + every layer
    attentions: tuple[torch.Tensor, ...] | None = None  # per layer, [batch, heads, seq, seq]


class MultiTaskModel(nn.Module):
    """A Hugging Face encoder plus one head per task.

    Args:
        encoder: a BERT-family ``PreTrainedModel`` (its pooler is dropped: heads pool for themselves).
        tasks: task name -> plugin instance; each plugin builds its head.
    """

    def __init__(self, encoder: nn.Module, tasks: Mapping[str, TaskPlugin]):
        super().__init__()
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None
        self.encoder = encoder
        self.tasks: dict[str, TaskPlugin] = dict(tasks)
        for task in self.tasks.values():
            task.bind(self.tasks)
        hidden = encoder.config.hidden_size
        self.heads = nn.ModuleDict({name: task.build_head(hidden) for name, task in self.tasks.items()})

    @property
    def config(self) -> Any:
        return self.encoder.config

    def forward(
        self,
        task: str,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        **extra: torch.Tensor,
    ) -> ModelOutput:
        enc = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        outputs = self.heads[task](enc.last_hidden_state, attention_mask, **extra)
        return ModelOutput(outputs, enc.hidden_states, enc.attentions)

    def forward_batch(self, task: str, batch: Mapping[str, torch.Tensor], **kwargs: Any) -> ModelOutput:
        """Run ``task`` on a collated batch, taking from it only the inputs the task's graph has."""
        inputs = {k: batch[k] for k in self.tasks[task].input_names() if k in batch}
        return self.forward(task, **inputs, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def load_pretrained(name_or_path: str, trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """Encoder and fast tokenizer from a Hugging Face name or local directory."""
    from transformers import AutoModel, AutoTokenizer

    from compressor.errors import RecipeError

    path = resolve_encoder_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True, trust_remote_code=trust_remote_code)
        if not getattr(tokenizer, "is_fast", False):
            raise RecipeError(f"model.encoder '{name_or_path}': a fast tokenizer (offset mappings) is required")
        encoder = AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if "trust_remote_code" in str(exc):
            raise RecipeError(f"model.encoder '{name_or_path}': needs remote code, which is refused "
                              "(set model.trust_remote_code: true only for code you trust)") from exc
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise RecipeError(f"model.encoder '{name_or_path}': cannot load: {first}") from exc
    return encoder, tokenizer


def build_model(name_or_path: str, tasks: Mapping[str, TaskPlugin], trust_remote_code: bool = False) -> tuple[MultiTaskModel, Any]:
    encoder, tokenizer = load_pretrained(name_or_path, trust_remote_code)
    return MultiTaskModel(encoder, tasks), tokenizer


def keep_tasks(model: MultiTaskModel, names: Sequence[str]) -> None:
    """Drop every task (and head) of ``model`` but ``names``, in place."""
    for name in list(model.tasks):
        if name not in names:
            del model.heads[name]
            del model.tasks[name]
    for plugin in model.tasks.values():
        plugin.bind(model.tasks)
