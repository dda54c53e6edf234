"""A minimal sentence-classification plugin and a tiny model/run builder for the pruning tests.

Kept apart from the real plugins so the pruning tests only exercise pruning. Data lines: ``<label> <text>``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compressor.errors import DataError
from compressor.tasks import DistillTarget, Encoded, MetricSpec, OnnxOutput, TaskPlugin

PLUGIN = "prune_test_cls"
FIXTURES = Path(__file__).parent / "fixtures" / "prune"


class ClsHead(nn.Module):
    def __init__(self, hidden: int, n: int):
        super().__init__()
        self.out = nn.Linear(hidden, n)

    def forward(self, hidden_states, attention_mask):
        return {"logits": self.out(hidden_states[:, 0])}


class TinyCls(TaskPlugin):
    metric = MetricSpec("accuracy")
    default_labels = ("0", "1")

    def read(self, path, format=None):
        out = []
        for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            label, _, text = line.strip().partition(" ")
            if not text:
                raise DataError(path, "expected '<label> <text>'", line=i)
            out.append({"label": label, "text": text})
        return out

    def fit_labels(self, examples):
        return sorted({e["label"] for e in examples})

    def encode(self, examples, tokenizer, max_length, train):
        feats = []
        for i, e in enumerate(examples):
            enc = tokenizer(e["text"], truncation=True, max_length=max_length)
            feats.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                          "token_type_ids": enc["token_type_ids"], "label": self.labels.index(e["label"]),
                          "example_index": i})
        return Encoded(feats, len(examples))

    def collate(self, features):
        n = max(len(f["input_ids"]) for f in features)

        def pad(key):
            return torch.tensor([f[key] + [0] * (n - len(f[key])) for f in features])

        return {"input_ids": pad("input_ids"), "attention_mask": pad("attention_mask"),
                "token_type_ids": pad("token_type_ids"), "labels": torch.tensor([f["label"] for f in features])}

    def build_head(self, hidden_size):
        return ClsHead(hidden_size, len(self.labels))

    def loss(self, outputs, batch):
        return nn.functional.cross_entropy(outputs["logits"].float(), batch["labels"])

    def distill_targets(self, outputs, batch):
        return {"logits": DistillTarget(outputs["logits"])}

    def decode(self, outputs, batch, features):
        return [self.labels[int(i)] for i in outputs["logits"].argmax(-1)]

    def score(self, predictions, examples):
        return {"accuracy": sum(p == e["label"] for p, e in zip(predictions, examples)) / len(examples)}

    def onnx_outputs(self):
        return [OnnxOutput("logits", {0: "batch"})]


def recipe_dict(stage: dict, tasks=("a", "b")) -> dict:
    return {
        "name": "prune_test", "seed": 0, "data_root": str(FIXTURES), "model": {"max_length": 32},
        "tasks": [{"name": t, "plugin": PLUGIN, "data": {"train": f"{t}.train.txt", "test": f"{t}.test.txt"}}
                  for t in tasks],
        "stages": [stage],
        "report": {"latency": False},
    }


def stage_context(tmp: Path, stage: dict, model_dir: Path | None, teacher_dir: Path | None = None, tasks=("a", "b")):
    """A StageContext for running one stage of ``recipe_dict(stage)`` outside the pipeline."""
    from compressor.data.store import DataStore
    from compressor.recipe import Recipe
    from compressor.report.rows import Reporter
    from compressor.stages import StageContext

    recipe = Recipe.model_validate(recipe_dict(stage, tasks))
    out = tmp / "stage.tmp"
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(recipe=recipe, stage=recipe.stages[0], index=0, run_dir=tmp, out_dir=out,
                        final_dir=tmp / "stage", data=DataStore(recipe.data_options(), FIXTURES), reporter=Reporter("prune_test"),
                        model_dir=model_dir, teacher_dir=teacher_dir)
