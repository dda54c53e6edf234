"""What every part of the contract kit shares: the error, the report, the checker that names the plugin and
the method, the tiny model and the offline tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from compressor.errors import CompressorError
from compressor.tasks import TASKS, TaskPlugin

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


class Checker:
    """Names the plugin in every failure and lists the parts that passed."""

    def __init__(self, name: str):
        self.name = name
        self.checked: list[str] = []

    def fail(self, method: str, message: str) -> ContractError:
        return ContractError(f"plugin '{self.name}': {method}: {message}")

    def ok(self, part: str) -> None:
        if part not in self.checked:
            self.checked.append(part)


def resolve(plugin: type[TaskPlugin] | str) -> tuple[str | None, type[TaskPlugin]]:
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
