"""The bad-input catalogue: every case is answered with exit code 2, one ``error:`` line on stderr naming the file
or field, and nothing left in the output directory.

Families: recipes (YAML, fields, plugins and their options, the stage chain), data files (missing, undecodable,
unparsable lines and records, labels, empty or too small splits), the output directory (a file, below a file,
not empty, locked by a live run, a corrupt state or checkpoint), model directories (manifest, weights,
tokenizer), edge bundles (tasks.json, graph, requests) and encoders (remote code, missing). Most cases run
in-process through Typer's ``CliRunner``; a few run the real console script in a subprocess. A property-based
fuzz of the recipe loader and the data readers checks that only clean errors come out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compressor.cli.main import app
from conftest import FIXTURES, tiny_bert

PIPE = FIXTURES / "pipeline"
runner = CliRunner()


# ---- shared material ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    """A tiny encoder directory, a saved (untrained) two-task model directory and an edge bundle."""
    import torch

    from compressor.model.io import save_model
    from compressor.model.multitask import MultiTaskModel
    from compressor.tasks import build_task

    root = tmp_path_factory.mktemp("bad-input")
    encoder_dir = root / "encoder"
    tiny_bert(hidden=32, layers=2, heads=4, ffn=64).save_pretrained(encoder_dir)
    tokenizer.save_pretrained(encoder_dir)
    tasks = {"ner": build_task("ner", "ner", ["Loc", "Org", "Peop"]),
             "sst": build_task("classification", "sst", ["0", "1"])}
    torch.manual_seed(0)
    model = MultiTaskModel(tiny_bert(hidden=32, layers=2, heads=4, ffn=64), tasks).eval()
    model_dir = save_model(model, tokenizer, root / "model", 32)
    return {"root": root, "encoder": encoder_dir, "model": model_dir}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """An fp32 edge bundle of a tiny sentiment model (export + bundle stages, no training)."""
    from _export_helpers import make_run

    run = make_run([{"kind": "export", "optimize": False, "evaluate": False}, {"kind": "bundle"}],
                   tmp_path_factory.mktemp("bundle-run"), tasks=("sst",))
    run.run_stage(0)
    run.run_stage(1)
    return Path(run.outputs["bundle"]["bundle"])


def recipe(encoder: Path, stages: str | None = None, tasks: str | None = None, top: str = "") -> str:
    tasks = tasks if tasks is not None else """\
  - name: ner
    plugin: ner
    format: conll
    data: {train: ner.train.conll, dev: ner.dev.conll, test: ner.test.conll}
  - name: sst
    plugin: classification
    format: label_text
    data: {train: sst.train.txt, dev: sst.dev.txt, test: sst.test.txt}
"""
    stages = stages if stages is not None else """\
  - kind: train
    name: teacher
    epochs: 1
    batch_size: 8
