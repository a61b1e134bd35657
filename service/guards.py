"""What stands between a client and a route: the body guard (413 / 415 / 400), the API key (401), and
the error handlers (422 items, `{"detail"}` for HTTP errors, `{"detail", "error_id"}` 500s with no
stack trace: the traceback is logged server-side under that id)."""

from __future__ import annotations

import hmac
import json
import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.state import get_state

log = logging.getLogger("mhcflash.service")

__all__ = ["GuardMiddleware", "install_error_handlers", "require_api_key"]


class GuardMiddleware:
    """Pure ASGI: body size (413) and content type (415) for POST / PUT / PATCH bodies, before any parsing.

    Fail-safe: every such request is guarded except a method that a known path does not take a body
    on (`PUT /health`, `PUT /sample`): the router answers those 405 without reading the body.
    `body_routes` holds the (method, path) pairs that take a body, `paths` every route path.
    """

    def __init__(self, app, max_body_bytes: int, body_routes: set[tuple[str, str]], paths: set[str]) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_routes = body_routes
        self.paths = paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        if scope["path"] in self.paths and (scope["method"], scope["path"]) not in self.body_routes:
            return await self.app(scope, receive, send)  # 405 from the router, body never read
        headers = dict(scope.get("headers") or [])
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if ctype != b"application/json":
            return await _send_json(send, 415, {"detail": "Content-Type must be application/json"})
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            return await _send_json(send, 400, {"detail": "invalid Content-Length"})
        if declared > self.max_body_bytes:
            return await _send_json(send, 413, {"detail": f"request body larger than {self.max_body_bytes} bytes"})
        # Buffer the body (at most max_body_bytes), then replay it: chunked bodies are limited too.
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client left before sending its body
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                return await _send_json(send, 413, {"detail": f"request body larger than {self.max_body_bytes} bytes"})
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def require_api_key(request: Request) -> None:
    """FastAPI dependency: constant-time check of `X-API-Key` when MHCFLASH_API_KEY is set; 401 without details."""
    state = get_state(request)
    expected = state.settings.api_key
    if expected is None:
        return
    given = request.headers.get("x-api-key", "")
    if not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
        state.metrics.rejected.labels(reason="unauthorized").inc()
        raise StarletteHTTPException(401, "unauthorized")


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = []
    for e in exc.errors():
        item = {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        if e.get("ctx"):
            item["ctx"] = {k: str(v) for k, v in e["ctx"].items()}
        errors.append(item)
    return JSONResponse({"detail": errors}, status_code=422)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = getattr(exc, "headers", None)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)


async def _unhandled_error(request: Request, exc: Exception) -> JSONResponse:
    error_id = uuid.uuid4().hex[:12]
    log.error("unhandled error %s on %s %s", error_id, request.method, request.url.path, exc_info=exc)
    get_state(request).metrics.errors.labels(kind="internal").inc()
    return JSONResponse({"detail": "internal server error", "error_id": error_id}, status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled_error)
