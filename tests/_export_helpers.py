"""Shared set-up of the export / quantize / runtime tests: a tiny random BERT with all four built-in task
plugins (NER + relation on CoNLL04-style sentences, sentiment classification, QA with several windows per
context) saved as a model directory, a DataStore over small fixtures, and stage contexts to run the stages.

Built once per test process (``build_run``) and shared by the three test modules.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import FIXTURES, tiny_bert

PIPE = FIXTURES / "pipeline"
RE_FILE = FIXTURES / "re_conll04_tiny.json"
QA_FILE = FIXTURES / "qa_squad.json"
MAX_LENGTH = 48


def recipe_dict(stages: list[dict[str, Any]], tasks: tuple[str, ...] = ("ner", "rel", "sst", "qa"),
                overrides: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """A recipe over the fixtures; ``overrides`` replaces a task's data splits (task -> {split: path})."""
    specs = {
        "ner": {"name": "ner", "plugin": "ner", "data": {"train": str(RE_FILE), "dev": str(RE_FILE), "test": str(RE_FILE)}},
        "rel": {"name": "rel", "plugin": "relation", "options": {"entity_task": "ner"},
                "data": {"train": str(RE_FILE), "dev": str(RE_FILE), "test": str(RE_FILE)}},
        "sst": {"name": "sst", "plugin": "classification", "format": "label_text",
                "data": {"train": "sst.train.txt", "dev": "sst.dev.txt", "test": "sst.test.txt"}},
        "qa": {"name": "qa", "plugin": "qa", "options": {"doc_stride": 16},
               "data": {"train": str(QA_FILE), "dev": str(QA_FILE)}},
    }
    out = []
    for t in tasks:
        spec = {**specs[t], "data": {**specs[t]["data"], **(overrides or {}).get(t, {})}}
        out.append(spec)
    return {"name": "export-test", "seed": 1, "data_root": str(PIPE), "model": {"max_length": MAX_LENGTH},
            "tasks": out, "stages": stages,
            "report": {"latency_runs": 3, "latency_warmup": 1, "latency_seq_len": 32, "threads": 1}}


def save_tiny_model(recipe: Any, data: Any, directory: Path, ln_outlier: float = 0.0, seed: int = 0) -> Path:
    """Save a random 2-layer BERT (hidden 32) with every recipe task's head as a model directory.

    ``ln_outlier`` scales two channels of every LayerNorm: activation outliers of the kind that make
    per-tensor INT8 lose accuracy (for the accuracy-aware fallback tests).
    """
    import torch
    from transformers import AutoTokenizer

    from compressor.model.io import save_model
    from compressor.model.multitask import MultiTaskModel, resolve_encoder_path
    from compressor.tasks import build_task

    tokenizer = AutoTokenizer.from_pretrained(resolve_encoder_path("offline-default"), use_fast=True)
    encoder = tiny_bert(hidden=32, layers=2, heads=4, ffn=64, seed=seed)
    tasks = {n: build_task(p.plugin_name, n, p.labels, p.options.model_dump()) for n, p in data.tasks.items()}
    model = MultiTaskModel(encoder, tasks).eval()
    if ln_outlier:
        with torch.no_grad():
            for m in model.encoder.modules():
                if isinstance(m, torch.nn.LayerNorm):
                    m.weight[:2] = ln_outlier
    return save_model(model, tokenizer, directory, recipe.model.max_length)


def data_store(recipe: Any) -> Any:
    from compressor.data.store import DataStore

    data = DataStore(recipe.data_options(), PIPE)
    data.fit_labels()
    return data


@dataclass
class Run:
    """Stages run in order over one recipe; ``outputs`` by stage name, like the pipeline keeps them."""

    recipe: Any
    data: Any
    model_dir: Path
    root: Path
    reporter: Any
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)

    def context(self, index: int) -> Any:
        from compressor.stages import StageContext

        stage = self.recipe.stages[index]
        out = self.root / f"{index:02d}-{stage.name}"
        out.mkdir(parents=True, exist_ok=True)
        return StageContext(recipe=self.recipe, stage=stage, index=index, run_dir=self.root, out_dir=out,
                            final_dir=out, data=self.data, reporter=self.reporter, model_dir=self.model_dir,
                            outputs=self.outputs)

    def run_stage(self, index: int) -> Any:
        from compressor.stages import STAGE_KINDS
        from compressor.registry import load_target

        stage = self.recipe.stages[index]
        result = load_target(STAGE_KINDS.get(stage.kind).runner, stage.kind)(self.context(index))
        self.outputs[stage.name] = result.outputs
        self.results[stage.name] = result
        return result


def make_run(stages: list[dict[str, Any]], root: Path, tasks: tuple[str, ...] = ("ner", "rel", "sst", "qa"),
             overrides: dict[str, dict[str, str]] | None = None, ln_outlier: float = 0.0,
             model_dir: Path | None = None) -> Run:
    from compressor.recipe import Recipe
    from compressor.report.rows import Reporter

    recipe = Recipe.model_validate(recipe_dict(stages, tasks, overrides))
    data = data_store(recipe)
    root.mkdir(parents=True, exist_ok=True)
    from compressor.rundir import RunDir

    run_dir = RunDir(root)
    if not run_dir.state_path.is_file():  # ctx.latest reads the records a pipeline run keeps in state.json
        run_dir.write_state({"completed": []})
    if model_dir is None:
        model_dir = save_tiny_model(recipe, data, root / "model", ln_outlier=ln_outlier)
    return Run(recipe, data, model_dir, root, Reporter(recipe.name))


@functools.lru_cache(maxsize=1)
def build_run() -> Run:
    """export -> quantize (dynamic) -> bundle over all four tasks, run once per test process."""
    import torch

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="compressor-export-test-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    run = make_run([{"kind": "export"}, {"kind": "quantize", "tolerance": 0.05}, {"kind": "bundle"}], root)
    for i in range(len(run.recipe.stages)):
        run.run_stage(i)
    return run