"""
    return (f"name: bad\nseed: 3\ndata_root: {PIPE}\nmodel: {{encoder: {encoder}, max_length: 32}}\n{top}"
            f"tasks:\n{tasks}stages:\n{stages}report: {{latency: false}}\n")


class Ctx:
    """What a case builds its command from: a scratch directory and the shared material."""

    def __init__(self, tmp: Path, world: dict, request: pytest.FixtureRequest):
        self.tmp = tmp
        self.world = world
        self.request = request
        self.out = tmp / "out"

    @property
    def encoder(self) -> Path:
        return self.world["encoder"]

    @property
    def bundle(self) -> Path:
        return self.request.getfixturevalue("bundle")

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def run(self, text: str | bytes, *extra: str) -> list[str]:
        return ["run", str(self.file("r.yaml", text)), "--out", str(self.out), *extra]

    def validate(self, text: str | bytes) -> list[str]:
        return ["validate", str(self.file("v.yaml", text))]

    def base(self, **kw) -> str:
        return recipe(self.encoder, **kw)

    def with_data(self, old: str, name: str, content: str | bytes, **kw) -> tuple[str, Path]:
        """The base recipe with data file ``old`` replaced by a new file holding ``content``."""
        path = self.file(name, content)
        return self.base(**kw).replace(old, str(path), 1), path

    def model_copy(self) -> Path:
        dst = self.tmp / "model"
        shutil.copytree(self.world["model"], dst)
        return dst

    def manifest(self, edit: Callable[[dict], None]) -> Path:
        model = self.model_copy()
        m = json.loads((model / "manifest.json").read_text())
        edit(m)
        (model / "manifest.json").write_text(json.dumps(m))
        return model

    def evaluate(self, model: Path, task: str = "sst", data: Path = PIPE / "sst.test.txt") -> list[str]:
        return ["evaluate", str(model), "--task", task, "--data", str(data)]

    def bundle_copy(self) -> Path:
        dst = self.tmp / "bundle"
        shutil.copytree(self.bundle, dst)
        return dst

    def tasks_json(self, edit: Callable[[dict], None]) -> Path:
        b = self.bundle_copy()
        spec = json.loads((b / "tasks.json").read_text())
        edit(spec)
        (b / "tasks.json").write_text(json.dumps(spec))
        return b


@dataclass
class Case:
    id: str
    build: Callable[[Ctx], tuple[list[str], str]]  # -> (argv, text the error line must contain)


CASES: list[Case] = []


def case(id: str):
    def deco(fn: Callable[[Ctx], tuple[list[str], str]]) -> Callable:
        CASES.append(Case(id, fn))
        return fn

    return deco


def simple(id: str, build: Callable[[Ctx], tuple[list[str], str]]) -> None:
    CASES.append(Case(id, build))


# ---- recipes: YAML and fields ------------------------------------------------------------------------------
def _recipe_edit(old: str, new: str, expect: str, cmd: str = "run"):
    def build(c: Ctx):
        text = c.base().replace(old, new, 1)
        assert text != c.base() or old == new, f"edit {old!r} did not apply"
        return (c.run(text) if cmd == "run" else c.validate(text)), expect
    return build


_FIELD_CASES = [
    ("unknown-top-key", "seed: 3\n", "seed: 3\nsed: 4\n", "sed: unknown key"),
    ("unknown-stage-key", "    epochs: 1\n", "    epochs: 1\n    epoch: 2\n", "stages[0].epoch: unknown key"),
    ("unknown-stage-kind", "kind: train", "kind: trian", "stages[0]: unknown stage kind"),
    ("negative-epochs", "epochs: 1", "epochs: -1", "stages[0].epochs"),
    ("epochs-not-a-number", "epochs: 1", "epochs: many", "stages[0].epochs"),
    ("zero-batch-size", "batch_size: 8", "batch_size: 0", "stages[0].batch_size"),
    ("zero-lr", "    epochs: 1\n", "    epochs: 1\n    lr: 0\n", "stages[0].lr"),
    ("warmup-ratio-above-1", "    epochs: 1\n", "    epochs: 1\n    warmup_ratio: 1.5\n", "stages[0].warmup_ratio"),
    ("bad-sampling-strategy", "    epochs: 1\n", "    epochs: 1\n    sampling: {strategy: nope}\n",
     "stages[0].sampling.strategy"),
    ("fixed-weighting-without-weights", "    epochs: 1\n", "    epochs: 1\n    loss_weighting: {strategy: fixed}\n",
     "stages[0].loss_weighting"),
    ("weights-without-fixed-weighting", "    epochs: 1\n", "    epochs: 1\n    loss_weighting: {weights: {ner: 2}}\n",
     "stages[0].loss_weighting"),
    ("bad-optimizer", "    epochs: 1\n", "    epochs: 1\n    optimizer: adam\n", "stages[0].optimizer"),
    ("dropout-1", "    epochs: 1\n", "    epochs: 1\n    dropout: 1.0\n", "stages[0].dropout"),
    ("recipe-name-with-space", "name: bad", "name: my run", "name"),
    ("seed-not-int", "seed: 3", "seed: abc", "seed"),
    ("max-length-too-small", "max_length: 32", "max_length: 4", "model.max_length"),
    ("max-length-too-large", "max_length: 32", "max_length: 100000", "model.max_length"),
    ("unknown-model-key", "max_length: 32}", "max_length: 32, encodr: x}", "model.encodr: unknown key"),
    ("task-name-invalid", "  - name: ner", "  - name: 1ner", "tasks[0].name"),
    ("task-without-plugin", "    plugin: ner\n", "", "tasks[0].plugin"),
    ("task-without-data", "    data: {train: ner.train.conll, dev: ner.dev.conll, test: ner.test.conll}\n", "",
     "tasks[0].data"),
    ("unknown-split", "{train: ner.train.conll,", "{training: ner.train.conll,", "tasks[0].data.training: unknown key"),
    ("limit-zero", "    format: label_text\n", "    format: label_text\n    limit: {train: 0}\n", "tasks[1].limit"),
    ("labels-not-a-list", "    format: label_text\n", "    format: label_text\n    labels: 7\n", "tasks[1].labels"),
    ("duplicate-task-name", "  - name: sst", "  - name: ner", "used twice"),
    ("report-latency-runs-zero", "report: {latency: false}", "report: {latency: false, latency_runs: 0}",
     "report.latency_runs"),
    ("plugin-typo", "plugin: ner", "plugin: nre", "tasks[0].plugin: unknown task 'nre'; did you mean 'ner'?"),
    ("plugin-unknown", "plugin: classification", "plugin: sentiment", "tasks[1].plugin"),
    ("plugin-option-unknown", "    format: label_text\n", "    format: label_text\n    options: {bogus: 1}\n",
     "tasks[1].options"),
    ("ner-option-unknown", "    format: conll\n", "    format: conll\n    options: {crf: true}\n", "tasks[0].options"),
    ("options-not-a-mapping", "    format: conll\n", "    format: conll\n    options: [1, 2]\n", "tasks[0].options"),
]
for _id, _old, _new, _expect in _FIELD_CASES:
    simple(f"recipe-{_id}", _recipe_edit(_old, _new, _expect))
for _id, _old, _new, _expect in _FIELD_CASES[::3]:
    simple(f"validate-{_id}", _recipe_edit(_old, _new, _expect, cmd="validate"))


@case("recipe-malformed-yaml")
def _(c):
    return c.run(c.base() + "stages: [\n"), "malformed YAML"


@case("recipe-bad-indentation")
def _(c):
    return c.run(c.base().replace("  - kind: train", "- kind: train\n     x: [")), "malformed YAML"


@case("recipe-python-tag")
def _(c):
    return c.run(c.base().replace("seed: 3", "seed: !!python/object:os.system 3")), "malformed YAML"


@case("recipe-top-level-list")
def _(c):
    return c.run("- a\n- b\n"), "expected a mapping"


@case("recipe-empty-file")
def _(c):
    return c.run(""), "expected a mapping"


@case("recipe-scalar")
def _(c):
    return c.run("just words\n"), "expected a mapping"


@case("recipe-not-utf8")
def _(c):
    return c.run(c.base().encode() + "# caf\u00e9\n".encode("latin-1")), "not valid UTF-8"


@case("recipe-utf16")
def _(c):
    return c.run(c.base().encode("utf-16")), "not valid UTF-8"


@case("recipe-not-found")
def _(c):
    return ["run", str(c.tmp / "nope.yaml"), "--out", str(c.out)], "nope.yaml"


@case("recipe-is-a-directory")
def _(c):
    (c.tmp / "dir.yaml").mkdir()
    return ["run", str(c.tmp / "dir.yaml"), "--out", str(c.out)], "dir.yaml"


@case("validate-recipe-not-found")
def _(c):
    return ["validate", str(c.tmp / "nope.yaml")], "nope.yaml"


@case("recipe-no-tasks")
def _(c):
    return c.run(c.base(tasks="  []\n").replace("tasks:\n  []", "tasks: []")), "tasks"


@case("recipe-no-stages")
def _(c):
    return c.run(c.base(stages="  []\n").replace("stages:\n  []", "stages: []")), "stages"


@case("recipe-duplicate-stage-name")
def _(c):
    return c.run(c.base(stages="  - {kind: train, epochs: 1}\n  - {kind: load, path: x}\n")), "used twice"


@case("recipe-prune-nothing")
def _(c):
    return c.run(c.base(stages="  - {kind: train, epochs: 1}\n  - {kind: prune}\n")), "nothing to prune"


@case("recipe-student-two-origins")
def _(c):
    stages = ("  - {kind: train, epochs: 1}\n  - {kind: distill, student: {from_previous: true, "
              "from_teacher: {layers: 1}}}\n")
    return c.run(c.base(stages=stages)), "stages[1].student"


@case("recipe-student-heads-do-not-divide")
def _(c):
    stages = ("  - {kind: train, epochs: 1}\n  - {kind: distill, student: {from_config: {hidden_size: 30, "
              "num_layers: 1, heads: 4}}}\n")
    return c.run(c.base(stages=stages)), "stages[1].student.from_config"


@case("teacher-cache-below-a-file")
def _(c):
    blocker = c.file("not-a-dir", "x")
    stages = f"  - {{kind: train, epochs: 1}}\n  - {{kind: distill, teacher_cache: {{path: {blocker}/cache}}}}\n"
    return c.run(c.base(stages=stages)), "stages[1].teacher_cache.path"


@case("teacher-cache-of-another-teacher")
def _(c):
    c.file("cache/teacher.json", json.dumps({"teacher": "0" * 64}))
    stages = (f"  - {{kind: load, path: {c.world['model']}}}\n"
              f"  - {{kind: distill, teacher_cache: {{path: {c.tmp / 'cache'}}}}}\n")
    return c.run(c.base(stages=stages)), "stages[1].teacher_cache.path"


@case("recovery-teacher-cache-of-another-teacher")
def _(c):
    c.file("cache/teacher.json", json.dumps({"teacher": "0" * 64}))
    stages = (f"  - {{kind: load, path: {c.world['model']}}}\n"
              f"  - {{kind: prune, head_ratio: 0.5, recovery_steps: 2, "
              f"recovery: {{teacher_cache: {{path: {c.tmp / 'cache'}}}}}}}\n")
    return c.run(c.base(stages=stages)), "stages[1].recovery.teacher_cache.path: "


@case("teacher-cache-bad-dtype")
def _(c):
    stages = "  - {kind: train, epochs: 1}\n  - {kind: distill, teacher_cache: {dtype: int8}}\n"
    return c.run(c.base(stages=stages)), "stages[1].teacher_cache.dtype"


# ---- per-task teachers of a distill stage ----------------------------------------------------------------------
def _saved_model(c: Ctx, name: str, tasks: dict, hidden: int = 32, tokenizer_extra: list[str] | None = None) -> Path:
    """A tiny (untrained) model directory with ``tasks`` (task -> (plugin, labels)), of width ``hidden``, its
    tokenizer with ``tokenizer_extra`` tokens added."""
    from transformers import AutoTokenizer

    from compressor.model.io import save_model
    from compressor.model.multitask import MultiTaskModel
    from compressor.tasks import build_task

    tok = AutoTokenizer.from_pretrained(str(c.encoder), use_fast=True)
    if tokenizer_extra:
        tok.add_tokens(tokenizer_extra)
    plugins = {t: build_task(p, t, labels) for t, (p, labels) in tasks.items()}
    model = MultiTaskModel(tiny_bert(vocab_size=len(tok), hidden=hidden, layers=2, heads=4, ffn=64), plugins)
    return save_model(model, tok, c.tmp / name, 32)


_BOTH = {"ner": ("ner", ["Loc", "Org", "Peop"]), "sst": ("classification", ["0", "1"])}


def _distill_teachers(teachers: str, before: str = "  - {kind: train, epochs: 1}\n", extra: str = ""):
    def build(c: Ctx):
        stages = before + f"  - {{kind: distill, teachers: {teachers}{extra}}}\n"
        return c.run(c.base(stages=stages)), None
    return build


@case("teachers-name-no-stage")
def _(c):
    return _distill_teachers("{sst: nope}")(c)[0], "stages[1].teachers.sst: 'nope' is no stage of the recipe"


@case("validate-teachers-name-no-stage")
def _(c):
    return (c.validate(c.base(stages="  - {kind: train, epochs: 1}\n  - {kind: distill, teachers: {sst: nope}}\n")),
            "stages[1].teachers.sst: 'nope' is no stage of the recipe")


@case("validate-teachers-twin-of-another-task")
def _(c):
    stages = "  - {kind: train, epochs: 1, baselines: true}\n  - {kind: distill, teachers: {ner: 'single:sst'}}\n"
    return c.validate(c.base(stages=stages)), "stages[1].teachers.ner: 'single:sst' is the twin of task 'sst'"


@case("teachers-name-a-later-stage")
def _(c):
    stages = "  - {kind: train, epochs: 1}\n  - {kind: distill, teachers: {sst: ft}}\n  - {kind: finetune, name: ft}\n"
    return c.run(c.base(stages=stages)), "stages[1].teachers.sst: 'ft' is a later stage"


@case("teachers-name-not-a-teacher-kind")
def _(c):
    stages = "  - {kind: train, epochs: 1}\n  - {kind: export}\n  - {kind: distill, teachers: {sst: export}}\n"
    return c.run(c.base(stages=stages)), "stages[2].teachers.sst: 'export' is a stage of kind export"


@case("teachers-twin-without-baselines")
def _(c):
    return _distill_teachers("{sst: 'single:sst'}")(c)[0], "stages[1].teachers.sst: 'single:sst': no earlier train"


@case("teachers-twin-of-another-task")
def _(c):
    argv, _ = _distill_teachers("{sst: 'single:ner'}", before="  - {kind: train, epochs: 1, baselines: true}\n")(c)
    return argv, "stages[1].teachers.sst: 'single:ner' is the twin of task 'ner'"


@case("teachers-finetune-lacks-the-task")
def _(c):
    before = "  - {kind: train, epochs: 1}\n  - {kind: finetune, name: ft, tasks: [ner]}\n"
    return _distill_teachers("{sst: ft}", before=before)(c)[0], "stages[2].teachers.sst: the model of stage 'ft' has no task 'sst'"


@case("teachers-unknown-task")
def _(c):
    return _distill_teachers("{qa: auto}")(c)[0], "stages[1].teachers.qa: the recipe has no task 'qa'"


@case("teachers-auto-without-a-candidate")
def _(c):
    sst_only = _saved_model(c, "sst-only", {"sst": _BOTH["sst"]})
    stages = (f"  - {{kind: load, path: {sst_only}}}\n  - {{kind: add_task, task: ner, steps: 1}}\n"
              "  - {kind: distill, student: {from_previous: true}, teachers: {ner: auto}}\n")
    return c.run(c.base(stages=stages)), "stages[2].teachers.ner: auto: no earlier stage has a model of task 'ner'"


@case("teachers-named-load-lacks-the-task")
def _(c):
    sst_only = _saved_model(c, "sst-only", {"sst": _BOTH["sst"]})
    stages = (f"  - {{kind: load, path: {c.world['model']}}}\n  - {{kind: load, name: small, path: {sst_only}}}\n"
              "  - {kind: distill, teachers: {ner: small}}\n")
    return c.run(c.base(stages=stages)), "stages[2].teachers.ner: the model of stage 'small' has no task 'ner'"


@case("teachers-other-tokenizer")
def _(c):
    other = _saved_model(c, "other-tok", _BOTH, tokenizer_extra=["zzqqxx"])
    stages = (f"  - {{kind: load, path: {c.world['model']}}}\n  - {{kind: load, name: other, path: {other}}}\n"
              "  - {kind: distill, teachers: {sst: other}}\n")
    return c.run(c.base(stages=stages)), "stages[2].teachers.sst: " + str(other) + " has another tokenizer"


@case("teachers-other-width-with-hidden-loss")
def _(c):
    wide = _saved_model(c, "wide", _BOTH, hidden=64)
    stages = (f"  - {{kind: load, path: {c.world['model']}}}\n  - {{kind: load, name: wide, path: {wide}}}\n"
              "  - {kind: distill, teachers: {sst: wide}, weights: {logits: 1, hidden: 1}}\n")
    return c.run(c.base(stages=stages)), "stages[2].teachers.sst: " + str(wide) + " is 64 wide, the run's teacher 32"


@case("teachers-other-width-with-attention-loss")
def _(c):
    wide = _saved_model(c, "wide", _BOTH, hidden=64)
    stages = (f"  - {{kind: load, path: {c.world['model']}}}\n  - {{kind: load, name: wide, path: {wide}}}\n"
              "  - {kind: distill, teachers: {ner: wide}, weights: {logits: 0, attention: 1}}\n")
    return c.run(c.base(stages=stages)), "stages[2].teachers.ner: " + str(wide) + " is 64 wide"


@case("recipe-export-opset-too-old")
def _(c):
    return c.run(c.base(stages="  - {kind: train, epochs: 1}\n  - {kind: export, opset: 9}\n")), "stages[1].opset"


@case("recipe-negative-tolerance")
def _(c):
    stages = "  - {kind: train, epochs: 1}\n  - {kind: export}\n  - {kind: quantize, tolerances: {sst: -1}}\n"
    return c.run(c.base(stages=stages)), "stages[2].tolerances"


@case("recipe-int4-block-size-not-a-power-of-two")
def _(c):
    stages = ("  - {kind: train, epochs: 1}\n  - {kind: export}\n"
              "  - {kind: quantize, embedding: int4_block, embedding_block_size: 48}\n")
    return c.run(c.base(stages=stages)), "stages[2].embedding_block_size"


@case("recipe-matmul4-block-size-not-a-power-of-two")
def _(c):
    stages = ("  - {kind: train, epochs: 1}\n  - {kind: export}\n"
              "  - {kind: quantize, matmul_nbits: [{nodes: ['*/intermediate/*']}, {bits: 8, block_size: 48}]}\n")
    return c.run(c.base(stages=stages)), "stages[2].matmul_nbits[1].block_size"


@case("recipe-posttrain-without-budget")
def _(c):
    stages = "  - {kind: train, epochs: 1}\n  - {kind: prune, method: posttrain, posttrain: {}}\n"
    return c.run(c.base(stages=stages)), "stages[1].posttrain"


@case("recipe-vocab-if-none-within-unknown")
def _(c):
    stages = "  - {kind: train, epochs: 1}\n  - {kind: prune_vocab, if_none_within: prune_anyway}\n"
    return c.run(c.base(stages=stages)), "stages[1].if_none_within"


def _after_load(stage: str, expect: str):
    """A stage after a load stage of the shared model (hidden 32, 4 heads, 2 layers), refused before any work."""
    def build(c: Ctx):
        stages = f"  - {{kind: load, path: {c.world['model']}, evaluate: false}}\n  - {stage}\n"
        return c.run(c.base(stages=stages)), expect
    return build


for _id, _stage, _expect in (
    ("prune-width-heads-do-not-divide", "{kind: prune, hidden_size: 30}",
     "stages[1].hidden_size: 30 is not divisible by the model's 4 attention heads"),
    ("prune-width-not-smaller", "{kind: prune, hidden_size: 64}",
     "stages[1].hidden_size: 64 must be smaller than the model's hidden size 32"),
    ("prune-more-layers-than-the-model", "{kind: prune, drop_num_layers: 2}",
     "stages[1].drop_num_layers: dropping 2 of the model's 2 layers"),
    ("prune-drop-a-layer-the-model-lacks", "{kind: prune, drop_layers: [5]}",
     "stages[1].drop_layers: the model has 2 layers (0-1); no layer 5"),
    ("prune-posttrain-budget-below-any-candidate", "{kind: prune, method: posttrain, posttrain: {flops_ratio: 0.01}}",
     "stages[1].posttrain.flops_ratio: 0.01 of the encoder layers' FLOPs"),
    ("search-width-heads-do-not-divide", "{kind: search, space: {hidden: [null, 30]}}",
     "stages[1].space.hidden: 30 is not divisible by the source model's 4 attention heads"),
):
    CASES.append(Case(_id, _after_load(_stage, _expect)))


# ---- recipes: the stage chain --------------------------------------------------------------------------------
_CHAIN_CASES = [
    ("source-names-no-stage", "  - {kind: train, epochs: 1}\n  - {kind: export}\n  - {kind: quantize, source: nope}\n",
     "stages[2].source: stage 'quantize': source 'nope' is not an earlier stage"),
    ("bundle-source-names-later-stage",
     "  - {kind: train, epochs: 1}\n  - {kind: export}\n  - {kind: bundle, source: q}\n  - {kind: quantize, name: q}\n",
     "stages[2].source: stage 'bundle': source 'q' is not an earlier stage"),
    ("bundle-source-is-a-train-stage", "  - {kind: train, epochs: 1}\n  - {kind: export}\n  - {kind: bundle, source: teacher}\n",
     "source 'teacher' is a train stage"),
    ("quantize-without-export", "  - {kind: train, epochs: 1}\n  - {kind: quantize}\n",
     "stage 'quantize' (quantize) needs an ONNX export"),
    ("bundle-without-graph", "  - {kind: train, epochs: 1}\n  - {kind: bundle}\n", "stage 'bundle' (bundle) needs"),
    ("distill-first", "  - {kind: distill}\n", "stage 'distill' (distill) needs a teacher"),
    ("prune-first", "  - {kind: prune, head_ratio: 0.5}\n", "stage 'prune' (prune) needs a model"),
    ("prune-vocab-first", "  - {kind: prune_vocab}\n", "stage 'prune_vocab' (prune_vocab) needs a model"),
    ("export-first", "  - {kind: export}\n", "stage 'export' (export) needs a model"),
    ("reference-first", "  - {kind: reference}\n", "stage 'reference' (reference) needs a teacher"),
    ("quantize-mode-search-without-search", "  - {kind: train, epochs: 1}\n  - {kind: export}\n"
     "  - {kind: quantize, mode: search}\n", "stages[2].mode: stage 'quantize': mode 'search' takes the INT8 mode"),
    ("quantize-before-export", "  - {kind: train, epochs: 1}\n  - {kind: quantize}\n  - {kind: export}\n",
     "stage 'quantize' (quantize) needs"),
]
for _id, _stages, _expect in _CHAIN_CASES:
    simple(f"chain-{_id}", lambda c, s=_stages, e=_expect: (c.run(c.base(stages=s)), e))
    simple(f"validate-chain-{_id}", lambda c, s=_stages, e=_expect: (c.validate(c.base(stages=s)), e))


# ---- data files --------------------------------------------------------------------------------------------
def _sst(content: str | bytes, expect: str | None = None, split: str = "sst.train.txt", cmd: str = "run"):
    def build(c: Ctx):
        text, path = c.with_data(split, "bad.txt", content)
        return (c.run(text) if cmd == "run" else c.validate(text)), expect or str(path)
    return build


def _ner(content: str | bytes, expect: str | None = None, split: str = "ner.train.conll", cmd: str = "run"):
    def build(c: Ctx):
        text, path = c.with_data(split, "bad.conll", content)
        return (c.run(text) if cmd == "run" else c.validate(text)), expect or str(path)
    return build


_DATA_CASES = {
    "sst-line-without-text": _sst("1 good film\nnolabelhere\n", "bad.txt:2"),
    "sst-label-only": _sst("1\n", "bad.txt:1"),
    "sst-empty-file": _sst("", "is empty"),
    "sst-blank-lines-only": _sst("\n\n  \n", "is empty"),
    "sst-not-utf8": _sst(b"1 caf\xe9 ok\n", "bad.txt:1: not valid UTF-8"),
    "sst-dev-not-utf8": _sst(b"0 fine\n1 \xff\xfe\n", "bad.txt:2", split="sst.dev.txt"),
    "sst-test-line-bad": _sst("1 fine\n0\n", "bad.txt:2", split="sst.test.txt"),
    "sst-one-line-train": _sst("1 a good film\n", "the training split (1 example(s)) has only the labels"),
    "ner-tokens-without-tags": _ner("John B-Peop\nlives\n\n", "bad.conll:2"),
    "ner-bad-tag": _ner("John X-Peop\n\n", "bad.conll:1"),
    "ner-empty-file": _ner("", "is empty"),
    "ner-not-utf8": _ner(b"J\xf6hn B-Peop\n\n", "not valid UTF-8"),
    "ner-dev-bad-line": _ner("Anna B-Peop\nworks\n", "bad.conll:2", split="ner.dev.conll"),
    "ner-test-empty": _ner("\n", "is empty", split="ner.test.conll"),
}
for _id, _build in _DATA_CASES.items():
    simple(f"data-{_id}", _build)
for _id in ("sst-line-without-text", "sst-empty-file", "sst-not-utf8", "ner-tokens-without-tags", "ner-bad-tag"):
    _b = _DATA_CASES[_id]
    simple(f"validate-data-{_id}", (_sst if _id.startswith("sst") else _ner)(
        *{"sst-line-without-text": ("1 good film\nnolabelhere\n", "bad.txt:2"),
          "sst-empty-file": ("", "is empty"), "sst-not-utf8": (b"1 caf\xe9 ok\n", "not valid UTF-8"),
          "ner-tokens-without-tags": ("John B-Peop\nlives\n\n", "bad.conll:2"),
          "ner-bad-tag": ("John X-Peop\n\n", "bad.conll:1")}[_id], cmd="validate"))


@case("data-file-missing")
def _(c):
    return c.run(c.base().replace("sst.train.txt", "nope.txt")), "nope.txt"


@case("validate-data-file-missing")
def _(c):
    return c.validate(c.base().replace("sst.dev.txt", "nope.txt")), "nope.txt"


@case("data-file-is-a-directory")
def _(c):
    (c.tmp / "adir").mkdir()
    return c.run(c.base().replace("sst.train.txt", str(c.tmp / "adir"))), "adir"


@case("data-root-missing")
def _(c):
    return c.run(c.base().replace(f"data_root: {PIPE}", f"data_root: {c.tmp / 'nodata'}")), "nodata"


@case("data-label-outside-schema")
def _(c):
    text = c.base().replace("    format: label_text\n", "    format: label_text\n    labels: ['0']\n")
    return c.run(text), "label '1'"


@case("data-unknown-format")
def _(c):
    return c.run(c.base().replace("format: label_text", "format: xml")), "unknown classification format 'xml'"


def _jsonl_sst(lines: str, expect: str):
    def build(c: Ctx):
        text, _ = c.with_data("sst.train.txt", "bad.jsonl", lines)
        return c.run(text.replace("format: label_text", "format: jsonl")), expect
    return build


simple("data-jsonl-invalid-json", _jsonl_sst('{"text": "ok", "label": "1"}\n{"text": oops}\n', "bad.jsonl:2"))
simple("data-jsonl-not-an-object", _jsonl_sst('["ok", 1]\n', "bad.jsonl:1: expected a JSON object"))
simple("data-jsonl-missing-text", _jsonl_sst('{"label": "1"}\n', "bad.jsonl:1"))
simple("data-jsonl-empty-text", _jsonl_sst('{"text": "  ", "label": "1"}\n', "bad.jsonl:1"))


def _conll04(records: object | str, expect: str, task: str = "ner"):
    def build(c: Ctx):
        body = records if isinstance(records, str) else json.dumps(records)
        path = c.file("bad.json", body)
        tasks = (f"  - {{name: ner, plugin: ner, format: conll04, data: {{train: {path}, dev: {path}}}}}\n"
                 if task == "ner" else
                 f"  - {{name: ner, plugin: ner, format: conll04, data: {{train: {FIXTURES / 're_conll04_tiny.json'}}}}}\n"
                 f"  - {{name: re, plugin: relation, format: conll04, data: {{train: {path}, dev: {path}}}}}\n")
        return c.run(c.base(tasks=tasks)), expect
    return build


_GOOD = {"tokens": ["John", "lives", "in", "Paris"], "entities": [[0, 1, "Peop"], [3, 4, "Loc"]], "relations": []}
simple("data-conll04-not-a-list", _conll04({"tokens": []}, "expected a JSON array"))
simple("data-conll04-invalid-json", _conll04("[{", "bad.json"))
simple("data-conll04-entity-outside", _conll04([{**_GOOD, "entities": [[2, 9, "Loc"]]}], "[record 0]: entities[0]"))
simple("data-conll04-entities-overlap", _conll04([{**_GOOD, "entities": [[0, 2, "Peop"], [1, 3, "Loc"]]}], "overlap"))
simple("data-conll04-empty-tokens", _conll04([{**_GOOD, "tokens": []}], "field 'tokens' is empty"))
simple("data-conll04-tokens-not-strings", _conll04([{**_GOOD, "tokens": [1, 2]}], "field 'tokens'"))
simple("data-conll04-record-not-object", _conll04([_GOOD, 7], "[record 1]"))
simple("data-conll04-relation-not-entity", _conll04(
    [{**_GOOD, "relations": [[0, 1, 2, 3, "Live_In"]]}], "is not an entity of the sentence", task="re"))
simple("data-conll04-relation-malformed", _conll04([{**_GOOD, "relations": [[0, 1, "x"]]}], "relations[0]", task="re"))


def _squad(doc: object | str, expect: str, fmt: str = "squad"):
    def build(c: Ctx):
        path = c.file("bad.json", doc if isinstance(doc, str) else json.dumps(doc))
        tasks = f"  - {{name: qa, plugin: qa, format: {fmt}, data: {{train: {path}, dev: {FIXTURES / 'qa_squad.json'}}}}}\n"
        return c.run(c.base(tasks=tasks)), expect
    return build


_CTX = "John Smith lives in Paris and works in Berlin ."
_QA = {"data": [{"paragraphs": [{"context": _CTX, "qas": [
    {"id": f"q{i}", "question": "Where does John live?", "answers": [{"text": "Paris", "answer_start": 3}]}
    for i in range(3)]}]}]}
simple("data-squad-answers-do-not-match", _squad(_QA, "3 of 3 training questions have an answer whose text is not "
                                                       "at its answer_start"))
simple("data-squad-not-an-object", _squad([1, 2], "expected a SQuAD v1.1 object"))
simple("data-squad-paragraph-without-context", _squad({"data": [{"paragraphs": [{"qas": []}]}]},
                                                      "field 'context' must be a non-empty string"))
simple("data-squad-duplicate-id", _squad({"data": [{"paragraphs": [{"context": _CTX, "qas": [
    {"id": "q", "question": "Where?", "answers": [{"text": "Paris", "answer_start": 20}]},
    {"id": "q", "question": "Where?", "answers": [{"text": "Paris", "answer_start": 20}]}]}]}]},
    "duplicate question id 'q'"))
simple("data-squad-invalid-json", _squad('{"data": [', "bad.json"))


# ---- data through `datasets`: tables, column maps, label names, line separators ------------------------------------
def _hf_file(c: Ctx, name: str, columns: dict, features: dict | None = None, fmt: str = "parquet") -> Path:
    """A table written by ``datasets`` itself (``fmt``: jsonl, csv, parquet, arrow = save_to_disk)."""
    from datasets import Dataset, Features

    datasets_mod = __import__("datasets")
    datasets_mod.disable_progress_bars()
    ds = Dataset.from_dict(columns, features=Features(features) if features else None)
    path = c.tmp / name
    {"jsonl": ds.to_json, "csv": ds.to_csv, "parquet": ds.to_parquet, "arrow": ds.save_to_disk}[fmt](str(path))
    return path


def _conll_cols() -> tuple[dict, dict]:
    from datasets import ClassLabel, Sequence, Value

    return ({"tokens": [["John", "lives", "here"], ["Anna", "works"]], "ner_tags": [[1, 0, 0], [1, 0]]},
            {"tokens": Sequence(Value("string")), "ner_tags": Sequence(ClassLabel(names=["O", "B-Peop", "I-Peop"]))})


def _sst_cols(label=None, names=("negative", "positive")) -> tuple[dict, dict]:
    from datasets import ClassLabel, Value

    feature = ClassLabel(names=list(names)) if names else ClassLabel(num_classes=2)
    return ({"sentence": ["a fine film", "dull", "fun", "long"], "label": label or [1, 0, 1, 0]},
            {"sentence": Value("string"), "label": feature})


def _hf(make: Callable[[Ctx], Path], task: str, expect: str, cmd: str = "run"):
    """A recipe whose one task reads the file ``make`` writes; ``task`` is its YAML with ``{path}``."""
    def build(c: Ctx):
        path = make(c)
        text = c.base(tasks=task.replace("{path}", str(path)))
        return (c.run(text) if cmd == "run" else c.validate(text)), expect
    return build


_NER_TASK = "  - {{name: ner, plugin: ner, columns: {{tags: {col}}}, data: {{train: {{path}}, dev: {{path}}}}}}\n"
_SST_TASK = ("  - {{name: sst, plugin: classification, columns: {{text: sentence}}, {extra}"
             "data: {{train: {{path}}, dev: {{path}}}}}}\n")
simple("data-columns-name-a-column-the-file-lacks", _hf(
    lambda c: _hf_file(c, "bad.parquet", *_conll_cols()), _NER_TASK.format(col="ner_tag"),
    "columns.tags names column 'ner_tag', which the file lacks (it has: tokens, ner_tags)"))
simple("validate-columns-name-a-column-the-file-lacks", _hf(
    lambda c: _hf_file(c, "bad", *_conll_cols(), fmt="arrow"), _NER_TASK.format(col="tag"),
    "columns.tags names column 'tag', which the file lacks", cmd="validate"))
simple("data-columns-missing-in-a-jsonl-record", _hf(
    lambda c: c.file("bad.jsonl", '{"sentence": "fine", "label": "1"}\n{"text": "dull", "label": "0"}\n'),
    _SST_TASK.format(extra=""), "bad.jsonl:2: columns.text names column 'sentence', which this record lacks"))
simple("data-classlabel-without-names", _hf(
    lambda c: _hf_file(c, "bad.parquet", *_sst_cols(names=None)), _SST_TASK.format(extra=""),
    "bad.parquet: column 'label' is a ClassLabel without names"))
simple("data-ner-integer-tags-without-names", _hf(
    lambda c: _hf_file(c, "bad.jsonl", *_conll_cols(), fmt="jsonl"), _NER_TASK.format(col="ner_tags"),
    "bad.jsonl:1: field 'tags' holds integer ids without names"))
simple("data-label-id-outside-the-label-names", _hf(
    lambda c: _hf_file(c, "bad.csv", {"sentence": ["fine", "dull"], "label": [1, 0]}, fmt="csv"),
    _SST_TASK.format(extra="label_names: {label: [negative]}, "),
    "bad.csv [record 0]: field 'label': id 1 is outside its 1 label names"))
simple("data-unlabelled-glue-test-split", _hf(
    lambda c: _hf_file(c, "bad.parquet", *_sst_cols(label=[-1, -1, -1, -1])), _SST_TASK.format(extra=""),
    "id -1 marks an unlabelled example"))
simple("data-datasetdict-directory", _hf(
    lambda c: (lambda d: (__import__("datasets").DatasetDict({"train": d, "validation": d}).save_to_disk(
        str(c.tmp / "dd")), c.tmp / "dd")[1])(__import__("datasets").Dataset.from_dict(_sst_cols()[0])),
    _SST_TASK.format(extra=""), "is a DatasetDict (train, validation); give one split's directory"))
simple("data-directory-is-not-save-to-disk", _hf(
    lambda c: (c.file("plain/x.txt", "1 a\n"), c.tmp / "plain")[1], _SST_TASK.format(extra="format: arrow, "),
    "plain: is a directory but not a datasets save_to_disk directory"))
simple("data-parquet-given-as-label-text", _hf(
    lambda c: (lambda p: (p.rename(c.tmp / "bad.txt"), c.tmp / "bad.txt")[1])(
        _hf_file(c, "x.parquet", *_sst_cols())),
    "  - {name: sst, plugin: classification, format: label_text, data: {train: {path}, dev: {path}}}\n",
    "bad.txt: is a parquet file, but it was given to a text reader; set format: parquet"))
simple("data-parquet-given-as-conll", _hf(
    lambda c: (lambda p: (p.rename(c.tmp / "bad.conll"), c.tmp / "bad.conll")[1])(
        _hf_file(c, "x.parquet", *_conll_cols())),
    "  - {name: ner, plugin: ner, data: {train: {path}, dev: {path}}}\n", "bad.conll: is a parquet file"))
simple("data-columns-on-a-format-that-ignores-them", _hf(
    lambda c: c.file("bad.txt", "1 fine\n0 dull\n"), _SST_TASK.format(extra="format: label_text, "),
    "its plugin reads this file (format label_text) without them"))
simple("data-csv-unreadable", _hf(
    lambda c: c.file("bad.csv", "sentence,label\nfine,1\ndull,0,extra\n"), _SST_TASK.format(extra=""),
    "bad.csv: not a readable CSV file"))
simple("data-csv-list-shortened-by-numpy", _hf(
    lambda c: c.file("bad.csv", "tokens,ner_tags\n\"['a' 'b' ... 'y' 'z']\",[0 0 ... 0 0]\n"),
    _NER_TASK.format(col="ner_tags"), "numpy shortened this list"))
simple("data-line-separator-keeps-line-numbers", _sst("1 a good film\u2028bad for rivals\n0\n", "bad.txt:2:"))
simple("data-form-feed-keeps-line-numbers", _sst("1 good\x0c\x1cfilm\n0 dull\n1\n", "bad.txt:3:"))
simple("recipe-label-names-empty", _recipe_edit("    format: label_text\n",
                                                "    format: label_text\n    label_names: {label: []}\n",
                                                "tasks[1].label_names"))
simple("recipe-label-names-twice", _recipe_edit("    format: label_text\n",
                                                "    format: label_text\n    label_names: {label: [a, a]}\n",
                                                "tasks[1].label_names"))
simple("recipe-columns-empty-column", _recipe_edit("    format: label_text\n",
                                                   "    format: label_text\n    columns: {text: ''}\n",
                                                   "tasks[1].columns"))
simple("recipe-label-before-empty", _recipe_edit("    format: label_text\n",
                                                 "    format: label_text\n    options: {label_before: ''}\n",
                                                 "tasks[1].options"))


# ---- the output directory ----------------------------------------------------------------------------------
@case("out-is-a-file")
def _(c):
    c.out = c.file("out", "I am a file\n")
    return c.run(c.base()), "--out is an existing file"


@case("out-below-a-file")
def _(c):
    blocker = c.file("blocker", "x")
    argv = c.run(c.base())
    c.out = blocker / "sub" / "out"
    argv[argv.index("--out") + 1] = str(c.out)
    return argv, "which is a file"


@case("out-cannot-be-created")
def _(c):
    argv = c.run(c.base())
    c.out = Path("/proc/1/no-such-dir/out")
    argv[argv.index("--out") + 1] = str(c.out)
    return argv, "cannot create the run directory"


@case("out-not-empty")
def _(c):
    c.out.mkdir()
    (c.out / "keep.txt").write_text("mine")
    return c.run(c.base()), "pass --resume"


@case("out-locked-by-a-live-run")
def _(c):
    return _locked(c, resume=False)


@case("resume-locked-by-a-live-run")
def _(c):
    return _locked(c, resume=True)


def _locked(c: Ctx, resume: bool):
    from compressor.fsutil import DirLock

    c.out.mkdir()
    lock = DirLock(c.out).acquire()  # held by this process, through another open file: a live holder
    c.request.addfinalizer(lambda: lock.release(remove=False))
    if resume:
        (c.out / "state.json").write_text(json.dumps({"recipe": "bad", "completed": []}))
    return c.run(c.base(), *(["--resume"] if resume else [])), f"in use by process {os.getpid()}"


@case("resume-corrupt-state")
def _(c):
    c.out.mkdir()
    (c.out / "state.json").write_text("{not json")
    return c.run(c.base(), "--resume"), "state.json"


@case("resume-state-wrong-type")
def _(c):
    c.out.mkdir()
    (c.out / "state.json").write_text(json.dumps({"completed": "all"}))
    return c.run(c.base(), "--resume"), "state.json: field 'completed'"


@case("resume-crafted-optimizer-pt")
def _(c):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    c.out.mkdir()
    (c.out / "state.json").write_text(json.dumps({"recipe": "bad", "completed": []}))
    ck = c.out / "checkpoints" / "teacher" / "epoch"
    ck.mkdir(parents=True)
    (ck / "optimizer.pt").write_bytes(pickle.dumps(Evil()))
    return c.run(c.base(), "--resume"), "optimizer.pt: unreadable checkpoint of stage 'teacher'"


@case("resume-truncated-checkpoint-weights")
def _(c):
    c.out.mkdir()
    (c.out / "state.json").write_text(json.dumps({"recipe": "bad", "completed": []}))
    ck = c.out / "checkpoints" / "teacher" / "epoch"
    ck.mkdir(parents=True)
    (ck / "model.safetensors").write_bytes((c.world["model"] / "model.safetensors").read_bytes()[:500])
    return c.run(c.base(), "--resume"), "model.safetensors: unreadable checkpoint"


# ---- model directories -------------------------------------------------------------------------------------
def _manifest_case(edit: Callable[[dict], None], expect: str):
    return lambda c: (c.evaluate(c.manifest(edit)), expect)


_MANIFEST_CASES = {
    "format-wrong": (lambda m: m.update(format="other"), "field 'format'"),
    "missing-tasks": (lambda m: m.pop("tasks"), "missing field 'tasks'"),
    "missing-encoder": (lambda m: m.pop("encoder"), "missing field 'encoder'"),
    "max-length-string": (lambda m: m.update(max_length="long"), "field 'max_length'"),
    "max-length-negative": (lambda m: m.update(max_length=-3), "field 'max_length'"),
    "tasks-not-a-list": (lambda m: m.update(tasks={"sst": 1}), "field 'tasks'"),
    "tasks-empty": (lambda m: m.update(tasks=[]), "field 'tasks'"),
    "task-not-an-object": (lambda m: m["tasks"].__setitem__(0, "ner"), "field 'tasks[0]'"),
    "task-without-options": (lambda m: m["tasks"][1].pop("options"), "tasks[1]: missing field 'options'"),
    "task-options-a-list": (lambda m: m["tasks"][1].update(options=[]), "field 'tasks[1].options'"),
    "task-labels-a-string": (lambda m: m["tasks"][1].update(labels="01"), "field 'tasks[1].labels'"),
    "task-name-a-number": (lambda m: m["tasks"][1].update(name=5), "field 'tasks[1].name'"),
    "task-unknown-plugin": (lambda m: m["tasks"][1].update(plugin="sentiment"), "unknown task 'sentiment'"),
    "task-bad-options": (lambda m: m["tasks"][1].update(options={"bogus": 1}), "task 'sst'"),
    "layers-not-a-list": (lambda m: m["architecture"].update(layers=3), "field 'architecture.layers'"),
    "layer-bad-keys": (lambda m: m["architecture"]["layers"].__setitem__(0, {"heads": 4}),
                       "field 'architecture.layers[0]'"),
    "layer-ffn-mismatch": (lambda m: m["architecture"]["layers"][0].update(ffn=48), "do not match the manifest"),
    "encoder-config-not-object": (lambda m: m["encoder"].update(config=[1]), "field 'encoder.config'"),
    "encoder-unknown-model-type": (lambda m: m["encoder"]["config"].update(model_type="nonesuch"),
                                   "cannot build encoder 'nonesuch'"),
    "encoder-config-bad-value": (lambda m: m["encoder"]["config"].update(hidden_size="wide"), "manifest.json"),
}
for _id, (_edit, _expect) in _MANIFEST_CASES.items():
    simple(f"model-manifest-{_id}", _manifest_case(_edit, _expect))


@case("model-dir-missing")
def _(c):
    return c.evaluate(c.tmp / "nomodel"), "nomodel: model directory does not exist"


@case("model-manifest-missing")
def _(c):
    m = c.model_copy()
    (m / "manifest.json").unlink()
    return c.evaluate(m), "manifest.json: missing manifest"


@case("model-manifest-invalid-json")
def _(c):
    m = c.model_copy()
    (m / "manifest.json").write_text("{oops")
    return c.evaluate(m), "manifest.json:1: invalid JSON"


@case("model-manifest-not-utf8")
def _(c):
    m = c.model_copy()
    (m / "manifest.json").write_bytes(b'{"format": "\xff"}')
    return c.evaluate(m), "manifest.json: not valid UTF-8"


@case("model-manifest-a-list")
def _(c):
    m = c.model_copy()
    (m / "manifest.json").write_text("[1]")
    return c.evaluate(m), "expected a JSON object"


@case("model-weights-missing")
def _(c):
    m = c.model_copy()
    (m / "model.safetensors").unlink()
    return c.evaluate(m), "missing weights file"


@case("model-weights-truncated")
def _(c):
    m = c.model_copy()
    w = m / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    return c.evaluate(m), "model.safetensors: not a readable safetensors file"


@case("model-weights-pickled")
def _(c):
    import torch

    m = c.model_copy()
    torch.save({"x": torch.zeros(2)}, m / "model.safetensors")
    return c.evaluate(m), "model.safetensors: not a readable safetensors file"


@case("model-weights-nan")
def _(c):
    return c.evaluate(_nan_model(c)), "hold NaN or infinite values"


def _nan_model(c: Ctx) -> Path:
    from safetensors.torch import load_file, save_file

    m = c.model_copy()
    state = load_file(str(m / "model.safetensors"))
    key = next(k for k in state if k.endswith("weight") and state[k].is_floating_point())
    state[key][0] = float("nan")
    save_file(state, str(m / "model.safetensors"))
    return m


@case("model-weights-extra-tensor")
def _(c):
    import torch
    from safetensors.torch import load_file, save_file

    m = c.model_copy()
    state = load_file(str(m / "model.safetensors"))
    state["heads.extra.weight"] = torch.zeros(2)
    save_file(state, str(m / "model.safetensors"))
    return c.evaluate(m), "unexpected 1 tensor(s)"


@case("model-tokenizer-missing")
def _(c):
    m = c.model_copy()
    for f in list(m.iterdir()):
        if f.name not in ("manifest.json", "model.safetensors"):
            f.unlink()
    return c.evaluate(m), "missing tokenizer files"


@case("model-tokenizer-corrupt")
def _(c):
    m = c.model_copy()
    (m / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}')
    return c.evaluate(m), "tokenizer.json: unreadable tokenizer"


@case("model-tokenizer-not-json")
def _(c):
    m = c.model_copy()
    (m / "tokenizer.json").write_text("<<<")
    return c.evaluate(m), "tokenizer.json"


@case("evaluate-unknown-task")
def _(c):
    return c.evaluate(c.world["model"], task="sts"), "did you mean 'sst'"


@case("evaluate-data-missing")
def _(c):
    return c.evaluate(c.world["model"], data=c.tmp / "nodata.txt"), "nodata.txt"


@case("evaluate-data-bad-line")
def _(c):
    return c.evaluate(c.world["model"], data=c.file("bad.txt", "1 ok\nnolabel\n")), "bad.txt:2"


@case("evaluate-data-empty")
def _(c):
    return c.evaluate(c.world["model"], data=c.file("bad.txt", "")), "bad.txt"


# ---- the load stage: a model recorded complete has been loaded and checked, whatever `evaluate` says -------------
def _load_stage(model: Callable[[Ctx], Path], expect: str):
    def build(c: Ctx):
        stages = f"  - {{kind: load, path: {model(c)}, evaluate: false}}\n"
        tasks = """\
  - {name: sst, plugin: classification, format: label_text, labels: ['0', '1'], data: {dev: sst.dev.txt}}
