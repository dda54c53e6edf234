"""An HTTP JSON service over an edge bundle (Starlette app, served by uvicorn; torch-free like the runtime).

    POST /predict   {"task": "ner" | ["ner", "sst"], "text": "..." | ["...", ...],
                     "question": ... (QA), "text_pair": ... (text-pair classification)}
                    -> 200 {"results": [{"text", "truncated", "predictions": {task: prediction}}, ...]}
    GET  /health    -> 200 {"status": "ok", "tasks": [...], "format", "max_length", "requests", "batches"}

Every error is one JSON line ``{"error": "..."}`` with a 4xx code: 400 for a body that is not JSON, lacks
``task`` or ``text``, names a task the bundle does not serve or holds an empty text; 413 for a body over the size
limit (10 MB by default, checked on ``Content-Length`` and while reading); 404 / 405 for other routes and methods.

Requests are batched: a request's texts run as one batch, and requests that arrive within ``batch_wait_ms`` of
each other (or while a batch is running) and ask for the same tasks are merged into one ``Bundle.predict`` call
of at most ``max_batch`` texts, run in a worker thread so the event loop keeps accepting requests.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from compressor.errors import CompressorError
from compressor.runtime import Bundle, BundleError

MAX_BODY_BYTES = 10 * 1000 * 1000
MAX_BATCH = 32
BATCH_WAIT_MS = 5.0


class ServeError(CompressorError):
    """The service cannot start: the address is busy or not this machine's."""


