from pathlib import Path

import pytest

from compressor.errors import RecipeError
from compressor.recipe import load_recipe, resolve_data_root

ROOT = Path(__file__).resolve().parents[1]

GOOD = """\
name: r
tasks:
  - name: sst2
    plugin: classification
    data: {train: a.txt}
stages:
  - kind: train
    epochs: 1
"""


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(recipe):
    assert load_recipe(recipe).stages


def test_good_recipe_defaults(tmp_path):
    r = load_recipe(write(tmp_path, GOOD))
    assert r.model.encoder == "offline-default" and r.stages[0].epochs == 1 and r.stages[0].name == "teacher"


@pytest.mark.parametrize("text,expected", [
    (GOOD.replace("    epochs: 1", "    epochs: 1\n    bogus: 3"), r"r\.yaml:9: stages\[0\]\.bogus: unknown key"),
    (GOOD.replace("epochs: 1", "epochs: -1"), r"r\.yaml:8: stages\[0\]\.epochs: Input should be greater than 0"),
    (GOOD.replace("kind: train", "kind: trian"), r"r\.yaml:7: stages\[0\]: unknown stage kind"),
    (GOOD.replace("name: r\n", ""), r"r\.yaml:1: name: Field required"),
    (GOOD + "  - kind: train\n", r"stage name 'teacher' is used twice"),
    ("name: r\ntasks: [\n", r"r\.yaml:3: malformed YAML"),
    ("- just\n- a list\n", r"expected a mapping"),
])
def test_bad_recipes_name_line_and_field(tmp_path, text, expected):
    with pytest.raises(RecipeError, match=expected):
        load_recipe(write(tmp_path, text))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_DATA_ROOT", str(tmp_path / "env"))
    assert resolve_data_root(str(tmp_path / "recipe"), tmp_path / "cli") == tmp_path / "cli"
    assert resolve_data_root(str(tmp_path / "recipe")) == tmp_path / "recipe"
    assert resolve_data_root(None) == tmp_path / "env"


def test_data_options_carry_what_the_data_layer_needs(tmp_path):
    """``Recipe.data_options()``: the one translation from a recipe to the data layer's own options."""
    from compressor.data.options import SplitSource

    text = GOOD.replace("name: r\n", "name: r\nseed: 7\nmodel: {max_length: 64}\n").replace(
        "    data: {train: a.txt}",
        "    data: {train: a.txt, test: {path: t.csv, format: tsv, encoding: latin-1}}\n"
        "    format: label_text\n    encoding: cp1252\n    dev_from_train: 0.2\n    limit: {train: 5}\n"
        "    labels: [neg, pos]\n    options: {pooling: mean}")
    opts = load_recipe(write(tmp_path, text)).data_options()
    assert (opts.seed, opts.max_length, opts.recipe) == (7, 64, "r")
    task = opts.task("sst2")
    assert task.splits == {"train": SplitSource("a.txt"), "test": SplitSource("t.csv", "tsv", "latin-1")}
    assert (task.plugin, task.format, task.encoding, task.dev_from_train) == ("classification", "label_text",
                                                                               "cp1252", 0.2)
    assert task.limits == {"train": 5, "dev": None, "test": None}
    assert task.labels == ["neg", "pos"] and task.options == {"pooling": "mean"}
    with pytest.raises(RecipeError, match="recipe 'r': no task 'nope'"):
        opts.task("nope")