"""
        return c.run(c.base(stages=stages, tasks=tasks)), expect
    return build


def _pickled_model(c: Ctx) -> Path:
    import torch

    m = c.model_copy()
    torch.save({"x": torch.zeros(2)}, m / "model.safetensors")
    return m


def _truncated_model(c: Ctx) -> Path:
    m = c.model_copy()
    w = m / "model.safetensors"
    w.write_bytes(w.read_bytes()[:2000])
    return m


simple("load-stage-nan-weights", _load_stage(_nan_model, "hold NaN or infinite values"))
simple("load-stage-pickled-weights", _load_stage(_pickled_model, "not a readable safetensors file"))
simple("load-stage-truncated-weights", _load_stage(_truncated_model, "not a readable safetensors file"))
simple("load-stage-missing-dir", _load_stage(lambda c: c.tmp / "gone", "gone"))
simple("load-stage-missing-task-head", _load_stage(
    lambda c: c.manifest(lambda m: m["tasks"][1].update(name="other")), "has no head for task(s) ['sst']"))


# ---- encoders ----------------------------------------------------------------------------------------------
@case("encoder-needs-remote-code")
def _(c):
    enc = c.tmp / "remote-encoder"
    shutil.copytree(c.encoder, enc)
    cfg = json.loads((enc / "config.json").read_text())
    cfg.update(model_type="my-custom-bert", auto_map={"AutoConfig": "configuration_x.XConfig",
                                                        "AutoModel": "modeling_x.XModel"})
    (enc / "config.json").write_text(json.dumps(cfg))
    return c.run(c.base().replace(str(c.encoder), str(enc))), "needs remote code, which is refused"


@case("encoder-missing")
def _(c):
    return c.run(c.base().replace(str(c.encoder), str(c.tmp / "no-encoder"))), "model.encoder"


# ---- bundles -----------------------------------------------------------------------------------------------
def _predict(bundle: Callable[[Ctx], Path], *args: str, expect: str):
    return lambda c: (["predict", str(bundle(c)), *args], expect)


simple("bundle-missing-dir", _predict(lambda c: c.tmp / "nobundle", "--task", "sst", "hi", expect="nobundle"))
simple("bundle-tasks-json-missing", _predict(
    lambda c: (lambda b: ((b / "tasks.json").unlink(), b)[1])(c.bundle_copy()), "hi", expect="missing tasks.json"))
simple("bundle-tasks-json-invalid", _predict(
    lambda c: (lambda b: ((b / "tasks.json").write_text("{"), b)[1])(c.bundle_copy()), "hi", expect="tasks.json"))
simple("bundle-max-length-too-large", _predict(
    lambda c: c.tasks_json(lambda s: (s.update(max_length=100000),
                                      [t.update(max_length=100000) for t in s["tasks"].values()])),
    "hi", expect="tasks.json: field 'max_length' 100000"))
simple("bundle-decoder-malformed", _predict(
    lambda c: c.tasks_json(lambda s: s["tasks"]["sst"].update(decoder="clasification")), "hi",
    expect="tasks.json: field 'tasks.sst.decoder' must be a JSON object"))
simple("bundle-unknown-decoder", _predict(
    lambda c: c.tasks_json(lambda s: s["tasks"]["sst"]["decoder"].update(decoder="clasification")), "hi",
    expect="tasks.json"))
simple("bundle-model-not-onnx", _predict(
    lambda c: (lambda b: ((b / "model.onnx").write_bytes(b"not onnx"), b)[1])(c.bundle_copy()), "hi",
    expect="model.onnx: not a loadable ONNX model"))
simple("bundle-tokenizer-corrupt", _predict(
    lambda c: (lambda b: ((b / "tokenizer.json").write_text("{}"), b)[1])(c.bundle_copy()), "hi",
    expect="tokenizer.json"))
simple("predict-unknown-task", _predict(lambda c: c.bundle, "--task", "ner", "hi", expect="does not serve"))
simple("predict-empty-text", _predict(lambda c: c.bundle, "--task", "sst", "", expect="empty text"))
simple("predict-whitespace-text", _predict(lambda c: c.bundle, "--task", "sst", " \t ", expect="empty text"))
simple("predict-control-characters", _predict(lambda c: c.bundle, "--task", "sst", "\x01\x02\x7f", expect="empty text"))

simple("predict-undecodable-bytes", _predict(lambda c: c.bundle, "--task", "sst", "caf\udce9 au lait",
                                             expect="text 0: not valid UTF-8 text"))
simple("serve-missing-bundle", lambda c: (["serve", str(c.tmp / "nobundle")], "nobundle: bundle directory does not exist"))
simple("serve-bad-host", lambda c: (["serve", str(c.bundle), "--host", "no.such.host.invalid", "--port", "0"],
                                    "--host no.such.host.invalid"))
simple("evaluate-bundle-unknown-task", lambda c: (c.evaluate(c.bundle, task="sts"), "did you mean 'sst'"))
simple("evaluate-bundle-bad-data", lambda c: (c.evaluate(c.bundle, data=c.file("bad.txt", "nolabel\n")), "bad.txt:1"))


# ---- usage errors: one line, not Typer's usage box ---------------------------------------------------------
simple("usage-unknown-option", lambda c: (["run", "r.yaml", "--bogus"], "No such option: --bogus"))
simple("usage-missing-argument", lambda c: (["evaluate", "--task", "sst"], "Missing argument 'path'"))
simple("usage-missing-option", lambda c: (["evaluate", str(c.bundle), "--data", "x"], "Missing option '--task'"))
simple("usage-bad-int", lambda c: (["predict", str(c.bundle), "hi", "--threads", "many"], "'--threads'"))
simple("usage-out-of-range", lambda c: (["serve", str(c.bundle), "--port", "70000"], "'--port'"))
simple("usage-unknown-command", lambda c: (["evalute"], "No such command 'evalute'"))
simple("usage-tasks-subcommand", lambda c: (["tasks", "lst"], "No such command 'lst'"))
simple("usage-option-needs-value", lambda c: (["validate", "r.yaml", "--data-root"], "'--data-root' requires an argument"))

# ---- bundles: the three files against each other, metadata types, the word splitter ----------------------------
def _tokenizer_edit(edit: Callable[[dict], None], drop_digest: bool = False):
    def build(c: Ctx):
        b = c.bundle_copy()
        tok = json.loads((b / "tokenizer.json").read_text())
        edit(tok)
        (b / "tokenizer.json").write_text(json.dumps(tok))
        if drop_digest:  # a bundle written before tasks.json recorded its vocabulary
            spec = json.loads((b / "tasks.json").read_text())
            spec["metadata"].pop("vocab_sha256")
            (b / "tasks.json").write_text(json.dumps(spec))
        return ["predict", str(b), "hi"], (
            "cannot embed id" if drop_digest else "tokenizer.json: not the vocabulary the model was exported with")
    return build


def _swap_two_tokens(tok: dict) -> None:
    vocab = tok["model"]["vocab"]
    vocab["cat"], vocab["dog"] = vocab["dog"], vocab["cat"]


def _grow_vocabulary(tok: dict) -> None:
    vocab = tok["model"]["vocab"]
    for i in range(100):
        vocab[f"zzextra{i}"] = len(vocab)


simple("bundle-tokenizer-other-vocabulary", _tokenizer_edit(_swap_two_tokens))
simple("bundle-tokenizer-larger-than-the-embedding-table", _tokenizer_edit(_grow_vocabulary, drop_digest=True))
simple("bundle-labels-more-than-graph-outputs", _predict(
    lambda c: c.tasks_json(lambda s: s["tasks"]["sst"]["decoder"].update(labels=["0", "1", "2"])), "hi",
    expect="task 'sst' names 3 label(s)"))
simple("bundle-task-labels-fewer-than-graph-outputs", _predict(
    lambda c: c.tasks_json(lambda s: (s["tasks"]["sst"]["decoder"].pop("labels", None),
                                      s["tasks"]["sst"].update(labels=["0"]))), "hi",
    expect="has 2 classes"))
simple("bundle-pad-id-string", _predict(
    lambda c: c.tasks_json(lambda s: s["metadata"].update(pad_id="0")), "hi",
    expect="field 'metadata.pad_id' must be a non-negative integer"))
simple("bundle-pad-id-bool", _predict(
    lambda c: c.tasks_json(lambda s: s["metadata"].update(pad_id=True)), "hi", expect="field 'metadata.pad_id'"))
simple("bundle-pad-id-outside-the-table", _predict(
    lambda c: c.tasks_json(lambda s: (s["metadata"].update(pad_id=10**9), s["metadata"].pop("vocab_sha256"))), "hi",
    expect="field 'metadata.pad_id' 1000000000"))
simple("bundle-metadata-not-an-object", _predict(
    lambda c: c.tasks_json(lambda s: s.update(metadata=[1, 2])), "hi", expect="field 'metadata' must be a JSON object"))
simple("bundle-max-length-string", _predict(
    lambda c: c.tasks_json(lambda s: s.update(max_length="long")), "hi",
    expect="field 'max_length' must be a positive integer"))
simple("bundle-inputs-not-a-list", _predict(
    lambda c: c.tasks_json(lambda s: s.update(inputs=7)), "hi", expect="field 'inputs' must be a list"))
simple("bundle-task-labels-not-a-list", _predict(
    lambda c: c.tasks_json(lambda s: s["tasks"]["sst"].update(labels=7)), "hi",
    expect="field 'tasks.sst.labels' must be a list of strings"))
simple("bundle-task-outputs-not-a-mapping", _predict(
    lambda c: c.tasks_json(lambda s: s["tasks"]["sst"].update(outputs=["logits"])), "hi",
    expect="field 'tasks.sst.outputs' must be a non-empty mapping"))
simple("bundle-task-entry-not-an-object", _predict(
    lambda c: c.tasks_json(lambda s: s["tasks"].update(sst=3)), "hi", expect="field 'tasks.sst' must be a JSON object"))
simple("bundle-word-splitter-unknown", _predict(
    lambda c: c.tasks_json(lambda s: s["metadata"].update(word_splitter="nltk")), "hi",
    expect="field 'metadata.word_splitter': unknown word splitter 'nltk'"))
simple("bundle-word-splitter-bad-regex", _predict(
    lambda c: c.tasks_json(lambda s: s["metadata"].update(word_splitter="regex:(")), "hi",
    expect="invalid regular expression"))
simple("bundle-word-splitter-matches-empty", _predict(
    lambda c: c.tasks_json(lambda s: s["metadata"].update(word_splitter="regex:a*")), "hi",
    expect="matches the empty string"))
simple("recipe-bundle-word-splitter-unknown", lambda c: (c.run(c.base(
    stages="  - {kind: train, epochs: 1}\n  - {kind: export}\n  - {kind: bundle, word_splitter: words}\n")),
    "unknown word splitter 'words'"))


# ---- resume against a changed recipe; OS errors in a stage ----------------------------------------------------------
def _completed_run(c: Ctx) -> None:
    """A finished run in ``c.out`` (one load stage, no training) of the base recipe's tasks."""
    from compressor.pipeline import run_recipe

    path = c.file("done.yaml", c.base(stages=f"  - {{kind: load, path: {c.world['model']}, evaluate: false}}\n"))
    run_recipe(path, out=c.out, log=lambda *_: None)


