"""Checks of a recipe that need more than its YAML: task plugins and their options, the stage chain, the models it
starts from (encoder config, model-directory manifests), data files.

``compressor validate`` runs all of them; ``compressor run`` runs all but the data check before it reads any data
(and reads every split before training), so a typo, a ``max_length`` beyond the encoder's positions or a bad
manifest fails at once with the file, line and field, not after training. Every error is a ``RecipeError`` or a
``DataError`` naming the recipe file and field (or the data file and line).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from compressor.data.store import under_root
from compressor.data.tables import TABLE_FORMATS, ColumnMap, table_format
from compressor.errors import CompressorError, DataError, ModelDirError, RecipeError
from compressor.recipe import Recipe, line_of

#: a data file up to this size is read whole by ``check_data``; a larger one only its first lines
FULL_READ_BYTES = 8 * 1024 * 1024
HEAD_LINES = 200


def locate(path: Path, loc: list[Any]) -> str:
    """``file:line: dotted.field`` of a recipe location."""
    try:
        node = yaml.compose(Path(path).read_text(encoding="utf-8"))
        line = line_of(node, loc)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        line = 1
    dotted = ""
    for p in loc:
        dotted += f"[{p}]" if isinstance(p, int) else (f".{p}" if dotted else str(p))
    return f"{path}:{line}: {dotted}"


def check_tasks(recipe: Recipe, path: Path) -> dict[str, Any]:
    """Build every task through its plugin (name, labels, options); the built tasks by name."""
    from compressor.tasks import build_task

    tasks = {}
    for i, spec in enumerate(recipe.tasks):
        from compressor.tasks import TASKS

        try:
            TASKS.get(spec.plugin)
        except CompressorError as exc:
            raise RecipeError(f"{locate(path, ['tasks', i, 'plugin'])}: {exc}") from None
        try:
            tasks[spec.name] = build_task(spec.plugin, spec.name, spec.labels, spec.options)
        except CompressorError as exc:
            message = str(exc).removeprefix(f"task '{spec.name}': ")
            raise RecipeError(f"{locate(path, ['tasks', i, 'options'])}: {message}") from None
    return tasks


def check_stage_chain(recipe: Recipe, path: Path) -> None:
    """Every stage's input is produced by an earlier stage; every ``source`` names an earlier stage that can be
    one (both from the stage kinds' registration, ``compressor.stage_kinds``). The error names the stage."""
    from compressor.stage_kinds import STAGE_KINDS, TOKENS, kinds_giving, stage_needs

    given: set[str] = set()
    earlier: list[Any] = []
    for i, stage in enumerate(recipe.stages):
        source = getattr(stage, "source", None)
        spec = STAGE_KINDS.get(stage.kind)
        if source is not None:
            match = [s for s in earlier if s.name == source]
            if not match:
                names = [s.name for s in earlier]
                raise RecipeError(f"{locate(path, ['stages', i, 'source'])}: stage '{stage.name}': source "
                                  f"'{source}' is not an earlier stage (earlier: {names or 'none'})")
            if spec.sources and not spec.sources & STAGE_KINDS.get(match[0].kind).gives:
                kinds = sorted({k for token in spec.sources for k in kinds_giving(token)})
                raise RecipeError(f"{locate(path, ['stages', i, 'source'])}: stage '{stage.name}': source "
                                  f"'{source}' is a {match[0].kind} stage; expected {' or '.join(kinds)}")
        for need, field in stage_needs(stage):
            if need in given:
                continue
            makers = kinds_giving(need)
            if field is not None:
                raise RecipeError(f"{locate(path, ['stages', i, field])}: stage '{stage.name}': {field} "
                                  f"'{getattr(stage, field)}' takes {TOKENS[need]}; no {' or '.join(makers)} "
                                  "stage comes before it")
            raise RecipeError(f"{locate(path, ['stages', i])}: stage '{stage.name}' ({stage.kind}) needs "
                              f"{TOKENS[need]} from an earlier stage (of kind {', '.join(makers)}); "
                              f"none comes before it")
        given |= spec.gives
        earlier.append(stage)


#: stage kinds that name a model directory of their own (``path``)
_MODEL_DIR_KINDS = ("load", "add_task")


def check_models(recipe: Recipe, path: Path, missing_ok: bool = False) -> list[str]:
    """What the recipe's starting models allow, from their ``config.json`` or manifest (no weights are read):

    * the encoder of a ``train`` stage: ``model.max_length`` within its positions; a model type that only remote
      code builds is refused (with ``model.trust_remote_code: false`` the code would not run; with ``true`` it
      would, but a saved model of it could not be reloaded, so no stage could finish);
    * the model directory of a ``load`` / ``add_task`` stage: every manifest field's type and range, task names
      that are safe path components, ``model.max_length`` within its positions. A directory that does not
      exist is an error, or with ``missing_ok`` (``compressor validate``: the run that writes it may come later)
      a note.

    Returns lines to show the user: the remote code that will run, the directories not checked.
    """
    notes: list[str] = []
    if any(s.kind == "train" for s in recipe.stages):
        notes += _check_encoder(recipe, path)
    for i, stage in enumerate(recipe.stages):
        if stage.kind not in _MODEL_DIR_KINDS or not getattr(stage, "path", None):
            continue
        directory = Path(stage.path).expanduser()
        if missing_ok and not directory.exists():
            notes.append(f"note: stage '{stage.name}': model directory {directory} does not exist yet; not checked")
            continue
        from compressor.model.io import read_manifest  # torch: only for a recipe that names a model directory

        try:
            manifest = read_manifest(directory.resolve())
        except ModelDirError as exc:
            raise RecipeError(f"{locate(path, ['stages', i, 'path'])}: {exc}") from None
        _check_positions(recipe, path, manifest["encoder"]["config"],
                         f"the model of stage '{stage.name}' ({directory / 'manifest.json'}: encoder.config)")
    return notes


def _check_encoder(recipe: Recipe, path: Path) -> list[str]:
    from compressor.model.config import builtin_model_type, read_encoder_config

    name = recipe.model.encoder
    where = locate(path, ["model", "encoder"])
    try:
        config = read_encoder_config(name)
    except (FileNotFoundError, ValueError) as exc:
        raise RecipeError(f"{where}: {exc}") from None
    if config is None:
        return []  # a hub name not in the local cache: the train stage's loader fetches it or says why not
    notes: list[str] = []
    remote, home = config.remote_code, config.file.parent
    if remote is not None:
        if not builtin_model_type(config.model_type):
            if not recipe.model.trust_remote_code:
                raise RecipeError(f"{where}: model type '{config.model_type}' needs remote code, which is refused "
                                  f"({remote} from {home}; transformers has no such model type); compressor cannot "
                                  "train such an encoder even with model.trust_remote_code: true: a saved model of "
                                  "it could not be reloaded without that code")
            raise RecipeError(f"{where}: model type '{config.model_type}' is built only by remote code ({remote} from "
                              f"{home}), which model.trust_remote_code: true would run; compressor cannot train such "
                              "an encoder: a saved model of it could not be reloaded without that code, so no stage "
                              "could finish")
        if recipe.model.trust_remote_code:
            notes.append(f"warning: {where}: model.trust_remote_code is true: the remote code {remote} from {home} "
                         "will run when the encoder loads; use it only for code you trust")
    _check_positions(recipe, path, config.fields, f"encoder '{name}' ({config.file})")
    return notes


def _check_positions(recipe: Recipe, path: Path, config: Any, what: str) -> None:
    from compressor.model.config import usable_positions

    positions = usable_positions(config)
    if positions is not None and recipe.model.max_length > positions:
        raise RecipeError(f"{locate(path, ['model', 'max_length'])}: {recipe.model.max_length} is more than the "
                          f"{positions} positions of {what}; set model.max_length: {positions} or less")


def check_data(recipe: Recipe, path: Path, data_root: Path | None, tasks: dict[str, Any]) -> int:
    """Every data file of every task exists and its first lines parse (small files: all of it); files checked.
    With no ``data_root`` only the absolute paths are checked."""
    checked = 0
    for i, spec in enumerate(recipe.tasks):
        for split, entry in spec.split_files().items():
            file = under_root(entry.path, data_root)
            if file is None:  # relative, and no data root to read it under
                continue
            field = ["tests", split[len("test:"):]] if split.startswith("test:") else ["data", split]
            if not file.exists():  # a file, or a datasets save_to_disk directory
                raise DataError(file, f"data file not found ({locate(path, ['tasks', i, *field])})")
            fmt = entry.format or spec.format
            columns = ColumnMap(spec.columns if entry.columns is None else entry.columns,
                                {k: tuple(v) for k, v in spec.label_names.items()})
            _read_head(tasks[spec.name], file, fmt, f"split '{split}' of task '{spec.name}'",
                       entry.encoding or spec.encoding, split, columns)
            checked += 1
    return checked


def _read_head(task: Any, file: Path, fmt: str | None, what: str, encoding: str | None = None,
               split: str = "train", columns: ColumnMap | None = None) -> None:
    """Read a small file whole, a large one's first lines (a large single JSON document: not at all), and check
    the examples read as the plugin checks a ``split`` (``TaskPlugin.check_split``)."""
    from compressor.data.readers import decode_error
    from compressor.data.store import read_split

    # tables (parquet, save_to_disk, CSV) have no first lines that parse alone: read whole (columnar, quick)
    if table_format(file, fmt) in TABLE_FORMATS or file.stat().st_size <= FULL_READ_BYTES:
        examples = read_split(task, file, fmt, encoding, columns)
        if not examples:
            raise DataError(file, f"{what} is empty")
        task.check_split(examples, split)
        return
    with open(file, "rb") as fh:
        first = fh.read(1 << 16)
    try:
        first.decode(encoding or "utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(first) - 4:  # not just a character cut at the end of the sample
            raise decode_error(file, first, exc, encoding or "utf-8") from None
    if first.lstrip()[:1] in (b"[", b"{") and not file.suffix == ".jsonl":
        return  # one JSON document: its first lines do not parse on their own
    lines: list[bytes] = []
    with open(file, "rb") as fh:
        for line in fh:
            lines.append(line)
            if len(lines) >= HEAD_LINES and not line.strip():
                break
            if len(lines) >= 4 * HEAD_LINES:
                break
    tmp = Path(tempfile.mkdtemp(prefix="compressor-head-"))
    try:
        head = tmp / file.name
        head.write_bytes(b"".join(lines))
        try:
            task.check_split(read_split(task, head, fmt, encoding, columns), split)
        except DataError as exc:  # name the real file, not the sample
            exc.args = (str(exc).replace(str(head), str(file)),)
            exc.path = file
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_recipe(recipe: Recipe, path: Path, data_root: Path | None = None) -> dict[str, Any]:
    """Tasks, stage chain, starting models (a model directory not there yet is a note) and (with ``data_root``)
    data files; a summary for ``compressor validate``, with ``notes`` to show."""
    tasks = check_tasks(recipe, path)
    for task in tasks.values():
        task.bind(tasks)
    check_stage_chain(recipe, path)
    for i, stage in enumerate(recipe.stages):
        if getattr(stage, "teachers", None):  # a distill stage's per-task teachers: names, tasks, load models
            from compressor.distill.teachers import preflight as check_teachers

            check_teachers(recipe, i)
    notes = check_models(recipe, path, missing_ok=True)
    files = check_data(recipe, path, data_root, tasks)
    return {"tasks": len(tasks), "stages": [s.name for s in recipe.stages], "data_files": files, "notes": notes}


def default_data_root(recipe: Recipe, cli_root: Path | None) -> Path | None:
    """The data root a run would use, or ``None`` when there is none (validate then checks absolute paths only)."""
    from compressor.recipe import resolve_data_root

    return resolve_data_root(recipe.data_root, cli_root, required=False)
