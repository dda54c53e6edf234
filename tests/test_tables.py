"""Data from Hugging Face ``datasets`` (JSON lines, CSV, parquet, ``save_to_disk``) read through the normal task path
with a column map and label names; the one line reader (``\\n`` / ``\\r\\n`` only); label mapping for classification;
one seeded subsample per file; label counts in ``validate --data`` and the run report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compressor.cli.main import app
from compressor.data.options import DataOptions, SplitSource, TaskData
from compressor.data.readers import example_location, split_lines
from compressor.data.store import DataStore
from compressor.data.tables import parse_list_cell
from compressor.errors import DataError

datasets = pytest.importorskip("datasets")
from datasets import ClassLabel, Dataset, Features, Sequence, Value  # noqa: E402

datasets.disable_progress_bars()
runner = CliRunner()

CONLL_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
NER_ROWS = [
    (["EU", "rejects", "German", "call"], ["B-ORG", "O", "B-MISC", "O"]),
    (["Peter", "Blackburn"], ["B-PER", "I-PER"]),
    (["BRUSSELS", "1996-08-22"], ["B-LOC", "O"]),
    (["it's", "a", "'quoted'", "\"word\""], ["O", "O", "O", "O"]),
    (["Germany", "'s", "representative"], ["B-LOC", "O", "O"]),
    (["Werner", "Zwingmann", "said"], ["B-PER", "I-PER", "O"]),
]
SST_ROWS = [("a gripping , moving film", "positive"), ("dull and far too long", "negative"),
            ("the best of the year", "positive"), ("a mess , from start to end", "negative"),
            ("warm , funny , wise", "positive"), ("nothing works here", "negative")]
FORMATS = ("jsonl", "csv", "parquet", "arrow")


def conll_dataset() -> Dataset:
    """CoNLL-2003's shape: id, tokens, ner_tags as a sequence of ClassLabel ids."""
    features = Features({"id": Value("string"), "tokens": Sequence(Value("string")),
                         "ner_tags": Sequence(ClassLabel(names=CONLL_TAGS))})
    return Dataset.from_dict({"id": [str(i) for i in range(len(NER_ROWS))], "tokens": [t for t, _ in NER_ROWS],
                              "ner_tags": [[CONLL_TAGS.index(x) for x in tags] for _, tags in NER_ROWS]},
                             features=features)


def sst_dataset() -> Dataset:
    """GLUE SST-2's shape: sentence, label (ClassLabel negative/positive), idx."""
    features = Features({"sentence": Value("string"), "label": ClassLabel(names=["negative", "positive"]),
                         "idx": Value("int32")})
    return Dataset.from_dict({"sentence": [s for s, _ in SST_ROWS],
                              "label": [["negative", "positive"].index(y) for _, y in SST_ROWS],
                              "idx": list(range(len(SST_ROWS)))}, features=features)


def write(ds: Dataset, directory: Path, name: str, fmt: str) -> Path:
    """``ds`` written by ``datasets`` itself in ``fmt``."""
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "arrow":
        path = directory / name
        ds.save_to_disk(str(path))
        return path
    path = directory / f"{name}.{fmt}"
    {"jsonl": ds.to_json, "csv": ds.to_csv, "parquet": ds.to_parquet}[fmt](str(path))
    return path


def store_of(*tasks: TaskData, seed: int = 3, root: Path = Path("/")) -> DataStore:
    store = DataStore(DataOptions(tasks=tasks, seed=seed, recipe="t"), root)
    store.fit_labels()
    return store


def _ner_task(path: Path, fmt: str) -> TaskData:
    # JSON lines and CSV keep ids only (no ClassLabel feature): their names come from the recipe
    names = {"tags": tuple(CONLL_TAGS)} if fmt in ("jsonl", "csv") else {}
    return TaskData(name="conll", plugin="ner", splits={"train": SplitSource(str(path)), "dev": SplitSource(str(path))},
                    columns={"tags": "ner_tags"}, label_names=names)


def _sst_task(path: Path, fmt: str) -> TaskData:
    names = {"label": ("negative", "positive")} if fmt in ("jsonl", "csv") else {}
    return TaskData(name="sst2", plugin="classification", splits={"train": SplitSource(str(path))},
                    columns={"text": "sentence"}, label_names=names)