def _resume_changed(old: str, new: str, expect: str):
    def build(c: Ctx):
        _completed_run(c)
        text = c.base(stages=f"  - {{kind: load, path: {c.world['model']}, evaluate: false}}\n").replace(old, new, 1)
        return c.run(text, "--resume"), expect
    return build


simple("resume-changed-seed", _resume_changed("seed: 3", "seed: 4", "stage 'teacher' computed: seed (3 -> 4)"))
simple("resume-changed-limit", _resume_changed(
    "    format: label_text\n", "    format: label_text\n    limit: {dev: 5}\n", "tasks.sst.limit.dev (null -> 5)"))
simple("resume-changed-max-length", _resume_changed("max_length: 32", "max_length: 48", "model.max_length (32 -> 48)"))
simple("resume-changed-stage-field", _resume_changed("evaluate: false", "evaluate: true",
                                                     "stages.teacher.evaluate (false -> true)"))
simple("resume-changed-labels", _resume_changed(
    "    format: label_text\n", "    format: label_text\n    labels: ['0', '1']\n", "tasks.sst.labels"))
simple("run-rerun-from-changed-without-resume", lambda c: (c.run(c.base(), "--rerun-from-changed"),
                                                            "--rerun-from-changed continues a run"))


@case("run-disk-full-while-training")
def _(c):
    import errno

    import safetensors.torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    c.request.getfixturevalue("monkeypatch").setattr(safetensors.torch, "save_file", full)
    return c.run(c.base()), f"stage 'teacher': writing under {c.out}: No space left on device"

