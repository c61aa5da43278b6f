"""``fusionkit serve``: an HTTP prediction server over a checkpoint, with micro-batching.

Endpoints:

- ``POST /predict`` with ``multipart/form-data`` (or a urlencoded form): one sample, one field
  per model input (a file for an image input, a string for a text input; a model trained on
  ``image`` / ``text`` columns takes the fields ``image`` and ``text``). Answers the JSON of
  ``fusionkit predict --json``: task → ``{label, score, scores, modality_weights}``
  (``labels`` for a multi-label task).
- ``POST /predict`` with ``application/json`` ``{"samples": [{"text": "...", "image":
  "<base64>"}, ...]}`` (keys are input names; an image may also be a ``data:`` URL): a list
  of answers in the same order; a bad sample gets ``{"error": "..."}`` in its slot while the
  others are answered.
- ``GET /health``: ``200 {"status": "ready"}`` once the model is warmed up, ``503`` before.
- ``GET /metadata``: the tasks and their classes, the inputs and their kinds, the encoders,
  the fusionkit version and the batching settings.

A bad request gets a 4xx status and ``{"error": "..."}``: 400 for a bad or missing input (an
unreadable, truncated or oversized image, an unknown field, a text over the limit), 413 for a
body over the limit, 415 for another content type; 503 while warming up.

Concurrent samples are gathered by a `fusionkit.serving.batching.MicroBatcher` (up to
``max_batch`` samples, waiting at most ``max_wait_ms``) and run as one
`Predictor.predict` call on a worker thread, so the event loop never waits on torch. The
samples are validated, decoded and predicted by `fusionkit.serving.samples`.

FastAPI and uvicorn are imported only when an app is built (``pip install 'fusionkit[serve]'``).

Examples:
    $ fusionkit serve --checkpoint runs/quickstart --port 8000
    $ curl -F image=@shirt.png -F text="red striped tee" localhost:8000/predict
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fusionkit.errors import ConfigError, FusionkitError, MissingDependencyError, did_you_mean
from fusionkit.serving import samples as _samples
from fusionkit.serving.batching import MicroBatcher
from fusionkit.serving.predictor import Predictor
from fusionkit.serving.samples import model_metadata, predict_samples, prepare_sample

if TYPE_CHECKING:
    import os

    from fastapi import FastAPI

__all__ = ["ServeOptions", "create_app", "require_serving_dependencies", "serve"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'fusionkit[serve]'"


@dataclass(frozen=True)
class ServeOptions:
    """Batching and request limits of a server.

    Attributes:
        max_batch: Most samples per forward pass; 1 turns micro-batching off.
        max_wait_ms: How long a batch waits for more samples after its first.
        max_body_mb: Largest request body in MiB (a larger one gets 413).
        max_text_chars: Longest text of a text input, in characters.
        warm_up: Run the model on synthetic samples before ``/health`` turns ready.
        forward_batch: Samples per forward pass within a micro-batch; ``None`` (the default)
            measures each size up to ``max_batch`` during the warm-up and keeps the one that
            costs least per sample (`fusionkit.serving.samples.tune_forward_batch`).

    Raises:
        ConfigError: A value out of range.

    Examples:
        >>> ServeOptions(max_batch=1).max_body_bytes
        20971520
    """

    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_body_mb: float = 20.0
    max_text_chars: int = 10_000
    warm_up: bool = True
    forward_batch: int | None = None

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch: expected 1 or more, got {self.max_batch}")
        if self.forward_batch is not None and not 1 <= self.forward_batch <= self.max_batch:
            raise ConfigError(
                f"--forward-batch: expected 1 to --max-batch ({self.max_batch}), "
                f"got {self.forward_batch}"
            )
        if self.max_wait_ms < 0:
            raise ConfigError(f"--max-wait-ms: expected 0 or more, got {self.max_wait_ms}")
        if self.max_body_mb <= 0:
            raise ConfigError(f"--max-body-mb: expected a positive size, got {self.max_body_mb}")
        if self.max_text_chars < 1:
            raise ConfigError(f"--max-text-chars: expected 1 or more, got {self.max_text_chars}")

    @property
    def max_body_bytes(self) -> int:
        """``max_body_mb`` in bytes."""
        return int(self.max_body_mb * 1024 * 1024)


def require_serving_dependencies() -> None:
    """Check that FastAPI, uvicorn and python-multipart can be imported.

    Raises:
        MissingDependencyError: One is missing; the message says how to install them.

    Examples:
        >>> require_serving_dependencies()  # doctest: +SKIP
    """
    for module, package in (
        ("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("python_multipart", "python-multipart")
    ):
        try:
            importlib.import_module(module)
        except ImportError:
            raise MissingDependencyError(
                f"fusionkit serve needs {package}: {INSTALL_HINT}"
            ) from None


class _RequestError(Exception):
    """A request refused with ``status`` and ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _message(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


class _BodyLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes (declared or streamed)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = _RequestError(413, f"the request body is over the limit of {self.limit} bytes")
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.limit:
            from starlette.responses import JSONResponse

            response = JSONResponse({"error": too_large.message}, status_code=413,
                                    headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise too_large
            return message

        await self.app(scope, limited, send)


def create_app(predictor: Predictor, options: ServeOptions | None = None) -> FastAPI:
    """The FastAPI app serving ``predictor`` (see the module docstring for the endpoints).

    Its lifespan starts the micro-batcher and warms the model up in the background;
    ``/health`` answers 503 until the warm-up is done.

    Args:
        predictor: The predictor (its ``batch_size`` should be at least ``max_batch``).
        options: Batching and limits (default `ServeOptions()`).

    Returns:
        The app, to run with uvicorn (or ``fastapi.testclient.TestClient``).

    Raises:
        MissingDependencyError: FastAPI, uvicorn or python-multipart is not installed.

    Examples:
        >>> app = create_app(Predictor.from_pretrained("runs/quickstart"))  # doctest: +SKIP
    """
    require_serving_dependencies()
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException

    options = options or ServeOptions()
    inputs = predictor.model.config.inputs
    batcher = MicroBatcher(
        lambda batch: predict_samples(predictor, batch), options.max_batch,
        options.max_wait_ms,
    )
    state: dict[str, Any] = {"ready": False, "error": None}
    sizes = (1, 1, options.max_batch) if options.max_batch > 1 else (1, 1)

    async def warm() -> None:
        try:
            if options.warm_up:
                await batcher.call(_samples.warm_up, predictor, sizes)
            if options.forward_batch is not None:
                predictor.batch_size = options.forward_batch
            elif options.max_batch > 1 and options.warm_up:
                timings = await batcher.call(
                    _samples.tune_forward_batch, predictor, options.max_batch
                )
                state["forward_batch_ms"] = timings
                logger.info("forward batch %d (ms per sample by batch size: %s)",
                            predictor.batch_size, timings)
        except Exception as error:
            state["error"] = _message(error)
            logger.exception("warm-up failed; /health stays 503")
            return
        state["ready"] = True
        logger.info("fusionkit serve: ready (max batch %d, max wait %s ms)",
                    options.max_batch, options.max_wait_ms)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        batcher.start()
        warming = asyncio.get_running_loop().create_task(warm())
        try:
            yield
        finally:
            warming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await warming
            await batcher.close()

    app = FastAPI(title="fusionkit", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = batcher
    app.add_middleware(_BodyLimit, limit=options.max_body_bytes)

    def error(status: int, message: str) -> JSONResponse:
        headers = {"Retry-After": "1"} if status == 503 else None
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(_RequestError)
    async def refused(request: Request, exc: _RequestError) -> JSONResponse:
        return error(exc.status, exc.message)

    @app.exception_handler(FusionkitError)
    async def bad_input(request: Request, exc: FusionkitError) -> JSONResponse:
        return error(400, _message(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, _message(Exception(exc.detail)))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error")
        return error(500, f"internal error: {_message(exc)}")

    def check_ready() -> None:
        if not state["ready"]:
            raise _RequestError(503, state["error"] or "warming up; retry shortly")

    async def read_form(request: Request) -> dict[str, Any]:
        form = await request.form(max_files=len(inputs) + 1, max_fields=len(inputs) + 1,
                                  max_part_size=options.max_body_bytes)
        raw: dict[str, Any] = {}
        try:
            for name, value in form.multi_items():
                if name not in inputs:
                    hint = did_you_mean(name, list(inputs), what="the model's inputs")
                    raise _RequestError(400, f"unknown field {name!r}; {hint}")
                if name in raw:
                    raise _RequestError(400, f"field {name!r} given twice")
                raw[name] = await value.read() if isinstance(value, UploadFile) else value
        finally:
            await form.close()
        return raw

    async def predict_json(request: Request) -> JSONResponse:
        try:
            payload = await run_in_threadpool(json.loads, await request.body())
        except ValueError as exc:
            raise _RequestError(400, f"the body is not valid JSON ({exc})") from None
        samples = payload.get("samples") if isinstance(payload, dict) else None
        if not isinstance(samples, list) or not samples:
            raise _RequestError(
                400, 'expected {"samples": [{input name: value, ...}, ...]} with a sample or more'
            )

        def prepare_all() -> list[Any]:
            prepared: list[Any] = []
            for raw in samples:
                try:
                    prepared.append(prepare_sample(raw, inputs, options.max_text_chars))
                except FusionkitError as exc:
                    prepared.append(exc)
            return prepared

        prepared = await run_in_threadpool(prepare_all)
        answers = await asyncio.gather(
            *(batcher.submit(s) for s in prepared if not isinstance(s, Exception)),
            return_exceptions=True,
        )
        ordered = iter(answers)
        results = [s if isinstance(s, Exception) else next(ordered) for s in prepared]
        for result in results:
            if isinstance(result, Exception) and not isinstance(result, FusionkitError):
                raise result
        return JSONResponse(
            [{"error": _message(r)} if isinstance(r, Exception) else r for r in results]
        )

    async def predict(request: Request) -> JSONResponse:
        """One sample (a multipart or urlencoded form) or ``{"samples": [...]}`` (JSON)."""
        check_ready()
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            return await predict_json(request)
        if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
            raw = await read_form(request)
        elif not await request.body():
            raw = {}
        else:
            raise _RequestError(
                415, f"send multipart/form-data or application/json, not {kind or 'no type'!r}"
            )
        sample = await run_in_threadpool(prepare_sample, raw, inputs, options.max_text_chars)
        return JSONResponse(await batcher.submit(sample))

    async def health(request: Request) -> JSONResponse:
        """200 ``{"status": "ready"}`` after the warm-up, 503 before (or if it failed)."""
        if state["ready"]:
            return JSONResponse({"status": "ready"})
        body = {"status": "failed", "error": state["error"]} if state["error"] else {
            "status": "warming up"}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    async def metadata(request: Request) -> JSONResponse:
        """The model's tasks, inputs and encoders, and the server's batching settings."""
        return JSONResponse({
            **model_metadata(predictor),
            "batching": {
                "max_batch": options.max_batch, "max_wait_ms": options.max_wait_ms,
                "forward_batch": predictor.batch_size,
                "forward_batch_ms": state.get("forward_batch_ms"),
                "batches": batcher.batches, "samples": batcher.samples,
                "largest": batcher.largest,
            },
            "limits": {"max_body_mb": options.max_body_mb,
                       "max_text_chars": options.max_text_chars},
        })

    # Starlette routes: each endpoint takes the request itself (FastAPI's injection would read
    # the postponed annotations of these closures as query parameters).
    app.add_route("/predict", predict, methods=["POST"])
    app.add_route("/health", health, methods=["GET"])
    app.add_route("/metadata", metadata, methods=["GET"])
    return app


def serve(
    checkpoint: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    options: ServeOptions | None = None,
    log_level: str = "info",
) -> None:
    """Load a checkpoint and serve it over HTTP until SIGINT or SIGTERM.

    On SIGTERM uvicorn stops accepting connections and lets requests in flight finish.

    Args:
        checkpoint: A run folder or its ``best/`` / ``last/`` checkpoint folder.
        host: Interface to listen on.
        port: TCP port.
        device: ``auto``, ``cpu`` or ``cuda``.
        options: Batching and limits (default `ServeOptions()`).
        log_level: uvicorn's log level (``info`` logs every request).

    Raises:
        MissingDependencyError: FastAPI, uvicorn or python-multipart is not installed.
        CheckpointError: The checkpoint cannot be loaded.

    Examples:
        >>> serve("runs/quickstart", port=8000)  # doctest: +SKIP
    """
    require_serving_dependencies()
    import uvicorn

    options = options or ServeOptions()
    predictor = Predictor.from_pretrained(
        checkpoint, device=device, batch_size=max(options.max_batch, 1)
    )
    app = create_app(predictor, options)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=60)
    uvicorn.Server(config).run()
