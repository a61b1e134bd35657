"""The service's routes: module-level functions on `APIRouter`s, each getting the app's state through a
`state: State` parameter (`Depends(service.state.get_state)`) and the API key check through
`Depends(service.guards.require_api_key)`. `/docs`, `/redoc` and `/openapi.json` come from the app
itself (fastapi-offline serves Swagger UI and ReDoc from the package).
"""

from __future__ import annotations

from starlette.routing import BaseRoute

from service.routes import sample, status

__all__ = ["api_routes"]


def api_routes() -> list[BaseRoute]:
    """POST /sample; GET /health, /ready, /info, /metrics, in this order: a new list for each app.

    NOTE: handed to the app's constructor (``FastAPI(routes=...)``) rather than through
    ``include_router``, so ``app.routes`` lists each route itself on every FastAPI version (newer ones
    keep an included router as one lazy entry without a path), which the body guard and the response
    counter read.
    """
    return [*sample.router.routes, *status.router.routes]