# ---- the recipe loader: duplicate keys, booleans for numbers, huge values, aliases, names ---------------------
_LOADER_CASES = [
    ("duplicate-top-key", "seed: 3\n", "seed: 3\nseed: 4\n", ".yaml:3: malformed YAML: duplicate key 'seed' "
     "(first at line 2)"),
    ("duplicate-stage-key", "    epochs: 1\n", "    epochs: 1\n    epochs: 2\n", "duplicate key 'epochs'"),
    ("duplicate-quoted-key", "seed: 3\n", "seed: 3\n'seed': 4\n", "duplicate key 'seed'"),
    ("seed-true", "seed: 3", "seed: true", "r.yaml:2: seed: Input should be a valid integer (got the boolean true"),
    ("epochs-yes", "epochs: 1", "epochs: yes", "stages[0].epochs: Input should be a valid integer (got the boolean"),
    ("lr-true", "    epochs: 1\n", "    epochs: 1\n    lr: true\n", "stages[0].lr: Input should be a valid number"),
    ("max-length-on", "max_length: 32", "max_length: on", "model.max_length: Input should be a valid integer"),
    ("limit-false", "    format: label_text\n", "    format: label_text\n    limit: {train: false}\n",
     "tasks[1].limit.train"),
    ("sampling-passes-bool", "    epochs: 1\n", "    epochs: 1\n    sampling: {passes: {ner: true}}\n",
     "stages[0].sampling.passes.ner"),
    ("plugin-option-bool", "    format: label_text\n", "    format: label_text\n    options: {dropout: true}\n",
     "tasks[1].options: invalid options: dropout: expected a number, got a boolean"),
    ("seed-negative", "seed: 3", "seed: -1", "seed: Input should be greater than or equal to 0"),
    ("seed-above-2-32", "seed: 3", "seed: 4294967296", "seed: Input should be less than or equal to 4294967295"),
    ("stage-name-300-chars", "    name: teacher\n", "    name: " + "s" * 300 + "\n",
     "stages[0].name: expected a name: a letter or '_', then letters, digits, '_' or '-', at most 64 characters"),
    ("task-name-300-chars", "  - name: sst", "  - name: " + "t" * 300, "tasks[1].name: expected a name"),
    ("recipe-name-300-chars", "name: bad", "name: " + "r" * 300, "name: expected a name"),
    ("task-name-a-path", "  - name: sst", "  - name: ../../x", "tasks[1].name: expected a name"),
]
for _id, _old, _new, _expect in _LOADER_CASES:
    simple(f"loader-{_id}", _recipe_edit(_old, _new, _expect))
