"""`mhcflash_requests_total{route, code}`: every HTTP response of the service, counted once.

`ResponseCounter` is a pure ASGI middleware, the outermost one the app adds, so it sees the
responses of the inner guards (400 / 413 / 415 from the body guard) and of the router (404, 405),
as well as those of the route handlers. It counts a response when its status line is sent, before
the client can read it. An exception that escapes the app becomes Starlette's 500 outside this
middleware, so it is counted here as a 500.

`route` is the matched route's path template (`/sample`, a mount's prefix for static files), or
`UNMATCHED` for a path no route knows, so a scanner probing random paths cannot grow the label set.

`known_codes` lists, per route, the codes it can answer, taken from the app's own OpenAPI
document (its declared responses, FastAPI's 422) plus 405 and 500 for every route. The app
creates those label sets at 0 before serving, so `rate()` sees the first burst of each code.
"""

from __future__ import annotations

from prometheus_client import Counter
from starlette.routing import BaseRoute, Match, Mount

UNMATCHED = "unmatched"
UNMATCHED_CODES = (400, 404, 413, 415)  # unknown path: body guard (POST without JSON, too large) or 404
EVERY_ROUTE_CODES = (405, 500)  # wrong method; unhandled error


def route_label(routes: list[BaseRoute], scope) -> str:
    """The path template of the route the router will pick for `scope` (a full match first, then a
    path match with another method: the router's 405), else `UNMATCHED`."""
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return route.path
        if match == Match.PARTIAL and partial is None:
            partial = route.path
    return partial or UNMATCHED


def known_codes(routes: list[BaseRoute], openapi: dict) -> dict[str, set[int]]:
    """route label -> the status codes it can answer (documented ones + 405 + 500)."""
    table: dict[str, set[int]] = {UNMATCHED: set(UNMATCHED_CODES)}
    for route in routes:
        path = getattr(route, "path", None)
        if path is None:
            continue
        codes = table.setdefault(path, set(EVERY_ROUTE_CODES))
        documented = openapi.get("paths", {}).get(path)
        if documented:
            for operation in documented.values():
                codes |= {int(c) for c in operation.get("responses", {}) if str(c).isdigit()}
        else:  # not in the schema (docs pages, static files): 200, and 404 for a missing file
            codes.add(200)
            if isinstance(route, Mount):
                codes.add(404)
    return table


class ResponseCounter:
    """Pure ASGI middleware: `counter.labels(route=..., code=...).inc()` once per HTTP response."""

    def __init__(self, app, routes: list[BaseRoute], counter: Counter) -> None:
        self.app = app
        self.routes = routes
        self.counter = counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = route_label(self.routes, scope)
        started = False

        async def counted_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                self.counter.labels(route=route, code=str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        except Exception:
            if not started:  # Starlette's ServerErrorMiddleware (outside) answers 500
                self.counter.labels(route=route, code="500").inc()
            raise
