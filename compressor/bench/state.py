"""What every step of one benchmark shares (the benchmark builds it, the report writer reads it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.bench.candidates import TaskInputs
from compressor.bench.timing import Settings


@dataclass
class Bench:
    """What every step of one benchmark shares."""

    settings: Settings
    eval_threads: int
    target: str  # optimum's quantization preset for this CPU
    data: Any
    log: Callable[[str], None]
    work: Path = Path(".")
    inputs: dict[str, dict[str, TaskInputs]] = field(default_factory=dict)  # encoding group -> task -> inputs
    notes: list[str] = field(default_factory=list)
    footprint: dict[str, dict[str, Any]] = field(default_factory=dict)  # model key -> edge footprint
