"""The client's exceptions: one hierarchy, each carrying what the server said.

    ClientError                      every failure of a client call (`attempts`: requests sent)
    |- ConnectionFailed              no answer: could not connect, or the connection dropped
    |- RequestTimedOut               no answer within the client's timeout
    |- NotReady                      `wait_ready` gave up
    |- UnexpectedResponse            an answer that is not the service's schema (wrong URL?)
    `- ServiceError                  the service answered with an error status
       |- InvalidRequest             400 / 404 / 405 / 413 / 415 / 422 (`fields`: what the 422 named)
       |- Unauthorized               401 / 403: missing or wrong API key
       |- Overloaded                 429: the queue is full (`retry_after`)
       |- Unavailable                503: not ready, shutting down, engine down (`retry_after`)
       |- ServerTimeout              504: not finished within the server's request timeout
       `- ServerError                500 and other 5xx (`error_id`: quote it to the operator)

`str(error)` is one line: status, method and path, the server's message (a 422 names the field and the
range in force on that server), and the Retry-After when there was one.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx


class ClientError(Exception):
    """A client call failed. `attempts`: requests sent, retries included."""

    def __init__(self, message: str, *, attempts: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.attempts = attempts

    def __str__(self) -> str:
        return self.message if self.attempts <= 1 else f"{self.message} (after {self.attempts} attempts)"


class ConnectionFailed(ClientError):
    """The service did not answer: it could not be reached, or the connection dropped mid-request."""


class RequestTimedOut(ClientError):
    """No answer within the client's timeout (`Client(timeout=...)` or the call's `timeout=`)."""


class NotReady(ClientError):
    """`wait_ready` ran out of time; the message says what the service last reported."""


class UnexpectedResponse(ClientError):
    """A response that does not follow the service's schema (another server at that URL?)."""


@dataclass(frozen=True)
class FieldError:
    """One item of a 422: the request field (`length`, `count`, ...) and the server's message."""

    field: str
    message: str

    def __str__(self) -> str:
        # The service's range messages already start with the field ("length must be between ...").
        return self.message if self.message.startswith(self.field) else f"{self.field}: {self.message}"


class ServiceError(ClientError):
    """The service answered with an error status.

    `status_code`, `detail` (the JSON `detail` as sent), `fields` (422 items), `retry_after` (seconds,
    from the `Retry-After` header; None without one), `error_id` (500s: the id in the server's log).
    """

    def __init__(self, *, status_code: int, method: str, path: str, detail, retry_after: float | None = None,
                 error_id: str | None = None, attempts: int = 1) -> None:
        self.status_code = status_code
        self.detail = detail
        self.fields = _field_errors(detail)
        self.retry_after = retry_after
        self.error_id = error_id
        text = "; ".join(str(f) for f in self.fields) if self.fields else _detail_text(detail)
        message = f"{status_code} from {method} {path}: {text}"
        if error_id:
            message += f" (error id {error_id})"
        if retry_after is not None:
            message += f" (Retry-After {retry_after:g} s)"
        super().__init__(message, attempts=attempts)


class InvalidRequest(ServiceError):
    """The service refused the request as given (a 422 names the field and its allowed range)."""


class Unauthorized(ServiceError):
    """Missing or wrong API key (`api_key=`, `--api-key`, or `MHCFLASH_API_KEY` for the command)."""


class Overloaded(ServiceError):
    """429: the sampling queue is full; retry after `retry_after` seconds."""


class Unavailable(ServiceError):
    """503: the service is starting, shutting down, or its engine is down; the request produced nothing."""


class ServerTimeout(ServiceError):
    """504: the request did not finish within the server's request timeout; its samples were dropped."""


class ServerError(ServiceError):
    """500 or another server failure; `error_id` names the traceback in the server's log."""


_BY_STATUS: dict[int, type[ServiceError]] = {401: Unauthorized, 403: Unauthorized, 429: Overloaded,
                                             503: Unavailable, 504: ServerTimeout}


def error_from_response(response: httpx.Response, retry_after: float | None, attempts: int = 1) -> ServiceError:
    """The `ServiceError` for an error `response` (status >= 400)."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "detail" in body:
        detail, error_id = body["detail"], body.get("error_id")
    else:
        detail, error_id = (response.text.strip()[:200] or response.reason_phrase), None
    kind = _BY_STATUS.get(status) or (InvalidRequest if status < 500 else ServerError)
    request = response.request
    return kind(status_code=status, method=request.method, path=request.url.path, detail=detail,
                retry_after=retry_after, error_id=error_id if isinstance(error_id, str) else None,
                attempts=attempts)


def transport_error(exc: httpx.TransportError, method: str, url: str, attempts: int = 1) -> ClientError:
    """A `ConnectionFailed` / `RequestTimedOut` naming the URL and what httpx saw."""
    what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        return RequestTimedOut(f"no answer from {method} {url} within the timeout ({what}); long samples "
                               f"need a longer read timeout", attempts=attempts)
    return ConnectionFailed(f"cannot reach {method} {url} ({what}); is the service running there?",
                            attempts=attempts)


def _field_errors(detail) -> tuple[FieldError, ...]:
    if not isinstance(detail, list):
        return ()
    out = []
    for item in detail:
        if not isinstance(item, dict):
            continue
        loc = [str(part) for part in item.get("loc", []) if part != "body"]
        out.append(FieldError(field=".".join(loc) or "body", message=str(item.get("msg", ""))))
    return tuple(out)


def _detail_text(detail) -> str:
    text = detail if isinstance(detail, str) else repr(detail)
    return " ".join(text.split())  # one line
