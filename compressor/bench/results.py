"""Benchmark rows (one per model and task), ratios against (a) and (c), and the product's targets.

Row keys: ``id`` (a, b, c, d, e-fp32, e-int8), ``label``, ``format``, ``task``, ``split``, ``metric``,
``higher_is_better``, ``value``, ``metrics``, ``retention`` (value / (a)'s; (a)'s / value when lower is better),
``retention_interval`` (the paired-bootstrap interval of ``1 - relative drop`` against (a) on the same test
examples, which is the retention when higher is better: ``{low, high, confidence, samples}``; None for (a)),
``size_bytes``, ``params``, ``integer_matmuls``, ``real_n``, ``real_mean_length``, the timing keys of
:mod:`compressor.bench.timing` per thread count, ``vs_a`` and ``vs_c`` ({key: row[key] / reference[key]} for
every key in :func:`ratio_keys`) and ``points_vs_a`` / ``points_vs_c`` (100 x how much better the metric is;
negative = worse).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from compressor.bench.timing import MODEL_KEYS, TASK_KEYS, key
from compressor.recipe import Targets

ORDER = ("a", "b", "c", "d", "e-fp32", "e-int8")


def ratio_keys(threads: Sequence[int]) -> list[str]:
    return ["value", "size_bytes", "params", *(key(k, t) for t in threads for k in (*MODEL_KEYS, *TASK_KEYS))]


def retention(value: float, ref: float, higher_is_better: bool) -> float | None:
    """:func:`compressor.tasks.retention`, shown as None (not a number) where it would divide by zero."""
    from compressor.tasks import retention as shared

    return shared(value, ref, higher_is_better) if (ref if higher_is_better else value) else None


def points_better(value: float, ref: float, higher_is_better: bool) -> float:
    return 100.0 * ((value - ref) if higher_is_better else (ref - value))


def _ratios(row: Mapping[str, Any], ref: Mapping[str, Any] | None, keys: Sequence[str]) -> dict[str, float | None]:
    if ref is None:
        return {}
    out: dict[str, float | None] = {}
    for k in keys:
        v, r = row.get(k), ref.get(k)
        out[k] = (v / r) if v is not None and r else None
    return out


def build_rows(models: Mapping[str, Mapping[str, Any]], threads: Sequence[int]) -> list[dict[str, Any]]:
    """Rows from measured models: ``{id: {label, format, size_bytes, params, integer_matmuls, timings,
    tasks: {task: {split, metric, higher_is_better, value, metrics, real_n, real_mean_length, timings}}}}``."""
    rows: list[dict[str, Any]] = []
    for mid in [m for m in ORDER if m in models]:
        m = models[mid]
        for task, t in m["tasks"].items():
            rows.append({
                "id": mid, "label": m["label"], "format": m["format"], "task": task, "split": t["split"],
                "metric": t["metric"], "higher_is_better": t["higher_is_better"], "value": t["value"],
                "metrics": t["metrics"], "size_bytes": m["size_bytes"], "params": m["params"],
                "integer_matmuls": m.get("integer_matmuls"), "real_n": t["real_n"],
                "real_mean_length": t["real_mean_length"], "retention_interval": t.get("retention_interval"),
                **m["timings"], **t["timings"],
            })
    keys = ratio_keys(threads)
    by = {(r["id"], r["task"]): r for r in rows}
    for r in rows:
        a, c = by.get(("a", r["task"])), by.get(("c", r["task"]))
        hib = r["higher_is_better"]
        r["retention"] = retention(r["value"], a["value"], hib) if a else None
        r["points_vs_a"] = points_better(r["value"], a["value"], hib) if a else None
        r["points_vs_c"] = points_better(r["value"], c["value"], hib) if c else None
        r["vs_a"] = _ratios(r, a, keys)
        r["vs_c"] = _ratios(r, c, keys)
    return rows


def _pick(rows: Sequence[Mapping[str, Any]], mid: str) -> list[Mapping[str, Any]]:
    return [r for r in rows if r["id"] == mid]


def _target(tid: str, text: str, met: bool | None, measured: Any, detail: str) -> dict[str, Any]:
    return {"id": tid, "target": text, "met": met, "measured": measured, "detail": detail}


def check_targets(rows: Sequence[Mapping[str, Any]], threads: Sequence[int], seq_len: int,
                  targets: Targets | None = None) -> list[dict[str, Any]]:
    """The targets (the recipe's ``report.targets``) for the INT8 student (e-int8), from the measured rows.

    ``met`` is None when a needed row or measurement is absent (``detail`` says which).
    """
    tg = targets or Targets()
    a, b, c, e = (_pick(rows, m) for m in ("a", "b", "c", "e-int8"))
    seq_note = "" if seq_len == 128 else f" (measured at sequence {seq_len}, not 128)"
    out = [_size_target(tg, a, e), _latency_target(tg, b, e, threads, seq_note), _retention_target(tg, a, e),
           _vs_c_target(tg, c, e, threads, seq_len)]
    d = _pick(rows, "d")
    if d:
        out.append(_vs_d_target(tg, d, e))
    return out


def _size_target(tg: Targets, a: Sequence[Mapping[str, Any]], e: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Size on disk of e-int8 against (a)."""
    text = f">= {tg.size_x:g}x smaller on disk than the teacher's fp32 weights"
    if a and e:
        x = a[0]["size_bytes"] / e[0]["size_bytes"]
        detail = (f"{x:.2f}x ({a[0]['size_bytes'] / 1e6:.2f} MB -> {e[0]['size_bytes'] / 1e6:.2f} MB)"
                  + ("" if x >= tg.size_x else f"; missed by {tg.size_x - x:.2f}x "
                     f"({100 * (1 - x / tg.size_x):.1f}% short)"))
        return _target("size", text, x >= tg.size_x, x, detail)
    return _target("size", text, None, None, "not measured: the run has no INT8 student (quantize stage)")


def _latency_target(tg: Targets, b: Sequence[Mapping[str, Any]], e: Sequence[Mapping[str, Any]],
                    threads: Sequence[int], seq_note: str) -> dict[str, Any]:
    """Batch-1, 1-thread p50 latency of e-int8 against (b)."""
    text = f">= {tg.latency_x:g}x lower ONNX Runtime p50 latency than (b) at batch 1, sequence 128, 1 thread"
    k1 = key("latency_seq_p50_ms", 1)
    if 1 not in threads:
        return _target("latency", text, None, None, "not measured: 1 thread is not among --threads")
    if b and e:
        x = b[0][k1] / e[0][k1]
        detail = (f"{x:.2f}x ({b[0][k1]:.2f} ms -> {e[0][k1]:.2f} ms){seq_note}"
                  + ("" if x >= tg.latency_x else f"; missed by {tg.latency_x - x:.2f}x "
                     f"({100 * (1 - x / tg.latency_x):.1f}% short)"))
        return _target("latency", text, x >= tg.latency_x, x, detail)
    return _target("latency", text, None, None, "not measured: the run has no INT8 student")


def _retention_target(tg: Targets, a: Sequence[Mapping[str, Any]],
                      e: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Metric retention of e-int8 against (a), on every task."""
    text = f">= {100 * tg.retention:g}% of the teacher's metric on every task"
    if a and e:
        per = {r["task"]: r["retention"] for r in e}
        worst = min(per, key=lambda t: per[t] if per[t] is not None else float("-inf"))
        met = all(v is not None and v >= tg.retention - 1e-12 for v in per.values())
        parts = ", ".join(f"{t} {100 * v:.1f}%" if v is not None else f"{t} undefined (teacher metric 0)"
                          for t, v in per.items())
        detail = parts + ("" if met else "; missed on " + ", ".join(
            f"{t} by {100 * (tg.retention - v):.1f} points of retention" if v is not None else t
            for t, v in per.items() if v is None or v < tg.retention - 1e-12))
        return _target("retention", text, met, per[worst], detail)
    return _target("retention", text, None, None, "not measured: the run has no INT8 student")


def _vs_c_target(tg: Targets, c: Sequence[Mapping[str, Any]], e: Sequence[Mapping[str, Any]],
                 threads: Sequence[int], seq_len: int) -> dict[str, Any]:
    """Size, speed and metric of e-int8 against (c), optimum's dynamic INT8 teacher."""
    text = (f">= {tg.size_vs_c:g}x smaller and >= {tg.latency_vs_c:g}x faster than (c) (optimum dynamic INT8 "
            f"teacher) and at most {tg.points_vs_c:g} point worse on any task")
    if not (c and e):
        return _target("vs_c", text, None, None, "not measured: the run has no INT8 student")
    size_x = c[0]["size_bytes"] / e[0]["size_bytes"]
    speed = {t: c[0][key("latency_seq_p50_ms", t)] / e[0][key("latency_seq_p50_ms", t)] for t in threads}
    points = {r["task"]: r["points_vs_c"] for r in e}
    ok_size = size_x >= tg.size_vs_c - 1e-12
    ok_speed = all(x >= tg.latency_vs_c - 1e-12 for x in speed.values())
    ok_points = all(p >= -tg.points_vs_c - 1e-9 for p in points.values())
    parts = [f"size {size_x:.2f}x smaller" + ("" if ok_size else f" (missed by {tg.size_vs_c - size_x:.2f}x)")]
    for t, x in speed.items():
        parts.append(f"{t} thread(s): {x:.2f}x faster" + ("" if x >= tg.latency_vs_c - 1e-12
                                                         else f" (missed by {tg.latency_vs_c - x:.2f}x)"))
    for t, p in points.items():
        parts.append(f"{t} {p:+.2f} points vs (c)" + ("" if p >= -tg.points_vs_c - 1e-9
                                                      else f" (missed by {-p - tg.points_vs_c:.2f} points)"))
    return _target("vs_c", text, ok_size and ok_speed and ok_points,
                   {"size_x": size_x, "speed_x": {str(t): x for t, x in speed.items()}, "points": points},
                   "; ".join(parts) + f" (latency at batch 1, sequence {seq_len})")


def _vs_d_target(tg: Targets, d: Sequence[Mapping[str, Any]], e: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Size and metric of e-int8 against the single-task students (d) together."""
    text = (f"at most {tg.size_vs_d:g}x the total size of the single-task students (d) and at most {tg.points_vs_d:g} "
            "point worse than each on its own task")
    if not e:
        return _target("vs_d", text, None, None, "not measured: the run has no INT8 student")
    share = e[0]["size_bytes"] / d[0]["size_bytes"]
    d_by = {r["task"]: r for r in d}
    points = {r["task"]: points_better(r["value"], d_by[r["task"]]["value"], r.get("higher_is_better", True))
              for r in e if r["task"] in d_by}
    ok_size = share <= tg.size_vs_d + 1e-12
    ok_points = all(p >= -tg.points_vs_d - 1e-9 for p in points.values())
    parts = [f"size {share:.2f}x of (d) ({e[0]['size_bytes'] / 1e6:.2f} MB vs {d[0]['size_bytes'] / 1e6:.2f} "
             "MB)" + ("" if ok_size else f"; missed by {share - tg.size_vs_d:.2f}x")]
    parts += [f"{t} {p:+.2f} points vs its single-task student"
              + ("" if p >= -tg.points_vs_d - 1e-9 else f" (missed by {-p - tg.points_vs_d:.2f} points)")
              for t, p in points.items()]
    return _target("vs_d", text, ok_size and ok_points, {"size_share": share, "points": points}, "; ".join(parts))
