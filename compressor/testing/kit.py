"""The kit's entry points: :func:`check_plugin` and the pytest wrapper :func:`contract_test`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from compressor.errors import CompressorError
from compressor.tasks import TASKS, TaskPlugin, validate_plugin
from compressor.testing.base import CheckReport, Checker, ContractError, resolve
from compressor.testing.phases import CheckSetup, run_checks


def check_plugin(
    plugin: type[TaskPlugin] | str,
    data: Path | str,
    *,
    name: str | None = None,
    format: str | None = None,
    options: Mapping[str, Any] | None = None,
    labels: list[str] | None = None,
    siblings: Mapping[str, Mapping[str, Any]] | None = None,
    max_length: int = 64,
    batch_size: int = 4,
    tokenizer: Any = None,
    first_subtoken_labels: bool = True,
    save_load: bool = True,
    runtime: bool = True,
    runtime_inputs: Mapping[str, Any] | None = None,
    encoding: str | None = None,
) -> CheckReport:
    """Run a plugin through the whole contract on ``data``; raise :class:`ContractError` at the first break.

    Args:
        plugin: the plugin class (registered or not) or a registered plugin name.
        data: a small split in a format the plugin reads (a few dozen examples).
        name: the task name (default: the registered name, else the class name in lower case).
        format, options, labels: as a recipe gives them (``labels=None``: ``fit_labels`` on ``data``).
        siblings: tasks the plugin needs beside it (``requires()``), ``{task name: {"plugin", "path", "format",
            "options", "labels"}}`` (``path`` defaults to ``data``).
        max_length: the model's ``max_length``.
        tokenizer: a Hugging Face fast tokenizer (default: the offline one).
        first_subtoken_labels: in a token task (features with ``word_ids`` and per-token ``labels``), only a
            word's first sub-token may carry a label; others must be -100.
        save_load: check that a saved model reloads with identical outputs.
        runtime: decode PyTorch outputs with the plugin's runtime decoder (``export_spec``) as a bundle would,
            over two sample sentences (with a sample question and text pair for decoders that want them).
        runtime_inputs: the texts and extra request inputs of that runtime check, e.g. ``{"texts": [...],
            "spans": [...]}`` for a decoder that reads ``spans`` (see ``Bundle.predict``).
        encoding: the text encoding of ``data`` and the siblings' files, as a recipe's ``encoding:`` (default
            UTF-8).

    Returns:
        A :class:`CheckReport`.
    """
    import torch

    registered, cls = resolve(plugin)
    task_name = name or registered or cls.__name__.lower()
    c = Checker(registered or task_name)
    _check_registration(c, task_name, cls)
    temporary = None if registered is not None else _register_temporarily(task_name, cls)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        setup = CheckSetup(registered or temporary, task_name, Path(data), format, options, labels, siblings,
                           max_length, batch_size, tokenizer, first_subtoken_labels, save_load, runtime,
                           dict(runtime_inputs or {}), encoding)
        return run_checks(c, setup)
    finally:
        torch.set_num_threads(threads)
        if temporary is not None:
            TASKS.unregister(temporary)


def _check_registration(c: Checker, task_name: str, cls: type[TaskPlugin]) -> None:
    """The plugin class passes the registry's validation (first check of the contract)."""
    try:
        validate_plugin(task_name, cls)
    except CompressorError as exc:
        raise ContractError(f"plugin '{c.name}': registration: {exc}") from None
    c.ok("registration")


def _register_temporarily(task_name: str, cls: type[TaskPlugin]) -> str:
    """Register a plugin for the check's duration (save/load rebuilds tasks by name); the name it got."""
    temporary = f"{task_name}"
    if temporary in TASKS:
        temporary = f"{task_name}-under-test"
    TASKS.register(temporary, cls, source="<compressor.testing>")
    return temporary


def contract_test(plugin: type[TaskPlugin] | str, data: Path | str, **kwargs: Any) -> Callable[[], None]:
    """A pytest test function running :func:`check_plugin`: ``test_contract = contract_test(MyTask, FIXTURE)``."""

    def test_plugin_contract() -> None:
        check_plugin(plugin, data, **kwargs)

    label = plugin if isinstance(plugin, str) else plugin.__name__
    test_plugin_contract.__doc__ = f"{label} passes the compressor task-plugin contract on {data}."
    return test_plugin_contract
