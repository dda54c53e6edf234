"""``compressor benchmark`` on a tiny run (teacher -> distill -> prune_vocab -> export -> quantize) and two tiny
single-task students (a run with an INT8 graph, and a bare model directory that the benchmark exports)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from compressor.bench.results import build_rows, check_targets, ratio_keys
from compressor.bench.timing import MODEL_KEYS, TASK_KEYS, combine, key
from compressor.cli.bench import benchmark
from compressor.cli.main import guarded
from compressor.pipeline import run_recipe
from test_pipeline import PIPE, recipe_text, tiny_model_path  # noqa: F401 (session fixture)

THREADS = (1, 2)
PNG = b"\x89PNG\r\n\x1a\n"

app = typer.Typer()
app.command()(guarded(benchmark))


def _single_recipe(model_path: Path, task: str, stages: str) -> str:
    data = {"ner": "plugin: ner\n    format: conll\n    data: {train: ner.train.conll, dev: ner.dev.conll, "
                   "test: ner.test.conll}",
            "sst": "plugin: classification\n    format: label_text\n    data: {train: sst.train.txt, dev: sst.dev.txt, "
                   "test: sst.test.txt}"}[task]
    return f"""\
name: single-{task}
seed: 3
data_root: {PIPE}
model: {{encoder: {model_path}, max_length: 32}}
tasks:
  - name: {task}
    {data}
stages:
  - {{kind: train, name: teacher, epochs: 1, batch_size: 8, lr: 3.0e-3, warmup_ratio: 0.0, baselines: false}}
{stages}
report: {{latency: false}}
"""


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_model_path):
    tmp = tmp_path_factory.mktemp("bench")
    chain = recipe_text(tiny_model_path, epochs=1, baselines=False).replace("report:", """\
  - {kind: distill, student: {from_teacher: {layers: 1}}, epochs: 1, batch_size: 8, lr: 3.0e-3,
     single_task_students: true}
  - {kind: prune_vocab}
  - {kind: export}
  - {kind: quantize, tolerance: 1.0}
