"""Edge footprint: the resident memory of a torch-free process that loads a bundle and serves predictions.

Run as a child process so that nothing of the caller (torch, the teacher, the benchmark's data) is counted:

    python -m compressor.runtime.footprint BUNDLE_DIR --texts texts.json [--predictions 100] [--threads 1]

``texts.json`` is a JSON list of requests, each ``{"text": ..., "question": ...}`` (question optional); they are
served one per call, cycling through the list until ``--predictions`` calls were made, every task of the bundle
answering each call. The child prints one JSON object: resident set size (``VmRSS`` from ``/proc/self/status``)
after the imports, after ``Bundle.load`` and after the predictions, the peak (``VmHWM``), the wall times, and
whether any of torch / transformers / onnx / optimum was imported (it must not be). :func:`measure_footprint`
runs the child and returns that object. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HEAVY = ("torch", "transformers", "onnx", "optimum")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def _mib(kib: int) -> float:
    return round(kib / 1024, 2)


def serve(bundle_dir: str, requests: Sequence[Mapping[str, str]], predictions: int, threads: int | None) -> dict:
    """In this process: import the runtime, load the bundle, serve ``predictions`` single requests."""
    started = time.perf_counter()
    from compressor.runtime import Bundle

    after_import = _status_kib("VmRSS")
    bundle = Bundle.load(bundle_dir, threads=threads)
    after_load = _status_kib("VmRSS")
    loaded = time.perf_counter()
    for i in range(predictions):
        req = requests[i % len(requests)]
        bundle.predict(req["text"], questions=req.get("question") or req["text"],
                       text_pairs=req.get("text_pair") or req["text"])
    done = time.perf_counter()
    heavy = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
    return {
        "bundle": bundle_dir, "tasks": bundle.tasks, "predictions": predictions, "threads": threads,
        "rss_after_import_mib": _mib(after_import), "rss_after_load_mib": _mib(after_load),
        "rss_after_predictions_mib": _mib(_status_kib("VmRSS")), "peak_rss_mib": _mib(_status_kib("VmHWM")),
        "load_s": round(loaded - started, 3), "predict_s": round(done - loaded, 3), "heavy_modules": heavy,
    }


def measure_footprint(bundle_dir: Path | str, requests: Sequence[Mapping[str, str]], predictions: int = 100,
                      threads: int | None = 1, timeout: float = 900) -> dict[str, Any]:
    """Run :func:`serve` in a fresh Python process and return its measurements.

    Raises:
        ValueError: no requests, or a request without ``text``.
        RuntimeError: the child failed (its stderr's last lines are in the message).
    """
    if not requests or any(not isinstance(r, Mapping) or not r.get("text") for r in requests):
        raise ValueError("footprint: give at least one request, each a {'text': ...} mapping")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="footprint-") as tmp:
        texts = Path(tmp) / "texts.json"
        texts.write_text(json.dumps([dict(r) for r in requests]))
        cmd = [sys.executable, "-m", "compressor.runtime.footprint", str(bundle_dir), "--texts", str(texts),
               "--predictions", str(predictions)] + (["--threads", str(threads)] if threads else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"footprint of {bundle_dir} failed (exit {proc.returncode}): {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--texts", required=True, help="JSON list of {text, question?} requests")
    parser.add_argument("--predictions", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    requests = json.loads(Path(args.texts).read_text())
    print(json.dumps(serve(args.bundle, requests, args.predictions, args.threads)))


if __name__ == "__main__":
    main()
