"""``compressor serve BUNDLE --port 8000``: the bundle as an HTTP JSON service (see :mod:`compressor.serving`).

Torch-free: typer here, the runtime, starlette and uvicorn inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def serve(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory (model.onnx, tokenizer.json, tasks.json).")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0: a free one).")] = 8000,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="ONNX Runtime intra-op threads.")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Most texts run as one batch.")] = 32,
    batch_wait_ms: Annotated[float, typer.Option("--batch-wait-ms", min=0, help="How long a request waits for "
                                                 "others to share its batch.")] = 5.0,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", min=0.001, help="Largest request body (MB); "
                                               "larger ones get 413.")] = 10.0,
) -> None:
    """Serve a bundle over HTTP: POST /predict {"task", "text"}, GET /health."""
    from compressor.runtime import Bundle
    from compressor.serving import bind, serve as run_server

    model = Bundle.load(bundle, threads=threads)
    sock = bind(host, port)
    bound = sock.getsockname()
    typer.echo(f"serving {bundle} ({', '.join(model.tasks)}) on http://{host}:{bound[1]} "
               "(POST /predict, GET /health; Ctrl-C stops)", err=True)
    try:
        run_server(model, sock, int(max_body_mb * 1000 * 1000), max_batch, batch_wait_ms)
    finally:
        sock.close()