report:""")
    runs = {}
    for name, text in (("chain", chain),
                       ("ner", _single_recipe(tiny_model_path, "ner", "  - {kind: export}\n  - {kind: quantize, "
                                                                       "tolerance: 1.0}")),
                       ("sst", _single_recipe(tiny_model_path, "sst", ""))):
        recipe = tmp / f"{name}.yaml"
        recipe.write_text(text)
        runs[name] = run_recipe(recipe, out=tmp / name, log=lambda _: None)
    sst_model = runs["sst"] / "stages" / "00-teacher" / "model"  # a bare model dir: the benchmark exports it
    out = tmp / "reports" / "bench"
    args = [str(runs["chain"]), "--out", str(out), "--single", str(runs["ner"]), "--single", str(sst_model),
            "--runs", "2", "--min-seconds", "0.05", "--batch", "4", "--seq-len", "32", "--samples", "8"]
    for t in THREADS:
        args += ["--threads", str(t)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(Path(f"{out}.json").read_text())
    return {"out": out, "data": data, "runs": runs, "stdout": result.output,
            "rows": {(r["id"], r["task"]): r for r in data["rows"]}}


def test_rows_for_every_model_and_task_with_every_field(bench):
    rows = bench["rows"]
    timing_keys = [key(k, t) for t in THREADS for k in (*MODEL_KEYS, *TASK_KEYS)]
    for mid in ("a", "b", "c", "d", "e-fp32", "e-int8"):
        for task in ("ner", "sst"):
            r = rows[(mid, task)]
            assert r["split"] == "test" and r["metric"] == {"ner": "f1", "sst": "accuracy"}[task]
            assert 0.0 <= r["value"] <= 1.0 and r["metrics"][r["metric"]] == r["value"]
            assert r["size_bytes"] > 0 and r["params"] > 0
            assert r["real_n"] == 8 and r["real_mean_length"] > 2
            for k in timing_keys:
                assert r[k] is not None and r[k] > 0, (mid, task, k)
            assert r[key("latency_seq_p95_ms", 1)] >= r[key("latency_seq_p50_ms", 1)]
    assert len(bench["data"]["rows"]) == 12
    assert bench["data"]["settings"]["threads"] == list(THREADS)


def test_onnx_teacher_scores_exactly_like_pytorch(bench):
    for task in ("ner", "sst"):
        a, b = bench["rows"][("a", task)], bench["rows"][("b", task)]
        assert a["metrics"].keys() == b["metrics"].keys()
        for name, value in a["metrics"].items():
            assert b["metrics"][name] == pytest.approx(value, abs=1e-9)
        assert b["params"] == pytest.approx(a["params"], rel=1e-3)  # same weights, in ONNX initializers


def test_quantized_rows_hold_integer_matmuls_and_shrink(bench):
    models = bench["data"]["models"]
    assert models["c"]["integer_matmuls"] > 0 and models["e-int8"]["integer_matmuls"] > 0
    assert models["d"]["integer_matmuls"] is None  # the exported sst model is fp32
    assert models["c"]["size_bytes"] < models["b"]["size_bytes"] / 2
    assert models["e-int8"]["size_bytes"] < models["e-fp32"]["size_bytes"]
    assert models["e-fp32"]["params"] < models["b"]["params"]  # distilled to one layer, vocabulary pruned


def test_user_int8_of_the_teacher_is_real_integer_arithmetic(tmp_path, tiny_model_path, bench):
    from compressor.bench.candidates import export_checked, parity_batches, task_inputs
    from compressor.data.store import DataStore
    from compressor.export.onnx_export import graph_spec
    from compressor.export.quantize import integer_matmuls, integer_op_counts
    from compressor.model.io import load_model
    from compressor.recipe import load_recipe

    run = bench["runs"]["chain"]
    model, tok, manifest = load_model(run / "stages" / "00-teacher" / "model")
    spec = graph_spec(model, manifest["max_length"])
    data = DataStore(load_recipe(run / "recipe.yaml").data_options(), PIPE)
    inputs = task_inputs(model.tasks, data, tok, spec.max_length, samples=4, batch=2)
    fp32, notes = export_checked(model, spec, parity_batches(model.tasks, inputs), tmp_path / "b", threads=1)
    assert fp32.is_file() and any("parity" in n for n in notes)
    from compressor.export.reference import optimum_int8

    int8, n, _ = optimum_int8(fp32, tmp_path / "c", "avx2")
    counts = integer_op_counts(int8)
    assert n == integer_matmuls(counts) > 0 and counts.get("DynamicQuantizeLinear", 0) > 0
    assert n == bench["data"]["models"]["c"]["integer_matmuls"]  # the benchmark's (c) is this graph


def test_ratios_are_value_over_reference(bench):
    rows = bench["rows"]
    keys = ratio_keys(THREADS)
    for (mid, task), r in rows.items():
        for ref_id, field in (("a", "vs_a"), ("c", "vs_c")):
            ref = rows[(ref_id, task)]
            assert set(r[field]) == set(keys)
            for k in keys:
                if ref[k]:
                    assert r[field][k] == pytest.approx(r[k] / ref[k], rel=1e-12), (mid, task, k)
                else:
                    assert r[field][k] is None
        a = rows[("a", task)]
        assert r["points_vs_a"] == pytest.approx(100 * (r["value"] - a["value"]))
        assert r["retention"] == (pytest.approx(r["value"] / a["value"]) if a["value"] else None)
    assert all(rows[("a", t)]["vs_a"]["size_bytes"] == 1.0 for t in ("ner", "sst"))


def test_retention_has_a_paired_bootstrap_interval_on_the_same_test_examples(bench):
    rows = bench["rows"]
    for (mid, task), r in rows.items():
        ci = r["retention_interval"]
        if mid == "a" or not rows[("a", task)]["value"]:
            assert ci is None
            continue
        assert ci["samples"] == 1000 and ci["confidence"] == 0.95
        # the point retention lies in (or at the edge of) its percentile interval of resampled retentions
        assert ci["low"] <= ci["high"]
        assert ci["low"] - 0.02 <= r["retention"] <= ci["high"] + 0.02, (mid, task, r["retention"], ci)
    for task in ("ner", "sst"):
        if rows[("a", task)]["value"]:
            # (b) predicts exactly what (a) does, so every resample scores both alike: no drop, no width
            ci = rows[("b", task)]["retention_interval"]
            assert ci["low"] == pytest.approx(1.0) and ci["high"] == pytest.approx(1.0)
    md = Path(f"{bench['out']}.md").read_text()
    assert "retention vs (a) [95% interval]" in md and "100.0% [100.0, 100.0]" in md


def test_single_task_row_sums_its_models(bench):
    d = bench["data"]["models"]["d"]
    parts = d["parts"]
    assert len(parts) == 2 and {p["format"] for p in parts} == {"onnx-int8", "onnx"}
    assert d["size_bytes"] == sum(p["size_bytes"] for p in parts)
    assert d["params"] == sum(p["params"] for p in parts)
    for task in ("ner", "sst"):
        row = bench["rows"][("d", task)]
        assert row["size_bytes"] == d["size_bytes"]
        for t in THREADS:
            k = key("latency_seq_p50_ms", t)
            assert row[k] == pytest.approx(sum(p["timings"][k] for p in parts))
            k = key("throughput_seq", t)
            assert row[k] == pytest.approx(1 / sum(1 / p["timings"][k] for p in parts))


def test_targets_follow_the_measured_numbers(bench):
    rows, targets = bench["rows"], {t["id"]: t for t in bench["data"]["targets"]}
    a, b, c, e = (rows[(m, "sst")] for m in ("a", "b", "c", "e-int8"))
    size_x = a["size_bytes"] / e["size_bytes"]
    assert targets["size"]["measured"] == pytest.approx(size_x)
    assert targets["size"]["met"] == (size_x >= 10)
    lat_x = b[key("latency_seq_p50_ms", 1)] / e[key("latency_seq_p50_ms", 1)]
    assert targets["latency"]["measured"] == pytest.approx(lat_x) and targets["latency"]["met"] == (lat_x >= 6)
    assert targets["vs_c"]["measured"]["size_x"] == pytest.approx(c["size_bytes"] / e["size_bytes"])
    assert set(targets) == {"size", "latency", "retention", "vs_c", "vs_d"}
    d = rows[("d", "sst")]
    assert targets["vs_d"]["measured"]["size_share"] == pytest.approx(e["size_bytes"] / d["size_bytes"])
    assert targets["vs_d"]["measured"]["points"]["sst"] == pytest.approx(100 * (e["value"] - d["value"]))
    for t in targets.values():
        assert ("met" if t["met"] else "MISSED") in bench["stdout"]


def test_report_files_plots_and_machine(bench):
    from compressor.report.machine import describe_machine

    out = bench["out"]
    for suffix in ("-metric-vs-latency.png", "-metric-vs-size.png"):
        png = Path(f"{out}{suffix}")
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000
    md = Path(f"{out}.md").read_text()
    import onnxruntime

    assert str(describe_machine()["processor"]) in md and f"ONNX Runtime {onnxruntime.__version__}" in md
    assert "threads: 1, 2" in md and "| e-int8 |" in md and "Row (d) serves every task" in md
    assert "## Targets" in md
    assert not any(p.name.startswith(".benchmark-") for p in bench["runs"]["chain"].iterdir())  # temp dir removed


def test_edge_footprint_of_teacher_graph_and_int8_student_in_torch_free_processes(bench):
    fp = bench["data"]["footprint"]
    assert set(fp) == {"b", "e-int8"}
    for f in fp.values():
        assert f["heavy_modules"] == [] and f["predictions"] == 100 and f["threads"] == 1
        assert 0 < f["rss_after_import_mib"] <= f["rss_after_load_mib"] <= f["peak_rss_mib"]
    md = Path(f"{bench['out']}.md").read_text()
    assert "## Edge footprint" in md and "Peak resident memory: e-int8" in md


def test_footprint_requests_take_real_texts_in_turn_from_every_task():
    from compressor.bench.footprint import requests_from

    class Data:
        ex = {"ner": [{"tokens": ["Anna", "works"]}, {"tokens": ["Bo"]}], "qa": [{"context": "C", "question": "Q?"}],
              "cls": [{"text": "  "}, {"text": "fine"}]}

        def has(self, task, split):
            return split == "test"

        def examples(self, task, split):
            return self.ex[task]

    assert requests_from(Data(), ["ner", "qa", "cls"]) == [
        {"text": "Anna works"}, {"text": "C", "question": "Q?"}, {"text": "fine"}, {"text": "Bo"}]
    assert requests_from(Data(), ["ner", "qa", "cls"], n=2) == [{"text": "Anna works"}, {"text": "C", "question": "Q?"}]


def test_without_singles_the_report_says_row_d_is_absent(bench):
    from compressor.bench.render import render_markdown

    data = dict(bench["data"])
    data["rows"] = [r for r in data["rows"] if r["id"] != "d"]
    data["models"] = {k: v for k, v in data["models"].items() if k != "d"}
    md = render_markdown(data)
    assert "Row (d) is absent: no single-task students were given" in md and "| d |" not in md


def _row(mid: str, task: str, value: float, size: int, lat: float) -> dict:
    timings = {key(k, 1): lat for k in (*MODEL_KEYS, *TASK_KEYS)}
    return {"label": mid, "format": "onnx", "size_bytes": size, "params": size, "timings": timings,
            "tasks": {task: {"split": "test", "metric": "f1", "higher_is_better": True, "value": value,
                             "metrics": {"f1": value}, "real_n": 1, "real_mean_length": 5.0, "timings": {}}}}


def test_targets_say_by_how_much_they_are_missed():
    models = {"a": _row("a", "t", 0.90, 1000, 10.0), "b": _row("b", "t", 0.90, 1000, 8.0),
              "c": _row("c", "t", 0.89, 250, 4.0), "e-int8": _row("e-int8", "t", 0.86, 200, 2.0)}
    targets = {t["id"]: t for t in check_targets(build_rows(models, [1]), [1], 128)}
    assert targets["size"]["met"] is False and targets["size"]["measured"] == pytest.approx(5.0)
    assert "missed by 5.00x (50.0% short)" in targets["size"]["detail"]
    assert targets["latency"]["met"] is False and "missed by 2.00x" in targets["latency"]["detail"]
    assert targets["retention"]["met"] is False and targets["retention"]["measured"] == pytest.approx(0.86 / 0.9)
    assert "by 1.4 points of retention" in targets["retention"]["detail"]
    assert targets["vs_c"]["met"] is False  # 1.25x smaller and 2x faster (targets 2.5x), and 3 points worse than (c)
    assert "missed by 2.00 points" in targets["vs_c"]["detail"]
    assert "size 1.25x smaller (missed by 1.25x)" in targets["vs_c"]["detail"]
    assert "1 thread(s): 2.00x faster (missed by 0.50x)" in targets["vs_c"]["detail"]
    models["e-int8"] = _row("e-int8", "t", 0.885, 90, 1.0)
    targets = {t["id"]: t for t in check_targets(build_rows(models, [1]), [1], 128)}
    assert all(targets[k]["met"] for k in ("size", "latency", "retention", "vs_c"))
    assert "vs_d" not in targets  # no single-task students, no P3
    models["d"] = _row("d", "t", 0.895, 200, 3.0)  # four singles: 200 bytes together, 1 point better
    targets = {t["id"]: t for t in check_targets(build_rows(models, [1]), [1], 128)}
    assert targets["vs_d"]["met"] is False and targets["vs_d"]["measured"]["size_share"] == pytest.approx(0.45)
    assert "missed by 0.15x" in targets["vs_d"]["detail"] and "missed by 0.50 points" in targets["vs_d"]["detail"]
    models["d"] = _row("d", "t", 0.888, 400, 3.0)
    targets = {t["id"]: t for t in check_targets(build_rows(models, [1]), [1], 128)}
    assert targets["vs_d"]["met"] is True


def test_serving_with_several_models_adds_latencies_and_per_example_times():
    both = combine([{"latency_seq_p50_ms_t1": 2.0, "throughput_seq_t1": 100.0},
                    {"latency_seq_p50_ms_t1": 3.0, "throughput_seq_t1": 300.0}])
    assert both["latency_seq_p50_ms_t1"] == 5.0
    assert both["throughput_seq_t1"] == pytest.approx(75.0)  # 1 / (1/100 + 1/300)
    assert combine([{"x": 1.0}, {"x": None}])["x"] is None


def test_not_a_run_directory_exits_2(tmp_path):
    result = CliRunner().invoke(app, [str(tmp_path), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "state.json" in result.output


def test_a_single_task_twin_is_for_the_task_nothing_else_requires():
    from compressor.bench.benchmark import own_task
    from compressor.tasks import build_task

    ner = build_task("ner", "ner", ["Per", "Org"])
    rel = build_task("relation", "re", ["works_for"], {"entity_task": "ner"})
    assert own_task({"ner": ner, "re": rel}) == "re"  # recipe order: entity task first
    assert own_task({"re": rel, "ner": ner}) == "re"  # twin order: own task first
    assert own_task({"ner": ner}) == "ner"


def test_without_single_the_runs_own_single_task_students_are_row_d(bench, tmp_path):
    from compressor.bench.benchmark import run_benchmark
    from compressor.bench.sources import read_run

    run = bench["runs"]["chain"]
    src = read_run(run)
    distill = run / "stages" / "01-distill"
    assert src.singles == {"ner": distill / "single-ner", "sst": distill / "single-sst"}
    assert src.singles_stage == "distill"
    paths = run_benchmark(run, tmp_path / "b", threads=[1], batch=2, runs=1, seq_len=16, samples=2,
                          log=lambda _: None)
    data = json.loads(paths["json"].read_text())
    d = data["models"]["d"]
    # the report names the run's models relative to the run (no build-machine paths)
    assert [p["source"].split(" ")[0] for p in d["parts"]] == [str(src.singles[t].relative_to(run)) for t in ("ner", "sst")]
    assert {r["task"] for r in data["rows"] if r["id"] == "d"} == {"ner", "sst"}
    assert any("single-task students of distill stage 'distill'" in n for n in data["notes"])
    assert any(t["id"] == "vs_d" for t in data["targets"])


def test_a_reference_stage_writes_b_and_c_into_the_run_and_the_benchmark_measures_those(tmp_path,
                                                                                         tiny_model_path):
    from compressor.bench.benchmark import run_benchmark
    from compressor.export.quantize import integer_matmuls, integer_op_counts

    recipe = tmp_path / "ref.yaml"
    recipe.write_text(recipe_text(tiny_model_path, epochs=1, baselines=False).replace("report:", """\
  - {kind: reference, target: avx2}
  - {kind: distill, student: {from_teacher: {layers: 1}}, epochs: 1, batch_size: 8, lr: 3.0e-3}
  - {kind: export}
