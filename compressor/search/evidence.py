"""The evidence of a search: one row per trained trial, the trial table (Markdown, JSON) and the Pareto plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def trial_rows(study: Any, floors: Mapping[str, float], objective: str) -> list[dict[str, Any]]:
    """Every trained trial (completed or early-stopped; not duplicates or failures) as a table row."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED) or "duplicate_of" in t.user_attrs:
            continue
        a = t.user_attrs
        retention = a.get("retention") or {}
        margins = {k: retention[k] - floors[k] for k in floors if k in retention}
        early = t.state == TrialState.PRUNED
        passed = (not early) and len(margins) == len(floors) and all(m >= 0 for m in margins.values())
        rows.append({
            "trial": t.number, "status": "early-stopped" if early else ("pass" if passed else "fail"),
            "passed": passed, "knobs": a.get("knobs"), "describe": a.get("describe"),
            "scores": a.get("scores"), "retention": retention,
            "worst_retention": min(retention.values()) if retention else None,
            "worst_margin": min(margins.values()) if margins else None,
            "failing": sorted(k for k, m in margins.items() if m < 0),
            "latency_ms": a.get("latency_ms"), "latency_p95_ms": a.get("latency_p95_ms"),
            "size_bytes": a.get("size_bytes"), "params": a.get("params"), "vocab_size": a.get("vocab_size"),
            "seconds": round(float(a.get("seconds", 0.0)), 1), "retry_of": a.get("retry_of"),
        })
    return rows


def objective_value(row: Mapping[str, Any], objective: str) -> float:
    return float(row["latency_ms"] if objective == "latency" else row["size_bytes"])


def choose(rows: Sequence[Mapping[str, Any]], objective: str) -> tuple[dict | None, dict | None]:
    """(the best passing trial by the objective, then worst margin; the best near miss when none passes)."""
    passing = [r for r in rows if r["passed"]]
    if passing:
        other = "size_bytes" if objective == "latency" else "latency_ms"
        return dict(min(passing, key=lambda r: (objective_value(r, objective), -r["worst_margin"], r[other],
                                                r["trial"]))), None
    scored = [r for r in rows if r["worst_margin"] is not None]
    if not scored:
        return None, None
    # completed trials first (their numbers are final), then the highest worst-task margin
    near = max(scored, key=lambda r: (r["status"] != "early-stopped", r["worst_margin"], -r["trial"]))
    return None, dict(near)


def markdown_table(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str], floors: Mapping[str, float],
                   chosen: int | None) -> str:
    head = ["trial", "status", "knobs"] + [f"{t} dev (ret.)" for t in tasks] + ["worst ret.", "latency p50 (ms)",
                                                                               "size (MB)", "params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mark = " (chosen)" if r["trial"] == chosen else ""
        cells = [f"{r['trial']}{mark}", r["status"], r.get("describe") or "-"]
        for t in tasks:
            s, ret = (r.get("scores") or {}).get(t), (r.get("retention") or {}).get(t)
            cells.append("-" if s is None else f"{s:.4f} ({ret:.3f}{'' if ret >= floors[t] else ' <'})")
        cells.append("-" if r["worst_retention"] is None else f"{r['worst_retention']:.3f}")
        cells.append("-" if r["latency_ms"] is None else f"{r['latency_ms']:.2f}")
        cells.append("-" if r["size_bytes"] is None else f"{r['size_bytes'] / 1e6:.2f}")
        cells.append("-" if r["params"] is None else f"{r['params']:,}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def pareto_figure(rows: Sequence[Mapping[str, Any]], floors: Mapping[str, float], chosen: int | None, title: str,
                  target: float | None = None) -> Any:
    """The Pareto figure: latency and size against the worst task's dev retention, every trained trial drawn.

    Pass / fail / early-stopped trials get their own markers; a trial without a latency or size (stopped before
    it was measured) sits on the panel's bottom edge at its retention (hollow marker), and one without any dev
    score is listed under the panels. The floor(s) are dashed lines, the report's retention target a dotted one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    styles = {"pass": ("tab:green", "o"), "fail": ("tab:red", "x"), "early-stopped": ("tab:gray", "v")}
    unscored = [r["trial"] for r in rows if r["worst_retention"] is None]
    for ax, key, label in ((axes[0], "latency_ms", "ONNX Runtime latency p50 (ms), batch 1, 1 thread"),
                           (axes[1], "size_bytes", "size on disk (MB)")):
        scale = 1e-6 if key == "size_bytes" else 1.0
        edge = blended_transform_factory(ax.transData, ax.transAxes)
        for status, (color, marker) in styles.items():
            mine = [r for r in rows if r["status"] == status and r["worst_retention"] is not None]
            pts = [(r["worst_retention"], r[key] * scale) for r in mine if r[key] is not None]
            if pts:
                ax.scatter(*zip(*pts), c=color, marker=marker, label=f"{status} ({len(pts)})", alpha=0.8)
            low = [r["worst_retention"] for r in mine if r[key] is None]
            if low:
                ax.scatter(low, [0.02] * len(low), transform=edge, marker=marker, facecolors="none",
                           edgecolors=color, label=f"{status}, not measured ({len(low)}; bottom edge)", clip_on=False)
        pick = next((r for r in rows if r["trial"] == chosen), None)
        if pick is not None and pick[key] is not None:
            ax.scatter([pick["worst_retention"]], [pick[key] * scale], s=260, facecolors="none",
                       edgecolors="black", linewidths=2, label=f"chosen (trial {chosen})")
        for i, floor in enumerate(sorted(set(floors.values()))):
            ax.axvline(floor, color="tab:blue", linestyle="--", linewidth=1, label="floor" if i == 0 else None)
        if target is not None:
            ax.axvline(target, color="tab:purple", linestyle=":", linewidth=1.5, label=f"target {target:g}")
        ax.set_xlabel("worst task's dev retention (vs teacher)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    counts = ", ".join(f"{sum(r['status'] == s for r in rows)} {s}" for s in styles)
    fig.suptitle(f"{title}: {len(rows)} trial(s) ({counts})")
    if unscored:
        fig.text(0.01, 0.01, "no dev score (not placed): trial(s) " + ", ".join(map(str, unscored)), fontsize=8)
    fig.tight_layout(rect=(0, 0.04 if unscored else 0, 1, 1))
    return fig


def pareto_plot(rows: Sequence[Mapping[str, Any]], floors: Mapping[str, float], chosen: int | None, path: Path,
                title: str, target: float | None = None) -> Path:
    """Write :func:`pareto_figure` as a PNG."""
    import matplotlib.pyplot as plt

    fig = pareto_figure(rows, floors, chosen, title, target)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