for _id, _old, _new, _expect in _LOADER_CASES[::2]:
    simple(f"validate-loader-{_id}", _recipe_edit(_old, _new, _expect, cmd="validate"))


@case("loader-huge-value-is-cut")
def _(c):
    return c.run(c.base().replace("name: bad", "name: " + "x" * 5_000_000)), "(5000002 characters)"


@case("loader-huge-list-is-cut")
def _(c):
    return c.run(c.base().replace("seed: 3", "seed: [" + "1, " * 200_000 + "1]")), "(got a list of 200001 items)"


def _alias_bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@case("loader-alias-bomb")
def _(c):
    return c.run(_alias_bomb() + c.base()), "r.yaml:8: malformed YAML: aliases (*name) repeat more than 10000 values"


@case("validate-loader-alias-bomb")
def _(c):
    return c.validate(_alias_bomb() + c.base()), "aliases (*name) repeat more than 10000 values"


@case("loader-recursive-alias")
def _(c):
    return c.run(c.base() + "x: &x [1, *x]\n"), "a recursive alias"


@case("loader-deeply-nested")
def _(c):
    return c.run(c.base() + "x: " + "[" * 5000 + "]" * 5000 + "\n"), "r.yaml"


# ---- pre-flight: what is knowable before training fails before training ------------------------------------------
def _both(id: str, build: Callable[[Ctx], tuple[str, str]]) -> None:
    """A case for ``run`` and one for ``validate``: ``build`` gives the recipe text and the expected text."""
    simple(f"preflight-{id}", lambda c: (lambda t, e: (c.run(t), e))(*build(c)))
    simple(f"validate-preflight-{id}", lambda c: (lambda t, e: (c.validate(t), e))(*build(c)))


