"""The manual runs: README.md and docs/ are tested as a newcomer uses them.

- ``docs/stages.md`` and ``docs/cli.md`` equal what ``python -m compressor.docs`` writes from the code.
- Every fenced ``bash`` and ``python`` block of README.md and docs/**/*.md runs, in a sandbox whose
  ``runs/quickstart`` is the quickstart recipe's own chain at test budgets (a tiny random encoder, a few dozen
  examples per split); a block tagged ``illustration`` (```` ```bash illustration ````) is only read.
- Every ``yaml`` block parses; one that is a whole recipe validates as a ``Recipe``, one that is a stage (or a
  list of stages) validates against the stage union.
- Every ``compressor ...`` line, in illustration blocks too, names a real command and real options.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import SHARED_DATA, tiny_bert

ROOT = Path(__file__).resolve().parents[1]
ILLUSTRATION = "illustration"
BLOCK = re.compile(r"^( *)```([A-Za-z]*)([^\n]*)\n(.*?)^\1```", re.S | re.M)
BLOCK_TIMEOUT_S = 300


def manual_files() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md")) + sorted((ROOT / "reports").glob("README.md"))


def blocks(lang: str) -> list[tuple[str, str, bool]]:
    """``(file:line, code, is_illustration)`` of every ``lang`` block of the manual."""
    found = []
    for path in manual_files():
        text = path.read_text(encoding="utf-8")
        for m in BLOCK.finditer(text):
            if m.group(2) == lang:
                line = text.count("\n", 0, m.start()) + 1
                code = textwrap.dedent(m.group(4))
                found.append((f"{path.relative_to(ROOT)}:{line}", code, ILLUSTRATION in m.group(3).split()))
    return found


def _ids(items: list[tuple[str, str, bool]]) -> list[str]:
    return [where for where, _, _ in items]


# ---- the generated references --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["stages", "cli"])
def test_generated_reference_matches_the_code(name):
    from compressor.docs import REGENERATE, TARGETS

    path, render = TARGETS[name]
    file = ROOT / path
    assert file.is_file() and file.read_text(encoding="utf-8") == render(), (
        f"{path} is out of date with the code: run `{REGENERATE}` and commit the result")


def test_the_docs_module_checks_and_writes(tmp_path):
    from compressor.docs import main, stale, write

    assert set(stale(tmp_path)) == {"docs/stages.md", "docs/cli.md"}
    write(["stages", "cli"], tmp_path)
    assert stale(tmp_path) == []
    stages = (tmp_path / "docs/stages.md").read_text()
    assert "| `per_channel` | boolean | `true` |" in stages  # a field: type, default, description
    assert "### QuantCalibration" in stages  # a nested model gets its own table
    assert "`compressor predict`" in (tmp_path / "docs/cli.md").read_text()
    assert main(["nope"]) == 2


def test_the_stage_reference_has_every_field_of_every_stage():
    from compressor.docs import render_stages
    from compressor.stage_kinds import STAGE_KINDS

    text = render_stages()
    for kind in STAGE_KINDS.names():
        config = STAGE_KINDS.get(kind).config_class()
        assert f"## {kind}\n" in text
        section = text.split(f"### {config.__name__}\n", 1)[1].split("\n## ", 1)[0]
        for field in config.model_fields:
            if field != "kind":
                assert f"| `{field}` |" in section, (kind, field)


# ---- yaml blocks ------------------------------------------------------------------------------------------------
YAML_BLOCKS = [b for b in blocks("yaml") if not b[2]]


@pytest.mark.parametrize("where,code,_", YAML_BLOCKS, ids=_ids(YAML_BLOCKS))
def test_yaml_blocks_are_valid_recipes_or_stages(where, code, _, tmp_path):
    from pydantic import TypeAdapter, ValidationError

    from compressor.recipe import Stage, load_recipe

    try:
        doc = yaml.safe_load(code)
    except yaml.YAMLError as exc:
        pytest.fail(f"{where}: the yaml block does not parse ({exc}); tag it `yaml {ILLUSTRATION}` if it is a sketch")
    if isinstance(doc, dict) and {"name", "tasks", "stages"} <= set(doc):
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(code)
        load_recipe(recipe)
        return
    stages = doc.get("stages") if isinstance(doc, dict) and "kind" not in doc else doc
    stages = stages if isinstance(stages, list) else [stages]
    for stage in stages:
        if isinstance(stage, dict) and "kind" in stage:
            try:
                TypeAdapter(Stage).validate_python(stage)
            except ValidationError as exc:
                pytest.fail(f"{where}: stage {stage.get('name', stage['kind'])!r} is not valid: {exc}")


# ---- compressor command lines -------------------------------------------------------------------------------------
def command_lines() -> list[tuple[str, list[str]]]:
    found = []
    for where, code, _ in blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["compressor"]:
                found.append((where, words[1:]))
    return found


@pytest.mark.parametrize("where,args", command_lines(), ids=[w for w, _ in command_lines()])
def test_compressor_lines_name_real_commands_and_options(where, args):
    import typer

    from compressor.cli.main import app

    cmd = typer.main.get_command(app)
    while getattr(cmd, "commands", None) is not None and args and args[0] in cmd.commands:
        cmd, args = cmd.commands[args[0]], args[1:]
    assert getattr(cmd, "commands", None) is None, f"{where}: `compressor {' '.join(args)}` names no command"
    known = {o for p in cmd.params for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])
             if o.startswith("-")} | {"--help"}
    for word in args:
        option = word.split("=", 1)[0]
        if option.startswith("-") and option not in ("-", "--") and not option[1:2].isdigit():
            assert option in known, f"{where}: `{option}` is not an option of this command (it has {sorted(known)})"


# ---- runnable blocks ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tokenizer):
    """A working directory like a clone after ``make quickstart``, with ``../shared`` beside it: ``recipes/``,
    ``tests/``, ``scripts/``, an empty ``reports/`` and ``runs/quickstart``, the quickstart recipe's chain run at
    test budgets."""
    if not (SHARED_DATA / "conll04").is_dir():
        pytest.skip(f"the quickstart data ({SHARED_DATA}) is not beside the checkout")
    box = tmp_path_factory.mktemp("manual") / "compressor"
    box.mkdir()
    (box.parent / "shared").symlink_to(SHARED_DATA.parent)  # a clone with ../shared beside it
    encoder = box.parent / "tiny-encoder"
    tiny_bert(hidden=32, layers=2, heads=4, ffn=64).save_pretrained(encoder)
    tokenizer.save_pretrained(encoder)
    for shipped in ("recipes", "tests", "scripts"):
        (box / shipped).symlink_to(ROOT / shipped)
    (box / "reports").mkdir()
    recipe = yaml.safe_load((ROOT / "recipes/quickstart.yaml").read_text())
    recipe["model"] = {"encoder": str(encoder), "max_length": 32}
    recipe["data_root"] = str(SHARED_DATA)
    for task in recipe["tasks"]:
        task["limit"] = {"train": 48, "dev": 24, "test": 24}
    for stage in recipe["stages"]:
        if stage["kind"] == "prune":
            stage.update(recovery_steps=2, importance_batches=1)
        if stage["kind"] == "prune_vocab":
            stage.update(english_words=1000)
    recipe["report"] = {"latency_runs": 2, "latency_warmup": 1, "latency_seq_len": 32}
    small = box.parent / "quickstart-tiny.yaml"
    small.write_text(yaml.safe_dump(recipe, sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "compressor.cli.main", "run", str(small), "--out",
                           str(box / "runs/quickstart")], cwd=box, env=_env(), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return box


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("COMPRESSOR_DATA_ROOT", str(SHARED_DATA))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


RUNNABLE = [(where, code, "bash") for where, code, skip in blocks("bash") if not skip] + \
           [(where, code, "python") for where, code, skip in blocks("python") if not skip]


@pytest.mark.parametrize("where,code,lang", RUNNABLE, ids=[w for w, _, _ in RUNNABLE])
def test_manual_blocks_run(where, code, lang, sandbox):
    argv = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    try:
        done = subprocess.run(argv, cwd=sandbox, env=_env(), capture_output=True, text=True,
                              timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{where}: the block ran over {BLOCK_TIMEOUT_S} s; shrink its budget or tag it "
                    f"`{lang} {ILLUSTRATION}`")
    assert done.returncode == 0, (f"{where}: the {lang} block failed (exit {done.returncode}); fix it or tag it "
                                  f"`{lang} {ILLUSTRATION}`\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
