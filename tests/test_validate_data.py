"""Data checked before training: ``encoding:`` on a split, labels fitted on the whole training file despite
``limit``, ``dev_from_train`` hold-outs, and ``compressor validate --data`` listing every problem on its own line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compressor.cli.main import app
from compressor.data.store import DataStore, read_split
from compressor.errors import DataError
from compressor.recipe import load_recipe
from conftest import FIXTURES

PIPE = FIXTURES / "pipeline"
runner = CliRunner()

SST_TRAIN = [f"{i % 2} the film number {i} was {'fun' if i % 2 else 'dull'} ." for i in range(40)]


def write_recipe(tmp: Path, sst: str, ner: str = "", extra: str = "") -> Path:
    ner = ner or "data: {train: ner.train.conll, dev: ner.dev.conll, test: ner.test.conll}"
    path = tmp / "r.yaml"
    path.write_text(f"""\
name: v
seed: 7
data_root: {tmp}
tasks:
  - name: ner
    plugin: ner
    format: conll
    {ner}
  - name: sst
    plugin: classification
    format: label_text
    {sst}
{extra}
stages:
  - {{kind: train, name: teacher, epochs: 1}}
""")
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    for name in ("ner.train.conll", "ner.dev.conll", "ner.test.conll"):
        shutil.copy(PIPE / name, tmp_path / name)
    (tmp_path / "sst.train.txt").write_text("\n".join(SST_TRAIN) + "\n")
    (tmp_path / "sst.dev.txt").write_text("1 good fun\n0 dull film\n1 fun again\n")
    (tmp_path / "sst.test.txt").write_text("0 dull\n1 fun\n")
    return tmp_path


SST = "data: {train: sst.train.txt, dev: sst.dev.txt, test: sst.test.txt}"


def validate(recipe: Path):
    return runner.invoke(app, ["validate", str(recipe), "--data"])


def test_clean_data_passes(data):
    result = validate(write_recipe(data, SST))
    assert result.exit_code == 0, result.output
    assert "ok (2 task(s)" in result.stdout and "6 split(s) read whole" in result.stdout


def test_dev_label_outside_the_training_schema_is_one_line_naming_file_line_and_label(data):
    (data / "sst.dev.txt").write_text("1 good fun\n0 dull film\n2 a label train never has\n")
    result = validate(write_recipe(data, SST))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: {data / 'sst.dev.txt'}:3: label '2' (dev split of task 'sst') is not in the label "
                     "schema of the training split ['0', '1']"]


def test_every_problem_is_listed_not_only_the_first(data):
    (data / "sst.test.txt").write_text("0 dull\n7 odd\n9 odder\n")
    ner_dev = (data / "ner.dev.conll").read_text().replace("B-Peop", "B-Animal", 1)
    (data / "ner.dev.conll").write_text(ner_dev)
    result = validate(write_recipe(data, SST))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)
    assert any("ner.dev.conll:" in line and "label 'Animal' (dev split of task 'ner')" in line for line in lines)
    assert any("sst.test.txt:2: label '7'" in line for line in lines)
    assert any("sst.test.txt:3: label '9'" in line for line in lines)


def test_latin1_file_is_named_with_its_byte_offset_and_the_encoding_option_fixes_it(data):
    raw = ("\n".join(SST_TRAIN[:5]) + "\n1 a caf\u00e9 film , fun\n" + "\n".join(SST_TRAIN[5:]) + "\n").encode("latin-1")
    (data / "sst.train.txt").write_bytes(raw)
    offset = raw.index(b"\xe9")
    result = validate(write_recipe(data, SST))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {data / 'sst.train.txt'}:6: not valid UTF-8 (byte {offset}: e9")
    assert "encoding: latin-1" in lines[0]

    quick = runner.invoke(app, ["validate", str(write_recipe(data, SST))])  # the quick check (no --data) too
    assert quick.exit_code == 2 and "sst.train.txt:6: not valid UTF-8" in quick.stderr

    fixed = "data: {train: {path: sst.train.txt, encoding: latin-1}, dev: sst.dev.txt, test: sst.test.txt}"
    result = validate(write_recipe(data, fixed))
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["validate", str(write_recipe(data, fixed))]).exit_code == 0
    store = DataStore(load_recipe(write_recipe(data, fixed)).data_options(), data)
    assert "a caf\u00e9 film , fun" in [ex.text for ex in store.examples("sst", "train")]
    # the task-level encoding applies to every split without its own
    store = DataStore(load_recipe(write_recipe(data, SST + "\n    encoding: latin-1")).data_options(), data)
    assert len(store.examples("sst", "train")) == 41


def test_an_unknown_encoding_is_a_recipe_error_naming_the_field(data):
    bad = "data: {train: {path: sst.train.txt, encoding: latin-9000}, dev: sst.dev.txt}"
    result = validate(write_recipe(data, bad))
    assert result.exit_code == 2
    assert "tasks[1].data.train.encoding" in result.stderr and "unknown text encoding 'latin-9000'" in result.stderr


def test_a_task_without_dev_is_an_error_unless_train_is_split(data):
    no_dev = "data: {train: sst.train.txt, test: sst.test.txt}"
    recipe = write_recipe(data, no_dev)
    result = validate(recipe)
    assert result.exit_code == 2
    line, = result.stderr.strip().splitlines()
    assert f"{recipe}:" in line and "tasks[1].data.dev: task 'sst' has no dev split" in line
    assert "dev_from_train" in line

    recipe = write_recipe(data, no_dev + "\n    dev_from_train: 0.25")
    result = validate(recipe)
    assert result.exit_code == 0, result.output
    store = DataStore(load_recipe(recipe).data_options(), data)
    train, dev = store.examples("sst", "train"), store.examples("sst", "dev")
    assert len(dev) == 10 and len(train) == 30
    assert sorted(ex.source.line for ex in train + dev) == list(range(1, 41))  # disjoint, covering the file
    assert store.has("sst", "dev") and store.path("sst", "dev") == data / "sst.train.txt"
    limited = DataStore(load_recipe(write_recipe(data, no_dev + "\n    dev_from_train: 0.25\n    limit: {train: 5}")).data_options(), data)
    assert len(limited.examples("sst", "train")) == 5 and len(limited.examples("sst", "dev")) == 10
    # the whole training split, as prune_vocab's full_train reads it: no limit, no dev hold-out
    assert sorted(ex.source.line for ex in limited.full("sst", "train")) == sorted(ex.source.line for ex in train)
    again = DataStore(load_recipe(recipe).data_options(), data)
    assert [ex.source.line for ex in again.examples("sst", "dev")] == [ex.source.line for ex in dev]  # seeded


def test_dev_from_train_and_a_dev_file_together_are_refused(data):
    result = validate(write_recipe(data, SST + "\n    dev_from_train: 0.1"))
    assert result.exit_code == 2 and "give data.dev or dev_from_train, not both" in result.stderr


def test_labels_are_fitted_on_the_whole_training_file_despite_limit(data):
    rare = SST_TRAIN + ["2 the one neutral film ."]
    (data / "sst.train.txt").write_text("\n".join(rare) + "\n")
    (data / "sst.dev.txt").write_text("2 neutral\n1 fun\n")
    recipe = load_recipe(write_recipe(data, SST + "\n    limit: {train: 3}"))
    store = DataStore(recipe.data_options(), data)
    store.fit_labels()
    assert store.tasks["sst"].labels == ["0", "1", "2"]
    train = store.examples("sst", "train")
    assert len(train) == 3 and "2" not in {ex.label for ex in train}  # the subsample lacks it; the schema does not
    assert store.sizes()["sst"]["train"] == {"used": 3, "available": 41, "labels": 3}
    assert validate(write_recipe(data, SST + "\n    limit: {train: 3}")).exit_code == 0


class _Plain:
    """A third-party plugin written before ``encoding:``: ``read(path, format)`` on the shared readers."""

    def read(self, path, format=None):
        from compressor.data.readers import iter_lines

        return [line for _, line in iter_lines(path)]


class _Keyword:
    """A plugin that decodes files itself and takes the ``encoding`` keyword."""

    def __init__(self):
        self.seen = []

    def read(self, path, format=None, encoding=None):
        self.seen.append(encoding)
        return Path(path).read_text(encoding=encoding or "utf-8").splitlines()


class _OwnDecoding:
    """A plugin that decodes files itself, as UTF-8, without the keyword."""

    def read(self, path, format=None):
        return Path(path).read_text(encoding="utf-8").splitlines()


def test_plugins_with_and_without_the_encoding_keyword(tmp_path):
    path = tmp_path / "x.txt"
    path.write_bytes("ok\nna\u00efve\n".encode("latin-1"))
    assert read_split(_Plain(), path, None, "latin-1") == ["ok", "na\u00efve"]
    keyword = _Keyword()
    assert read_split(keyword, path, None, "latin-1") == ["ok", "na\u00efve"] and keyword.seen == ["latin-1"]
    with pytest.raises(DataError, match=r"x\.txt:2: not valid UTF-8 \(byte 5: ef.*encoding: latin-1"):
        read_split(_Plain(), path, None)
    with pytest.raises(DataError, match=r"x\.txt:2: not valid UTF-8 \(byte 5: ef"):
        read_split(_OwnDecoding(), path, None)  # its own UnicodeDecodeError, named with file and offset


def test_evaluate_command_reads_a_file_in_the_given_encoding(tmp_path, tokenizer):
    from compressor.model.io import save_model
    from compressor.model.multitask import MultiTaskModel
    from compressor.tasks import build_task
    from conftest import tiny_bert

    model = MultiTaskModel(tiny_bert(), {"sst": build_task("classification", "sst", ["0", "1"])})
    save_model(model, tokenizer, tmp_path / "m", 32)
    (tmp_path / "t.txt").write_bytes("1 a caf\u00e9 film\n0 dull\n".encode("latin-1"))
    bad = runner.invoke(app, ["evaluate", str(tmp_path / "m"), "--task", "sst", "--data", str(tmp_path / "t.txt")])
    assert bad.exit_code == 2 and "t.txt:1: not valid UTF-8 (byte 7" in bad.stderr
    good = runner.invoke(app, ["evaluate", str(tmp_path / "m"), "--task", "sst", "--data", str(tmp_path / "t.txt"),
                               "--encoding", "latin-1", "--json"])
    assert good.exit_code == 0, good.output
    assert '"examples": 2' in good.stdout


def test_absolute_paths_need_no_data_root_and_a_relative_one_is_named_when_there_is_none(data, monkeypatch):
    """A recipe whose data paths are all absolute reads with no data root anywhere; without one, a relative
    path fails on first use naming its task and split (not 'no data root' before anything is read)."""
    import compressor.recipe.loader as loader

    monkeypatch.delenv("COMPRESSOR_DATA_ROOT", raising=False)
    monkeypatch.chdir(data)
    monkeypatch.setattr(loader, "__file__", str(data / "a" / "b" / "loader.py"))  # no ../shared beside a checkout
    assert loader.resolve_data_root(None, required=False) is None
    absolute = "data: {" + ", ".join(f"{s}: {data / f'sst.{s}.txt'}" for s in ("train", "dev", "test")) + "}"
    ner = "data: {" + ", ".join(f"{s}: {data / f'ner.{s}.conll'}" for s in ("train", "dev", "test")) + "}"
    recipe = write_recipe(data, absolute, ner)
    recipe.write_text(recipe.read_text().replace(f"data_root: {data}\n", ""))
    result = validate(recipe)
    assert result.exit_code == 0, result.output
    assert "6 split(s) read whole" in result.stdout
    store = DataStore(load_recipe(recipe).data_options(), None)
    assert len(store.full("sst", "train")) == len(SST_TRAIN)

    recipe.write_text(recipe.read_text().replace(str(data / "sst.dev.txt"), "sst.dev.txt"))
    result = validate(recipe)
    assert result.exit_code == 2
    assert "task 'sst', split 'dev': sst.dev.txt is relative to the data root, and there is none" in result.output