_both("max-length-beyond-encoder-positions", lambda c: (
    c.base().replace("max_length: 32", "max_length: 512"),
    ".yaml:4: model.max_length: 512 is more than the 256 positions of encoder"))


def _remote_encoder(c: Ctx) -> Path:
    enc = c.tmp / "remote-encoder"
    shutil.copytree(c.encoder, enc)
    cfg = json.loads((enc / "config.json").read_text())
    cfg.update(model_type="my-custom-bert", auto_map={"AutoConfig": "configuration_x.XConfig",
                                                        "AutoModel": "modeling_x.XModel"})
    (enc / "config.json").write_text(json.dumps(cfg))
    (enc / "modeling_x.py").write_text("raise SystemExit('remote code ran')\n")
    return enc


_both("remote-code-refused", lambda c: (
    c.base().replace(str(c.encoder), str(_remote_encoder(c))), "model type 'my-custom-bert' needs remote code"))
_both("remote-code-trusted-custom-type", lambda c: (
    c.base().replace(str(c.encoder), str(_remote_encoder(c))).replace("max_length: 32}",
                                                                     "max_length: 32, trust_remote_code: true}"),
    "is built only by remote code (modeling_x.XModel"))
_both("encoder-dir-missing", lambda c: (
    c.base().replace(str(c.encoder), str(c.tmp / "no-encoder")), "model.encoder: " + str(c.tmp / "no-encoder")))
_both("encoder-dir-without-config", lambda c: (
    c.base().replace(str(c.encoder), str((c.tmp / "empty-encoder").mkdir() or c.tmp / "empty-encoder")),
    "no config.json"))


def _qa_dev(c: Ctx, doc: dict) -> str:
    dev = c.file("qa-dev.json", json.dumps(doc))
    tasks = (f"  - {{name: qa, plugin: qa, format: squad, data: {{train: {FIXTURES / 'qa_squad.json'}, "
             f"dev: {dev}}}}}\n")
    return c.base(tasks=tasks)


_NO_ANSWER = {"data": [{"paragraphs": [{"context": _CTX, "qas": [
    {"id": "q1", "question": "Where does John live?", "answers": [{"text": "Paris", "answer_start": 20}]},
    {"id": "q2", "question": "Where does John work?", "answers": []}]}]}]}
_both("qa-dev-question-without-answer", lambda c: (_qa_dev(c, _NO_ANSWER), "qa-dev.json [record q2 at data[0].paragraphs[0].qas[1]]: dev question has no answer"))


def _test_split_without_answer(c: Ctx) -> tuple[str, str]:
    test = c.file("qa-test.jsonl", json.dumps({"id": "t1", "question": "Who?", "context": _CTX, "answers": []}) + "\n")
    tasks = (f"  - {{name: qa, plugin: qa, format: squad, data: {{train: {FIXTURES / 'qa_squad.json'}, "
             f"dev: {FIXTURES / 'qa_squad.json'}, test: {{path: {test}, format: jsonl}}}}}}\n")
    return c.base(tasks=tasks), "qa-test.jsonl:1 (id t1): test question has no answer"


_both("qa-test-question-without-answer", _test_split_without_answer)


def _extra_test_without_answer(c: Ctx) -> tuple[str, str]:
    extra = c.file("qa-x.jsonl", json.dumps({"id": "x1", "question": "Who?", "context": _CTX, "answers": []}) + "\n")
    tasks = (f"  - {{name: qa, plugin: qa, format: squad, data: {{train: {FIXTURES / 'qa_squad.json'}, "
             f"dev: {FIXTURES / 'qa_squad.json'}}}, tests: {{offdomain: {{path: {extra}, format: jsonl}}}}}}\n")
    return c.base(tasks=tasks), "qa-x.jsonl:1 (id x1): test:offdomain question has no answer"


_both("qa-extra-test-question-without-answer", _extra_test_without_answer)


def _load_manifest(edit: Callable[[dict], None], expect: str):
    """A recipe whose load stage names a model directory with an edited manifest."""
    def build(c: Ctx) -> tuple[str, str]:
        model = c.manifest(edit)
        stages = f"  - {{kind: load, path: {model}, evaluate: false}}\n"
        tasks = "  - {name: sst, plugin: classification, format: label_text, labels: ['0', '1'], data: {dev: sst.dev.txt}}\n"
        return c.base(stages=stages, tasks=tasks), expect
    return build


_LOAD_MANIFEST_CASES = {
    "task-name-a-path": (lambda m: m["tasks"][0].update(name="../../x"), "field 'tasks[0].name' must be a task name"),
    "task-name-300-chars": (lambda m: m["tasks"][0].update(name="n" * 300), "field 'tasks[0].name'"),
    "task-name-twice": (lambda m: m["tasks"][0].update(name="sst"), "task 'sst' is given twice"),
    "vocab-size-1e9": (lambda m: m["architecture"].update(vocab_size=1e9), "field 'architecture.vocab_size'"),
    "encoder-vocab-size-1e9": (lambda m: m["encoder"]["config"].update(vocab_size=1e9),
                               "field 'encoder.config.vocab_size' must be an integer from 1 to 16777216"),
    "encoder-hidden-size-negative": (lambda m: m["encoder"]["config"].update(hidden_size=-32),
                                     "field 'encoder.config.hidden_size'"),
    "encoder-layers-zero": (lambda m: m["encoder"]["config"].update(num_hidden_layers=0),
                            "field 'encoder.config.num_hidden_layers'"),
    "encoder-positions-bool": (lambda m: m["encoder"]["config"].update(max_position_embeddings=True),
                               "field 'encoder.config.max_position_embeddings'"),
    "parameters-negative": (lambda m: m.update(parameters=-1), "field 'parameters'"),
    "teacher-layers-strings": (lambda m: m.update(teacher_layers=["a"] * len(m["architecture"]["layers"])),
                               "field 'teacher_layers' must be a list of"),
    "teacher-layers-one-short": (lambda m: m.update(teacher_layers=[0] * (len(m["architecture"]["layers"]) - 1)),
                                 "non-negative integers (one per layer)"),
    "max-length-beyond-model-positions": (lambda m: m["encoder"]["config"].update(max_position_embeddings=16),
                                          "model.max_length: 32 is more than the 16 positions of the model of stage"),
}
for _id, (_edit, _expect) in _LOAD_MANIFEST_CASES.items():
    _both(f"load-manifest-{_id}", _load_manifest(_edit, _expect))