report:"""))
    run = run_recipe(recipe, out=tmp_path / "run", log=lambda _: None)
    stage = run / "stages" / "01-reference"
    assert sorted(p.name for p in stage.iterdir()) == ["graph.json", "teacher.int8.onnx", "teacher.onnx"]
    n_int = integer_matmuls(integer_op_counts(stage / "teacher.int8.onnx"))
    assert n_int > 0 and (stage / "teacher.int8.onnx").stat().st_size < (stage / "teacher.onnx").stat().st_size / 2
    report = json.loads((run / "report.json").read_text())
    rows = {(r["model"], r["task"], r["split"]): r for r in report["rows"]}
    for task in ("ner", "sst"):
        for split in ("dev", "test"):
            assert rows[("reference", task, split)]["format"] == "onnx"
            assert rows[("reference-int8", task, split)]["format"] == "onnx-int8"
            # the fp32 export scores like the PyTorch teacher it came from
            assert rows[("reference", task, split)]["value"] == pytest.approx(rows[("teacher", task, split)]["value"],
                                                                            abs=1e-9)
    state = json.loads((run / "state.json").read_text())
    ref_record = next(s for s in state["completed"] if s["name"] == "reference")
    assert ref_record.get("model_dir") is None  # the reference stage hands no model on
    paths = run_benchmark(run, tmp_path / "b", threads=[1], batch=2, runs=1, seq_len=16, samples=4,
                          log=lambda _: None)
    data = json.loads(paths["json"].read_text())
    assert str((stage / "teacher.onnx").relative_to(run)) in data["models"]["b"]["source"]
    assert str((stage / "teacher.int8.onnx").relative_to(run)) in data["models"]["c"]["source"]
    assert str(run) not in paths["json"].read_text()
    assert data["models"]["c"]["integer_matmuls"] == n_int and data["settings"]["quantization_target"] == "avx2"
    bench_rows = {(r["id"], r["task"]): r for r in data["rows"]}
    for task in ("ner", "sst"):  # the same graphs on the same test data: the same metric
        for mid, model in (("b", "reference"), ("c", "reference-int8")):
            assert bench_rows[(mid, task)]["value"] == pytest.approx(rows[(model, task, "test")]["value"], abs=1e-9)


def test_targets_come_from_the_recipe():
    from compressor.recipe import Targets

    models = {"a": _row("a", "t", 0.90, 1000, 10.0), "b": _row("b", "t", 0.90, 1000, 8.0),
              "c": _row("c", "t", 0.89, 250, 4.0), "e-int8": _row("e-int8", "t", 0.86, 200, 2.0)}
    rows = build_rows(models, [1])
    lenient = Targets(size_x=4.0, latency_x=3.0, retention=0.95, points_vs_c=3.0, size_vs_c=1.2, latency_vs_c=2.0)
    targets = {t["id"]: t for t in check_targets(rows, [1], 128, lenient)}
    assert all(targets[k]["met"] for k in ("size", "latency", "retention", "vs_c"))
    assert targets["size"]["target"].startswith(">= 4x") and "95%" in targets["retention"]["target"]


def test_a_latency_spans_min_seconds_of_timed_runs():
    import time

    from compressor.measure import time_calls

    times = time_calls(lambda: time.sleep(0.002), runs=3, warmup=1, min_seconds=0.1)
    assert len(times) > 3 and sum(times) >= 100  # more than the 3 runs asked: the runs span 0.1 s
    assert len(time_calls(lambda: None, runs=3, warmup=1)) == 3  # without it, exactly the runs asked
