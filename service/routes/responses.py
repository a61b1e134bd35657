"""The responses the routes document in OpenAPI besides their own (and FastAPI's 422)."""

from __future__ import annotations

from service.schemas import ErrorResponse

PDB_MEDIA_TYPE = "chemical/x-pdb"
SERVER_ERROR = {500: {"model": ErrorResponse}}  # every route: an unhandled error (no stack trace)

REJECTIONS = {
    400: {"model": ErrorResponse, "description": "malformed body (invalid UTF-8) or Content-Length"},
    401: {"model": ErrorResponse, "description": "missing or wrong X-API-Key (when auth is on)"},
    413: {"model": ErrorResponse}, 415: {"model": ErrorResponse},
    429: {"model": ErrorResponse, "description": "queue full; retry after the Retry-After header"},
    503: {"model": ErrorResponse, "description": "shutting down or engine down (Retry-After)"},
    504: {"model": ErrorResponse, "description": "not finished within the request timeout"},
}
