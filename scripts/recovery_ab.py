"""A/B of recovery settings after a structured cut (reports/recovery-dropout.md).

Two commands:

    python scripts/recovery_ab.py run --recipe recipes/auto.yaml --teacher-run runs/four-task \\
        --out runs/exp/recover_ab.jsonl VARIANT FFN_RATIO HEAD_RATIO STEPS
    python scripts/recovery_ab.py table runs/exp/recover_ab.jsonl

``run`` loads the teacher of ``--teacher-run`` (the model of its first train/load stage, from its ``state.json``)
and that teacher's dev metrics (its ``dev`` rows in the run's ``report.json``); cuts FFN_RATIO of every layer's FFN
neurons and HEAD_RATIO of its heads (Taylor importance, as the search does); recovers for STEPS distillation steps
with the recovery settings of the recipe's search stage changed by VARIANT (words joined by '-': drop0 = every
dropout 0, warm = 10% warmup, lr2 = lr 2e-5, fp32 = no bf16 autocast, alpha = task-loss weight 0.5; without
drop0, the model's own dropout); scores every task on dev with PyTorch and appends one JSON line (the metrics and
the retention against the teacher's dev metrics) to ``--out``. ``table`` prints those lines as the Markdown table
of the report.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

VARIANTS = {"drop0": ("dropout", 0.0), "drop0all": ("dropout", 0.0), "warm": ("warmup_ratio", 0.1), "lr2": ("lr", 2e-5),
            "fp32": ("mixed_precision", "no"), "alpha": ("alpha", 0.5)}


def teacher_of(run: Path) -> tuple[Path, dict[str, float]]:
    """The teacher model directory of a finished run and its dev metrics (task -> value) from ``report.json``."""
    from compressor.errors import CompressorError
    from compressor.rundir import RunDir, teacher

    run_dir = RunDir.finished(run)
    record = teacher(run_dir.records())
    if record is None:
        raise CompressorError(f"{run_dir.state_path}: no completed train or load stage (no teacher)")
    if not run_dir.report_json.is_file():
        raise CompressorError(f"{run_dir.report_json}: not found (the teacher's dev metrics are read from it)")
    rows = json.loads(run_dir.report_json.read_text(encoding="utf-8")).get("rows") or []
    dev = {r["task"]: float(r["value"]) for r in rows
           if r.get("model") == record.name and r.get("split") == "dev" and r.get("value") is not None}
    if not dev:
        raise CompressorError(f"{run_dir.report_json}: no dev rows of model '{record.name}'")
    return record.model_dir, dev


def recovery_settings(variant: str) -> dict[str, Any]:
    """The recovery fields a VARIANT changes (the model's own dropout unless it says drop0)."""
    words = variant.split("-")
    unknown = [w for w in words if w not in VARIANTS and w not in ("base", "raw", "long", "all")]
    if unknown:
        raise SystemExit(f"error: unknown variant word(s) {unknown} (known: {', '.join(VARIANTS)})")
    update: dict[str, Any] = {"dropout": None}
    update.update(dict(VARIANTS[w] for w in words if w in VARIANTS))
    return update


def run(args: argparse.Namespace) -> None:
    import torch

    from compressor.data.store import DataStore
    from compressor.model.architecture import encoder_layers
    from compressor.model.io import load_model
    from compressor.recipe import load_recipe, resolve_data_root
    from compressor.search.candidate import CandidateBuilder
    from compressor.search.space import Knobs

    recipe = load_recipe(args.recipe)
    stage = next((s for s in recipe.stages if s.kind == "search"), None)
    if stage is None:
        raise SystemExit(f"error: {args.recipe}: no search stage (its recovery settings are the baseline)")
    stage = stage.model_copy(update={"recovery": stage.recovery.model_copy(update=recovery_settings(args.variant))})
    model_dir, teacher_dev = teacher_of(args.teacher_run)
    data = DataStore(recipe.data_options(), resolve_data_root(recipe.data_root, args.data_root))
    data.fit_labels()
    teacher, tokenizer, _ = load_model(model_dir)
    layers = len(encoder_layers(teacher.encoder))
    torch.manual_seed(recipe.seed)
    builder = CandidateBuilder(stage, teacher, tokenizer, teacher, list(range(layers)), data, recipe.model.max_length,
                               teacher_dev, args.threads, recipe.seed)
    knobs = Knobs(layers, (args.head_ratio,) * layers, (args.ffn_ratio,) * layers, None, "none")
    start = time.time()
    model, kept = builder.build(knobs, recipe.seed)
    if args.steps:
        builder.recover(model, kept, args.steps, recipe.seed)
    after = builder.torch_dev(model, tokenizer)
    row = {"variant": args.variant, "ffn": args.ffn_ratio, "heads": args.head_ratio, "steps": args.steps,
           "teacher_run": str(args.teacher_run), "teacher_dev": teacher_dev, "after": after,
           "retention": builder.retention(after), "wall_s": round(time.time() - start)}
    print(json.dumps(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def table(lines: list[dict[str, Any]]) -> str:
    """The report's Markdown table: one row per measured variant, every task's retention and the worst."""
    if not lines:
        return ""
    tasks = list(lines[0]["retention"])
    out = ["| variant | ffn cut | head cut | steps | " + " | ".join(tasks) + " | worst |",
           "|---" * (len(tasks) + 5) + "|"]
    for r in lines:
        ret = r["retention"]
        out.append(f"| {r['variant']} | {r['ffn']:g} | {r['heads']:g} | {r['steps']} | "
                   + " | ".join(f"{ret[t]:.3f}" for t in tasks) + f" | {min(ret.values()):.3f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="cut, recover and score one variant; append a JSON line")
    r.add_argument("--recipe", type=Path, required=True, help="a recipe with a search stage (its recovery settings)")
    r.add_argument("--teacher-run", type=Path, required=True, help="the finished run that trained the teacher")
    r.add_argument("--out", type=Path, required=True, help="JSON lines file the result is appended to")
    r.add_argument("--data-root", type=Path, default=None)
    r.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads when scoring")
    r.add_argument("variant")
    r.add_argument("ffn_ratio", type=float)
    r.add_argument("head_ratio", type=float)
    r.add_argument("steps", type=int)
    t = sub.add_parser("table", help="print the JSON lines as the report's Markdown table")
    t.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    if args.command == "table":
        rows = [json.loads(line) for line in args.results.read_text(encoding="utf-8").splitlines() if line.strip()]
        print(table(rows))
        return 0
    from compressor.errors import CompressorError

    try:
        run(args)
    except CompressorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