class RequestError(Exception):
    """A request the service refuses: a one-line message and its HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class _Job:
    texts: list[str]
    tasks: list[str]
    questions: list[str] | None
    pairs: list[str] | None
    future: asyncio.Future = field(repr=False)

    @property
    def key(self) -> tuple:
        return tuple(self.tasks), self.questions is not None, self.pairs is not None


class Batcher:
    """Merges queued requests that ask for the same tasks into one ``Bundle.predict`` call."""

    def __init__(self, bundle: Bundle, max_batch: int = MAX_BATCH, wait_ms: float = BATCH_WAIT_MS):
        self.bundle = bundle
        self.max_batch = max_batch
        self.wait_s = wait_ms / 1000.0
        self.requests = 0
        self.batches = 0
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass

    async def submit(self, texts: list[str], tasks: list[str], questions: Any, pairs: Any) -> list[dict[str, Any]]:
        """The request's results, once the batch it joined has run. Raises ``BundleError`` for a bad request."""
        texts, tasks = self.bundle.check_request(texts, tasks)
        n = len(texts)
        q = None if questions is None else Bundle.second_inputs(questions, n, "question")
        p = None if pairs is None else Bundle.second_inputs(pairs, n, "text_pair")
        if self._queue is None:
            raise RuntimeError("the batcher was not started")
        job = _Job(texts, tasks, q, p, asyncio.get_running_loop().create_future())
        self.requests += 1
        await self._queue.put(job)
        return await job.future

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            size = len(jobs[0].texts)
            deadline = loop.time() + self.wait_s
            while size < self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    timeout = deadline - loop.time()
                    if timeout <= 0:
                        break
                    try:
                        job = await asyncio.wait_for(self._queue.get(), timeout)
                    except asyncio.TimeoutError:
                        break
                jobs.append(job)
                size += len(job.texts)
            groups: dict[tuple, list[_Job]] = {}
            for job in jobs:
                groups.setdefault(job.key, []).append(job)
            for group in groups.values():
                await self._predict(group)

    async def _predict(self, group: list[_Job]) -> None:
        texts = [t for j in group for t in j.texts]
        questions = [q for j in group for q in j.questions] if group[0].questions is not None else None
        pairs = [p for j in group for p in j.pairs] if group[0].pairs is not None else None
        self.batches += 1
        try:
            results = await asyncio.to_thread(self.bundle.predict, texts, group[0].tasks, questions=questions,
                                              text_pairs=pairs)
        except Exception as exc:  # noqa: BLE001 - handed to each waiting request, which answers it
            for j in group:
                if not j.future.done():
                    j.future.set_exception(exc)
            return
        start = 0
        for j in group:
            if not j.future.done():
                j.future.set_result(results[start : start + len(j.texts)])
            start += len(j.texts)


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (by ``Content-Length`` or while streaming)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError("Content-Length is not a number") from None
        if size > limit:
            raise RequestError(f"request body of {size} bytes is over the limit of {limit} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"request body is over the limit of {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_request(body: bytes) -> dict[str, Any]:
    """The fields of a ``/predict`` body: ``texts``, ``tasks``, ``questions``, ``pairs``; ``RequestError`` (400)
    for anything malformed."""
    if not body.strip():
        raise RequestError("empty request body: expected a JSON object with 'task' and 'text'")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise RequestError(f"request body is not valid JSON{where}: "
                           f"{exc.msg if isinstance(exc, json.JSONDecodeError) else exc.reason}") from None
    if not isinstance(data, dict):
        raise RequestError(f"expected a JSON object with 'task' and 'text', got {type(data).__name__}")
    unknown = sorted(set(data) - {"task", "text", "question", "text_pair"})
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(map(repr, unknown))}; expected task, text, question, "
                           "text_pair")
    for key in ("task", "text"):
        if key not in data:
            raise RequestError(f"missing field '{key}'")
    task, text = data["task"], data["text"]
    tasks = [task] if isinstance(task, str) else task
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise RequestError("field 'task': expected a task name or a non-empty list of task names")
    if not isinstance(text, (str, list)):
        raise RequestError(f"field 'text': expected a string or a list of strings, got {type(text).__name__}")
    for key in ("question", "text_pair"):
        value = data.get(key)
        if value is not None and not (isinstance(value, str) or
                                      isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise RequestError(f"field '{key}': expected a string or a list of strings")
    return {"texts": text, "tasks": tasks, "questions": data.get("question"), "pairs": data.get("text_pair")}


def make_app(bundle: Bundle, max_body: int = MAX_BODY_BYTES, max_batch: int = MAX_BATCH,
             batch_wait_ms: float = BATCH_WAIT_MS) -> Any:
    """The Starlette application serving ``bundle`` (see the module docstring)."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    batcher = Batcher(bundle, max_batch, batch_wait_ms)

    def error(message: str, status: int) -> JSONResponse:
        return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)

    async def predict(request: Any) -> JSONResponse:
        try:
            fields = parse_request(await read_body(request, max_body))
            results = await batcher.submit(fields["texts"], fields["tasks"], fields["questions"], fields["pairs"])
        except RequestError as exc:
            return error(str(exc), exc.status)
        except BundleError as exc:
            return error(str(exc), 400)
        return JSONResponse({"results": results})

    async def health(request: Any) -> JSONResponse:
        return JSONResponse({"status": "ok", "tasks": bundle.tasks, "max_length": bundle.max_length,
                             "format": bundle.spec.metadata.get("format", "onnx"), "requests": batcher.requests,
                             "batches": batcher.batches})

    async def http_error(request: Any, exc: HTTPException) -> JSONResponse:
        return error(exc.detail, exc.status_code)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/health", health, methods=["GET"])],
                    exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    app.state.batcher = batcher
    return app


def bind(host: str, port: int) -> Any:
    """A listening socket on ``host:port`` (port 0: a free one); ``ServeError`` naming the address when busy."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ServeError(f"--host {host}: not an address this machine can listen on ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ServeError(f"{host}:{port}: cannot listen ({exc.strerror or exc}); is another server using the port? "
                      "Pick another with --port") from None
    sock.set_inheritable(True)
    return sock


def serve(bundle: Bundle, sock: Any, max_body: int = MAX_BODY_BYTES, max_batch: int = MAX_BATCH,
          batch_wait_ms: float = BATCH_WAIT_MS, log_level: str = "warning") -> None:
    """Serve ``bundle`` on the bound socket until interrupted (uvicorn, one process)."""
    import uvicorn

    config = uvicorn.Config(make_app(bundle, max_body, max_batch, batch_wait_ms), log_level=log_level,
                            access_log=False, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