@pytest.mark.parametrize("fmt", FORMATS)
def test_conll2003_shaped_ner_from_every_datasets_format(tmp_path, fmt):
    path = write(conll_dataset(), tmp_path, "conll", fmt)
    store = store_of(_ner_task(path, fmt))
    examples = store.examples("conll", "train")
    assert [(ex.tokens, ex.tags) for ex in examples] == [(list(t), list(g)) for t, g in NER_ROWS]
    assert examples[0].entities == [(0, 1, "ORG"), (2, 3, "MISC")]
    assert store.tasks["conll"].labels == ["LOC", "MISC", "ORG", "PER"]
    where = str(examples[1].source)
    assert where == (f"{path}:2" if fmt == "jsonl" else f"{path} [record 1]")


@pytest.mark.parametrize("fmt", FORMATS)
def test_glue_shaped_classification_from_every_datasets_format_has_label_names(tmp_path, fmt):
    path = write(sst_dataset(), tmp_path, "sst2", fmt)
    store = store_of(_sst_task(path, fmt))
    examples = store.examples("sst2", "train")
    assert [(ex.text, ex.label) for ex in examples] == SST_ROWS
    assert store.tasks["sst2"].labels == ["negative", "positive"]
    assert store.tasks["sst2"].export_spec()["labels"] == ["negative", "positive"]  # what predict answers with


def test_format_is_told_by_the_path_and_ids_without_names_stay_digits(tmp_path):
    """A directory is read as save_to_disk, .parquet/.csv/.jsonl by their suffix; plain integer labels of a JSON
    lines file with no names anywhere keep their digits (as before)."""
    disk = write(sst_dataset(), tmp_path, "disk", "arrow")
    jsonl = write(sst_dataset(), tmp_path, "plain", "jsonl")
    store = store_of(
        TaskData(name="a", plugin="classification", splits={"train": SplitSource(str(disk))},
                 columns={"text": "sentence"}),
        TaskData(name="b", plugin="classification", splits={"train": SplitSource(str(jsonl))},
                 columns={"text": "sentence"}))
    assert store.tasks["a"].labels == ["negative", "positive"]
    assert store.tasks["b"].labels == ["0", "1"]


def test_a_classlabel_without_names_is_named_by_the_recipe(tmp_path):
    features = Features({"sentence": Value("string"), "label": ClassLabel(num_classes=2)})
    ds = Dataset.from_dict({"sentence": ["fine", "dull"], "label": [1, 0]}, features=features)
    path = write(ds, tmp_path, "nameless", "parquet")
    task = TaskData(name="s", plugin="classification", splits={"train": SplitSource(str(path))},
                    columns={"text": "sentence"})
    with pytest.raises(DataError, match="column 'label' is a ClassLabel without names"):
        store_of(task)
    store = store_of(TaskData(**{**task.__dict__, "label_names": {"label": ("bad", "good")}}))
    assert [ex.label for ex in store.examples("s", "train")] == ["good", "bad"]


def test_split_columns_override_the_tasks(tmp_path):
    train = write(sst_dataset(), tmp_path, "train", "parquet")
    dev = write(sst_dataset().rename_column("sentence", "review"), tmp_path, "dev", "parquet")
    store = store_of(TaskData(name="s", plugin="classification", columns={"text": "sentence"}, splits={
        "train": SplitSource(str(train)), "dev": SplitSource(str(dev), columns={"text": "review"})}))
    assert [ex.text for ex in store.examples("s", "dev")] == [s for s, _ in SST_ROWS]


def test_squad_shaped_qa_records_with_datasets_answers(tmp_path):
    ctx = "John Smith lives in Paris ."
    ds = Dataset.from_dict({"id": ["q1", "q2"], "title": ["t", "t"], "context": [ctx, ctx],
                            "question": ["Where does John live?", "Who lives in Paris?"],
                            "answers": [{"text": ["Paris"], "answer_start": [20]},
                                        {"text": ["John Smith"], "answer_start": [0]}]})
    path = write(ds, tmp_path, "squad", "parquet")
    store = store_of(TaskData(name="qa", plugin="qa", splits={"train": SplitSource(str(path))}))
    examples = store.examples("qa", "train")
    assert [ex.answers for ex in examples] == [(("Paris", 20),), (("John Smith", 0),)]
    assert all(ex.answer_ok() for ex in examples)


@pytest.mark.parametrize("cell, expected", [
    ("['EU' 'rejects' 'German']", ["EU", "rejects", "German"]),
    ("[\"it's\" 'a'\n 'b']", ["it's", "a", "b"]),
    ("[3 0 7]", [3, 0, 7]),
    ('["EU", "rejects"]', ["EU", "rejects"]),
    ("[]", []),
    ("[citation needed]", None),
    ("plain text", None),
])
def test_csv_list_cells_as_datasets_writes_them(cell, expected):
    assert parse_list_cell(cell) == expected