@case("validate-preflight-load-dir-missing-is-a-note")
def _(c):
    """validate names a model directory that does not exist yet only as a note; the bad field after it fails."""
    stages = f"  - {{kind: load, path: {c.tmp / 'later'}}}\n"
    text = c.base(stages=stages).replace("seed: 3", "seed: yes")
    return c.validate(text), "seed"


_MANIFEST_CASES_MORE = {
    "task-name-a-path": (lambda m: m["tasks"][1].update(name="../../x"), "field 'tasks[1].name' must be a task name"),
    "encoder-vocab-size-huge-int": (lambda m: m["encoder"]["config"].update(vocab_size=2**24),
                                    "field 'encoder.config.vocab_size' 16777216 x 32 embedding values is more than"),
    "encoder-vocab-size-too-large": (lambda m: m["encoder"]["config"].update(vocab_size=10**9),
                                     "field 'encoder.config.vocab_size'"),
    "architecture-hidden-size-negative": (lambda m: m["architecture"].update(hidden_size=-1),
                                          "field 'architecture.hidden_size'"),
    "huge-value-is-cut": (lambda m: m["tasks"][1].update(name="x" * 1_000_000), "got str 'xxxxxxxxxx"),
}
for _id, (_edit, _expect) in _MANIFEST_CASES_MORE.items():
    simple(f"model-manifest-{_id}", _manifest_case(_edit, _expect))


# ---- tasks check --encoding ------------------------------------------------------------------------------------
simple("tasks-check-unknown-encoding", lambda c: (
    ["tasks", "check", "classification", "--data", str(PIPE / "sst.train.txt"), "--encoding", "klingon"],
    "--encoding: unknown text encoding 'klingon'"))
simple("tasks-check-wrong-encoding", lambda c: (
    ["tasks", "check", "classification", "--data", str(c.file("l1.txt", "1 caf\u00e9 ok\n".encode("latin-1"))),
     "--format", "label_text"], "l1.txt:1: not valid UTF-8"))
simple("tasks-check-utf16-read-as-utf8", lambda c: (
    ["tasks", "check", "classification", "--data", str(c.file("u16.txt", "1 good\n0 bad\n".encode("utf-16"))),
     "--format", "label_text", "--encoding", "utf-8"], "u16.txt:1: not valid UTF-8"))


# ---- export-hf: the output directory and the model directory -------------------------------------------------
def _export_hf(model: Callable[[Ctx], Path], expect: str, prepare: Callable[[Ctx], None] = lambda c: None,
               *extra: str):
    def build(c: Ctx):
        prepare(c)
        return ["export-hf", str(model(c)), "--out", str(c.out), *extra], expect
    return build


def _file_in_out(c: Ctx) -> None:
    c.out.mkdir()
    (c.out / "notes.txt").write_text("mine")


simple("export-hf-out-not-empty", _export_hf(lambda c: c.world["model"], "out: directory is not empty",
                                             _file_in_out))
simple("export-hf-out-is-a-file", _export_hf(lambda c: c.world["model"], "out: exists and is not a directory",
                                             lambda c: c.out.write_text("x")))
simple("export-hf-model-dir-missing", _export_hf(lambda c: c.tmp / "nomodel",
                                                 "nomodel: model directory does not exist"))
simple("export-hf-manifest-invalid-json", _export_hf(
    lambda c: (lambda m: ((m / "manifest.json").write_text("{oops"), m)[1])(c.model_copy()),
    "manifest.json:1: invalid JSON"))
simple("export-hf-weights-corrupt", _export_hf(
    lambda c: (lambda m: ((m / "model.safetensors").write_bytes(b"\x00" * 64), m)[1])(c.model_copy()),
    "model.safetensors: not a readable safetensors file"))
simple("export-hf-head-size-not-the-configs", _export_hf(  # loads in compressor; transformers has one head size
    lambda c: c.manifest(lambda m: m["architecture"]["layers"][0].update(head_size=16, heads=2)),
    "manifest.json: architecture.layers[0] has 2 heads of size 16"))
simple("export-hf-push-offline", _export_hf(lambda c: c.world["model"], "the Hub is offline here",
                                            lambda c: None, "--push-to-hub", "someone/tiny"))
simple("export-hf-push-bad-repo-id", _export_hf(lambda c: c.world["model"], "is not a Hub repository id",
                                                lambda c: None, "--push-to-hub", "not a repo//id"))


# ---- the catalogue as one table-driven test ----------------------------------------------------------------
def _snapshot(path: Path) -> set[str] | None:
    if not path.exists():
        return None
    if not path.is_dir():
        return {"<file>"}
    return {str(p.relative_to(path)) for p in path.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, world, tmp_path, request):
    c = Ctx(tmp_path, world, request)
    argv, expect = case.build(c)
    before = _snapshot(c.out)
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    err = result.stderr
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expect in err, err
    assert _snapshot(c.out) == before, f"left behind in {c.out}: {(_snapshot(c.out) or set()) - (before or set())}"


def test_catalogue_holds_at_least_100_cases():
    assert len(CASES) >= 100
    assert len({c.id for c in CASES}) == len(CASES)


# ---- a few through the real console script ---------------------------------------------------------------------
def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "compressor"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COMPRESSOR_DEBUG": "", **(env or {})})


@pytest.mark.parametrize("variant", ["plugin-option", "out-is-a-file", "chain"])
def test_subprocess_cases(variant, world, tmp_path):
    text = recipe(world["encoder"])
    out = tmp_path / "out"
    if variant == "plugin-option":
        text = text.replace("    format: label_text\n", "    format: label_text\n    options: {bogus: 1}\n")
        expect = "tasks[1].options"
    elif variant == "out-is-a-file":
        out.write_text("x")
        expect = "--out is an existing file"
    else:
        text = recipe(world["encoder"], stages="  - {kind: export}\n")
        expect = "stage 'export' (export) needs a model"
    path = tmp_path / "r.yaml"
    path.write_text(text)
    r = _cli("run", str(path), "--out", str(out))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and expect in r.stderr, r.stderr
    assert str(path) in r.stderr or str(out) in r.stderr
    assert not out.exists() or out.is_file()


def test_debug_shows_the_traceback_of_an_anticipated_error(world, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(recipe(world["encoder"]).replace("plugin: ner", "plugin: nre"))
    for r in (_cli("--debug", "validate", str(path)), _cli("validate", str(path), env={"COMPRESSOR_DEBUG": "1"})):
        assert r.returncode == 2
        assert "Traceback (most recent call last)" in r.stderr and r.stderr.rstrip().splitlines()[-1].startswith("error: ")


def test_an_unexpected_bug_still_shows_its_traceback(monkeypatch, world, tmp_path):
    import compressor.checks

    def boom(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(compressor.checks, "check_recipe", boom)
    path = tmp_path / "r.yaml"
    path.write_text(recipe(world["encoder"]))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1 and isinstance(result.exception, ZeroDivisionError)


# ---- property-based fuzz: the recipe loader and the readers give clean errors only ----------------------------
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))

_yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                          st.text(max_size=12))
_yaml_values = st.recursive(_yaml_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(
        ["name", "kind", "tasks", "stages", "plugin", "data", "train", "epochs", "model", "source", "options",
         "path", "x"]), inner, max_size=5)), max_leaves=20)


def _clean(fn: Callable[[], object]) -> None:
    from compressor.errors import CompressorError, anticipated

    try:
        fn()
    except CompressorError as exc:
        assert str(exc) and "\n" not in str(exc).strip()
    except Exception as exc:  # noqa: BLE001
        assert anticipated(exc) is not None, f"unclean {type(exc).__name__}: {exc}"


@_FUZZ
@given(doc=_yaml_values)
def test_fuzz_recipe_loader_structures(doc, tmp_path_factory):
    import yaml

    from compressor.checks import check_recipe
    from compressor.recipe import load_recipe

    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    _clean(lambda: check_recipe(load_recipe(path), path))


@_FUZZ
@given(raw=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_fuzz_recipe_loader_bytes(raw, tmp_path_factory):
    from compressor.recipe import load_recipe

    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    path.write_bytes(raw)
    _clean(lambda: load_recipe(path))


_READERS = [("ner", "conll"), ("ner", "jsonl"), ("ner", "conll04"), ("classification", "label_text"),
            ("classification", "tsv"), ("classification", "jsonl"), ("qa", "squad"), ("qa", "jsonl"),
            ("relation", "conll04"), ("classification", "csv"), ("ner", "csv"), ("classification", "parquet"),
            ("qa", "csv")]
_lines = st.lists(st.one_of(st.text(max_size=30), st.sampled_from(
    ["John B-Peop", "1 good", "{\"text\": \"a\", \"label\": 1}", "[", "", "\t", "{\"tokens\": [\"a\"], \"tags\": [\"O\"]}",
     '{"data": []}', '[{"tokens": ["a"], "entities": [[0, 1, "X"]]}]', "text,label", "tokens,tags",
     "\"['a' 'b']\",\"['O' 'B-X']\"", "a\u2028b,1", "[1 2],x"])), max_size=8)


@_FUZZ
@given(reader=st.sampled_from(_READERS), body=st.one_of(_lines.map("\n".join).map(str.encode), st.binary(max_size=200)))
def test_fuzz_readers(reader, body, tmp_path_factory):
    from compressor.tasks import build_task

    plugin, fmt = reader
    options = {"entity_task": "ner"} if plugin == "relation" else None
    task = build_task(plugin, "t", None, options)
    path = tmp_path_factory.mktemp("fuzz") / "data.txt"
    path.write_bytes(body)
    _clean(lambda: task.read(path, fmt))


def test_undecodable_bytes_and_usage_errors_through_the_console_script(bundle, tmp_path):
    """Real argv bytes that are not UTF-8 (Python hands them over as surrogates) and a bad option: one line."""
    exe = Path(sys.executable).parent / "compressor"
    env = {**os.environ, "COMPRESSOR_DEBUG": ""}
    r = subprocess.run([str(exe), "predict", str(bundle), b"caf\xe9 au lait", "--task", "sst"], capture_output=True,
                       timeout=120, env=env)
    err = r.stderr.decode("utf-8")
    assert r.returncode == 2 and err.startswith("error: ") and err.count("\n") == 1 and "not valid UTF-8" in err, err
    r = subprocess.run([str(exe), "predict", str(bundle), "hi", "--task", b"s\xffst"], capture_output=True,
                       timeout=120, env=env)
    err = r.stderr.decode("utf-8")
    assert r.returncode == 2 and err.count("\n") == 1 and "does not serve" in err, err
    r = subprocess.run([str(exe), "run", "x.yaml", "--bogus"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and r.stderr.startswith("error: No such option: --bogus") and r.stderr.count("\n") == 1
    assert "Usage:" not in r.stderr and "╭" not in r.stderr
