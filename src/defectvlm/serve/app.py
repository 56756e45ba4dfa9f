"""The inspection service: `create_app(limits, load)` -> a FastAPI app.

Routes: POST /v1/inspect (JSON or multipart), POST /v1/chat/completions (OpenAI-compatible),
GET /healthz, /readyz, /metrics, the upload page at / and the OpenAPI page at /docs.
The model loads in the background after start-up (/readyz says when it is there); bad input
is a 4xx with a message, never a crash; logs carry no image bytes and no token."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from defectvlm.config import ServeParams
from defectvlm.serve.batching import Batcher, Unavailable
from defectvlm.serve.chat import ChatRequest, chat_completion, conversation
from defectvlm.serve.inputs import (
    BadRequest,
    InspectRequest,
    check_image,
    decode_base64,
    parse_boxes_field,
    parse_json,
)
from defectvlm.serve.metrics import ServeMetrics
from defectvlm.serve.model import Scorer

log = logging.getLogger("defectvlm.serve")
ROUTES = ("/v1/inspect", "/v1/chat/completions", "/healthz", "/readyz", "/metrics", "/")
INSPECT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": InspectRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "boxes": {"type": "string", "description": 'JSON list: [{"xyxy": [x1, y1, x2, y2]}]'},
                    },
                }
            },
        },
    }
}


class BodyTooLarge(Exception):
    pass


class Guard:
    """Outermost ASGI layer: refuses bodies over the limit (by header, or while streaming),
    counts requests and latency per route, and logs one line per request (no body, no headers)."""

    def __init__(self, app, limits: ServeParams, metrics: ServeMetrics):
        self.app, self.limits, self.metrics = app, limits, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        started = time.perf_counter()
        status = {"code": 500}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        length = dict(scope["headers"]).get(b"content-length")
        seen = 0

        async def receive_limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limits.max_body_bytes:
                raise BodyTooLarge()
            return message

        try:
            if length and length.isdigit() and int(length) > self.limits.max_body_bytes:
                await too_large(self.limits)(scope, receive, send_counted)
            else:
                await self.app(scope, receive_limited, send_counted)
        finally:  # an error that escapes the app (answered 500 by Starlette) is counted too
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(route=route, status=str(status["code"])).inc()
            self.metrics.latency.labels(route=route).observe(elapsed)
            log.info("%s %s -> %d in %.3f s", scope["method"], scope["path"], status["code"], elapsed)


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """`detail` as FastAPI writes it, `error` as OpenAI clients read it."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"detail": message, "error": {"message": message, "type": kind, "code": status}}
    return JSONResponse(body, status, headers=headers)


def too_large(limits: ServeParams) -> JSONResponse:
    return error(413, f"body over serve.max_body_bytes ({limits.max_body_bytes} bytes)")


def bearer_check(token: str | None) -> Callable:
    async def check(request: Request) -> None:
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
            raise BadRequest(401, "missing or wrong bearer token (Authorization: Bearer <token>)")

    return check


def create_app(limits: ServeParams, load: Callable[[], Scorer], follow: Callable | None = None) -> FastAPI:
    """`load` builds the first scorer (run in a background thread); `follow(batcher, stop)`,
    when given, runs in another thread and swaps in new scorers (alias following)."""
    metrics = ServeMetrics()
    batcher = Batcher(limits, metrics)
    state = {"error": None}
    stop = threading.Event()
    token = os.environ.get(limits.token_env) or None

    def load_first() -> None:
        try:
            batcher.swap(load())
        except Exception as exc:  # reported by /readyz; the service stays up to say so
            log.exception("loading the model failed")
            state["error"] = str(exc)
            return
        if follow is not None:
            follow(batcher, stop)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        threading.Thread(target=load_first, name="model-loader", daemon=True).start()
        yield
        stop.set()
        await batcher.stop()

    app = FastAPI(
        title="defectvlm inspection service",
        description="Judge regions of inspection images with the fine-tuned vision-language model.",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.metrics = metrics
    authorized = [Depends(bearer_check(token))]

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        return error(exc.status, exc.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return error(422, "; ".join(parts))

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, exc: BodyTooLarge):
        return too_large(limits)

    @app.exception_handler(Unavailable)
    async def unavailable(request: Request, exc: Unavailable):
        return error(503, str(exc), {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(TimeoutError)
    async def timeout(request: Request, exc: TimeoutError):
        return error(504, f"no answer within serve.request_timeout_s ({limits.request_timeout_s} s)")

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.error("internal error on %s: %s", request.url.path, type(exc).__name__)
        return error(500, "internal error (see the service log)")

    @app.post("/v1/inspect", dependencies=authorized, openapi_extra=INSPECT_BODY)
    async def inspect(request: Request) -> dict:
        """Judge the regions of one image; the answer names the model version that judged it."""
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("application/json"):
            parsed = parse_json(await request.body())
            data, boxes = decode_base64(parsed.image), parsed.boxes
        elif content_type.startswith("multipart/form-data"):
            data, boxes = await read_multipart(request)
        else:
            raise BadRequest(415, f"content type {content_type or '(none)'}: send application/json or multipart")
        item = await run_in_threadpool(check_image, data, boxes, limits)
        return await batcher.score(item)

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat(request: ChatRequest) -> dict:
        """OpenAI-compatible chat (images as data: URIs); greedy generation."""
        messages, region_ids = await run_in_threadpool(conversation, request, limits)
        budget = min(
            request.max_completion_tokens or request.max_tokens or limits.max_new_tokens, limits.max_new_tokens
        )
        (answer, tokens), scorer = await batcher.generate(messages, budget)
        return chat_completion(answer, scorer, region_ids, tokens)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if batcher.scorer is not None:
            return JSONResponse({"status": "ready", "version": batcher.scorer.version})
        detail = f"model failed to load: {state['error']}" if state["error"] else "model loading"
        return JSONResponse({"status": "not ready", "detail": detail}, 503, headers={"Retry-After": "5"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return resources.files("defectvlm.serve").joinpath("page.html").read_text("utf-8")

    async def read_multipart(request: Request) -> tuple[bytes, list | None]:
        try:
            form = await request.form(max_files=1, max_fields=1)
        except MultiPartException as exc:
            raise BadRequest(400, f"multipart: {exc.message}") from None
        unknown = sorted(set(form.keys()) - {"image", "boxes"})
        if unknown:
            raise BadRequest(422, f"{unknown[0]}: unknown field (known: image, boxes)")
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise BadRequest(422, "image: a file field named image is required")
        boxes = form.get("boxes")
        if boxes is not None and not isinstance(boxes, str):
            raise BadRequest(422, "boxes: expected a text field holding a JSON list")
        return await upload.read(), parse_boxes_field(boxes)

    app.add_middleware(Guard, limits=limits, metrics=metrics)
    return app


def serve_forever(app, host: str, port: int) -> None:
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False, lifespan="on")
    asyncio.run(uvicorn.Server(config).serve())