# ---- one line reader -------------------------------------------------------------------------------------------
SEPARATORS = ["\u2028", "\u2029", "\x85", "\x0c", "\x0b", "\x1c", "\x1d", "\x1e", "\r"]


@pytest.mark.parametrize("sep", SEPARATORS, ids=[f"U+{ord(s):04X}" for s in SEPARATORS])
def test_lines_end_at_line_feed_only(sep):
    assert split_lines(f"a{sep}b\nc\r\nd\n") == [f"a{sep}b", "c", "d"]
    assert split_lines("x\n\ny") == ["x", "", "y"]


@pytest.mark.parametrize("sep", SEPARATORS, ids=[f"U+{ord(s):04X}" for s in SEPARATORS])
def test_a_separator_inside_a_training_sentence_invents_no_label_and_keeps_line_numbers(tmp_path, sep):
    path = tmp_path / "train.txt"
    path.write_text(f"1 a good film{sep}bad news for rivals\n0 dull\n1 fun\n0\n", encoding="utf-8", newline="")
    task = TaskData(name="s", plugin="classification", format="label_text", splits={"train": SplitSource(str(path))})
    with pytest.raises(DataError, match=r"train\.txt:4: expected '<label> <text>'"):
        store_of(task)
    path.write_text(f"1 a good film{sep}bad news for rivals\n0 dull\n1 fun\n", encoding="utf-8", newline="")
    store = store_of(task)
    assert store.tasks["s"].labels == ["0", "1"]
    assert [str(ex.source) for ex in store.examples("s", "train")] == [f"{path}:{n}" for n in (1, 2, 3)]


def test_conll_columns_split_at_spaces_and_tabs_only(tmp_path):
    path = tmp_path / "x.conll"
    path.write_text("New\u00a0York B-LOC\nis\tO\nbig\u2028city O\n\n", encoding="utf-8")
    store = store_of(TaskData(name="n", plugin="ner", splits={"train": SplitSource(str(path))}))
    assert store.examples("n", "train")[0].tokens == ["New\u00a0York", "is", "big\u2028city"]


def test_jsonl_strings_with_line_separators_stay_one_record(tmp_path):
    path = tmp_path / "x.jsonl"
    lines = [json.dumps({"text": f"one\u2028two {i}", "label": "a" if i % 2 else "b"}, ensure_ascii=False)
             for i in range(4)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    store = store_of(TaskData(name="s", plugin="classification", splits={"train": SplitSource(str(path))}))
    assert len(store.examples("s", "train")) == 4 and store.tasks["s"].labels == ["a", "b"]


# ---- label mapping -------------------------------------------------------------------------------------------
TREC = ["DESC:manner How did serfdom develop ?", "ENTY:cremat What films featured Pat ?",
        "DESC:def What is ethology ?", "HUM:ind Who killed Gandhi ?", "LOC:city Where is Nome ?",
        "NUM:date When was Ozzy born ?", "ENTY:animal What is a fish ?"]


def test_trec_fine_labels_cut_to_the_coarse_six_and_a_mapping_table(tmp_path):
    path = tmp_path / "trec.txt"
    path.write_text("\n".join(TREC) + "\n")
    coarse = store_of(TaskData(name="t", plugin="classification", format="label_text",
                               splits={"train": SplitSource(str(path))}, options={"label_before": ":"}))
    assert coarse.tasks["t"].labels == ["DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert coarse.examples("t", "train")[0].label == "DESC"
    fine = store_of(TaskData(name="t", plugin="classification", format="label_text",
                             splits={"train": SplitSource(str(path))}))
    assert len(fine.tasks["t"].labels) == 7
    table = store_of(TaskData(name="t", plugin="classification", format="label_text",
                              splits={"train": SplitSource(str(path))},
                              options={"label_before": ":", "label_map": {"DESC": "description", "HUM": "human"}}))
    assert table.tasks["t"].labels == ["ENTY", "LOC", "NUM", "description", "human"]


# ---- one seeded subsample per file ------------------------------------------------------------------------------
def test_two_tasks_reading_one_file_with_a_limit_draw_the_same_examples(tmp_path):
    path = tmp_path / "shared.jsonl"
    path.write_text("".join(json.dumps({"text": f"text {i}", "label": str(i % 3)}) + "\n" for i in range(50)))

    def task(name: str, limit: int) -> TaskData:
        return TaskData(name=name, plugin="classification", splits={"train": SplitSource("shared.jsonl")},
                        dev_from_train=0.2, limits={"train": limit, "dev": 4})

    store = store_of(task("a", 10), task("b", 10), task("c", 20), root=tmp_path)
    text = {n: [ex.text for ex in store.examples(n, "train")] for n in "abc"}
    dev = {n: [ex.text for ex in store.examples(n, "dev")] for n in "abc"}
    assert text["a"] == text["b"] and len(text["a"]) == 10
    assert set(text["a"]) < set(text["c"])  # a smaller limit draws a subset of a larger one
    assert dev["a"] == dev["b"] == dev["c"] and len(dev["a"]) == 4
    assert not set(dev["a"]) & set(text["c"])  # the shared hold-out never leaks into training
    again = store_of(task("z", 10), root=tmp_path)  # the draw does not depend on the task's name
    assert [ex.text for ex in again.examples("z", "train")] == text["a"]


# ---- where errors point, label counts ----------------------------------------------------------------------------
def test_example_location_from_what_the_reader_kept():
    from dataclasses import dataclass

    from compressor.data.readers import Location

    @dataclass
    class Scaffolded:  # what `compressor tasks new` plugins keep
        path: str
        line: int

    @dataclass
    class Builtin:
        source: Location

    assert example_location(Scaffolded("d.jsonl", 7)) == "d.jsonl:7"
    assert example_location(Builtin(Location("d.json", record=3))) == "d.json [record 3]"
    assert example_location(object()) is None


def test_validate_data_names_the_line_of_a_scaffolded_plugins_example(tmp_path, monkeypatch):
    """A plugin written by ``compressor tasks new`` keeps ``path`` and ``line`` on its examples: a label error of
    ``validate --data`` names that line, not ``[record k]``."""
    import importlib

    from compressor.data.validate import validate_data
    from compressor.tasks import TASKS

    out = tmp_path / "pkg"
    assert runner.invoke(app, ["tasks", "new", "scpos", "--kind", "token", "--out", str(out)]).exit_code == 0
    monkeypatch.syspath_prepend(str(out))
    cls = importlib.import_module("compressor_scpos.task").ScposTask
    train = out / "compressor_scpos" / "data" / "train.jsonl"
    first = json.loads(split_lines(train.read_text())[0])
    dev = tmp_path / "dev.jsonl"
    dev.write_text(json.dumps(first) + "\n" + json.dumps({**first, "tags": ["NOPE"] * len(first["tags"])}) + "\n")
    TASKS.register("scpos-under-test", cls, source="<test>")
    try:
        options = DataOptions(tasks=(TaskData(name="p", plugin="scpos-under-test", splits={
            "train": SplitSource(str(train)), "dev": SplitSource(str(dev))}),), recipe="t")
        check = validate_data(options, tmp_path / "r.yaml", tmp_path)
    finally:
        TASKS.unregister("scpos-under-test")
    assert check.errors and check.errors[0].startswith(f"{dev}:2: label 'NOPE'"), check.errors


def test_validate_data_and_the_report_show_every_tasks_label_count(tmp_path):
    write(conll_dataset(), tmp_path, "conll", "parquet")
    write(sst_dataset(), tmp_path, "sst2", "arrow")
    write(sst_dataset().rename_column("sentence", "review"), tmp_path, "sst2dev", "parquet")
    (tmp_path / "trec.txt").write_text("\n".join(TREC) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""\
name: hf
data_root: {tmp_path}
tasks:
  - name: conll
    plugin: ner
    columns: {{tags: ner_tags}}
    data: {{train: conll.parquet, dev: conll.parquet}}
  - name: sst2
    plugin: classification
    columns: {{text: sentence}}
    data: {{train: sst2, dev: {{path: sst2dev.parquet, columns: {{text: review}}}}}}
  - name: trec
    plugin: classification
    format: label_text
    options: {{label_before: ":"}}
    data: {{train: trec.txt, dev: trec.txt}}
stages:
  - {{kind: train, name: teacher, epochs: 1}}
""")
    res = runner.invoke(app, ["validate", str(recipe), "--data"])
    assert res.exit_code == 0, res.output
    assert "label count: conll 4, sst2 2, trec 5" in res.output
    res = runner.invoke(app, ["validate", str(recipe)])  # the quick check reads tables whole, with their columns
    assert res.exit_code == 0, res.output

    from compressor.recipe import load_recipe
    from compressor.report.rows import render_markdown

    store = store_of(*load_recipe(recipe).data_options().tasks, root=tmp_path)
    store.examples("sst2", "train")
    sizes = store.sizes()
    assert sizes["sst2"]["train"]["labels"] == 2
    md = render_markdown({"recipe": "hf", "created": "now", "machine": {}, "threads": 1, "rows": [], "data": sizes})
    assert "| task | split | used | available | labels |" in md and "| sst2 | train | 6 | 6 | 2 |" in md


def test_tasks_check_reads_in_the_given_encoding(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("".join(f"{i % 2} caf\xe9 num\xe9ro {i}\n" for i in range(8)).encode("latin-1"))
    res = runner.invoke(app, ["tasks", "check", "classification", "--data", str(path), "--format", "label_text"])
    assert res.exit_code == 2 and "not valid UTF-8" in res.stderr
    res = runner.invoke(app, ["tasks", "check", "classification", "--data", str(path), "--format", "label_text",
                              "--encoding", "latin-1", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["ok"] is True


# ---- through to predict ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sst2_bundle(tmp_path_factory):
    """An fp32 edge bundle of a tiny (untrained) model whose sentiment task read GLUE-shaped parquet data."""
    from _export_helpers import Run, data_store, recipe_dict, save_tiny_model

    from compressor.recipe import Recipe
    from compressor.report.rows import Reporter

    root = tmp_path_factory.mktemp("sst2-bundle")
    path = write(sst_dataset(), root, "sst2", "parquet")
    spec = recipe_dict([{"kind": "export", "optimize": False, "evaluate": False}, {"kind": "bundle"}], ("sst",),
                       {"sst": {"train": str(path), "dev": str(path), "test": str(path)}})
    spec["tasks"][0].update(format=None, columns={"text": "sentence"})
    recipe = Recipe.model_validate(spec)
    data = data_store(recipe)
    run = Run(recipe, data, save_tiny_model(recipe, data, root / "model"), root, Reporter(recipe.name))
    (root / "state.json").write_text(json.dumps({"completed": []}))  # StageContext.latest reads the run's state
    run.run_stage(0)
    run.run_stage(1)
    return Path(run.outputs["bundle"]["bundle"])


def test_predict_answers_with_the_datasets_label_names(sst2_bundle):
    res = runner.invoke(app, ["predict", str(sst2_bundle), "a fine film", "--json"])
    assert res.exit_code == 0, res.output
    pred = json.loads(res.stdout)[0]["predictions"]["sst"]
    assert pred["label"] in ("negative", "positive") and set(pred["scores"]) == {"negative", "positive"}


def test_predict_file_gives_one_result_per_line(sst2_bundle, tmp_path):
    texts = [f"line {i} with a {sep} inside" for i, sep in enumerate(SEPARATORS)] + ["plain last line"]
    assert len(texts) == 10
    path = tmp_path / "in.txt"
    path.write_text("\r\n".join(texts[:5]) + "\n" + "\n".join(texts[5:]) + "\n\n", encoding="utf-8", newline="")
    res = runner.invoke(app, ["predict", str(sst2_bundle), "--file", str(path), "--json"])
    assert res.exit_code == 0, res.output
    results = json.loads(res.stdout)
    assert [r["text"] for r in results] == texts


def test_evaluate_scores_a_model_on_a_datasets_directory_with_a_column_map(tmp_path):
    """``compressor evaluate --data DIR --column text=sentence`` reads a save_to_disk split with its label names."""
    from _export_helpers import data_store, recipe_dict, save_tiny_model

    from compressor.recipe import Recipe

    path = write(sst_dataset(), tmp_path, "sst2", "parquet")
    spec = recipe_dict([{"kind": "export"}], ("sst",), {"sst": {"train": str(path), "dev": str(path),
                                                                "test": str(path)}})
    spec["tasks"][0].update(format=None, columns={"text": "sentence"})
    recipe = Recipe.model_validate(spec)
    model = save_tiny_model(recipe, data_store(recipe), tmp_path / "model")
    disk = write(sst_dataset(), tmp_path, "disk", "arrow")
    res = runner.invoke(app, ["evaluate", str(model), "--task", "sst", "--data", str(disk), "--column",
                              "text=sentence", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["examples"] == len(SST_ROWS) and 0.0 <= out["metrics"]["accuracy"] <= 1.0
    res = runner.invoke(app, ["evaluate", str(model), "--task", "sst", "--data", str(disk)])
    assert res.exit_code == 2 and "field 'text' must be a non-empty string (the record has: sentence" in res.stderr
