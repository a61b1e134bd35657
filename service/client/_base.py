"""What the sync and async clients share: settings, request bodies, and turning an attempt's outcome
into a result, a retry (with its wait) or an error. Only the sending and sleeping differ."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import httpx

from service.client.errors import ClientError, UnexpectedResponse, error_from_response, transport_error
from service.client.retry import (
    RETRY_STATUSES,
    RetryEvent,
    RetryPolicy,
    RetryState,
    parse_retry_after,
    retryable_error,
)

log = logging.getLogger("mhcflash.client")

DEFAULT_CONNECT_TIMEOUT_S = 10.0
# Sampling takes seconds to minutes. Past the service's default request timeout (600 s), so that its
# 504 ("not finished, samples dropped") arrives before the client gives up.
DEFAULT_READ_TIMEOUT_S = 660.0
WRITE_TIMEOUT_S = 30.0  # request bodies are a few bytes
USER_AGENT = "mhcflash-client/0.1.0"


class ClientBase:
    """Settings and the per-attempt decisions of `Client` and `AsyncClient` (see their docstrings)."""

    def __init__(self, url: str, *, api_key: str | None, timeout: float, connect_timeout: float,
                 retry: RetryPolicy | None, on_retry: Callable[[RetryEvent], None] | None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https:// (got {url!r})")
        self.url = url.rstrip("/")
        self.retry = retry if retry is not None else RetryPolicy()
        self.on_retry = on_retry
        self._rng = random.Random()
        self._default_timeout = httpx.Timeout(connect=connect_timeout, read=timeout, write=WRITE_TIMEOUT_S,
                                              pool=None)  # pool: requests beyond the pool wait their turn
        self._probe_timeout = httpx.Timeout(connect_timeout)  # /health, /ready answer at once
        self._headers = {"user-agent": USER_AGENT, "accept": "application/json"}
        if api_key:
            self._headers["x-api-key"] = api_key

    def _http_options(self) -> dict:
        return {"base_url": self.url, "headers": self._headers, "timeout": self._default_timeout}

    def _send_options(self, timeout: float | None) -> dict:
        """Keyword arguments of one `request` call: a read-timeout override, if any."""
        if timeout is None:
            return {}
        t = self._default_timeout
        return {"timeout": httpx.Timeout(connect=t.connect, read=timeout, write=t.write, pool=t.pool)}

    @staticmethod
    def _sample_body(length: int, count: int, seed: int | None, noise_scale: float | None,
                     steps: int | None = None) -> dict:
        body = {"length": length, "count": count}
        if steps is not None:
            body["steps"] = steps
        if seed is not None:
            body["seed"] = seed
        if noise_scale is not None:
            body["noise_scale"] = noise_scale
        return body

    def _on_status(self, response: httpx.Response, state: RetryState) -> tuple[ClientError, float | None]:
        """An error response: its error, and the wait before the next attempt (None: no retry)."""
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        delay = state.next_delay(retry_after) if response.status_code in RETRY_STATUSES else None
        if delay is not None:
            self._notify(state, str(response.status_code), delay, retry_after)
        return error_from_response(response, retry_after, state.attempts), delay

    def _on_transport(self, exc: httpx.TransportError, method: str, path: str, state: RetryState,
                      replay_safe: bool) -> tuple[ClientError, float | None]:
        delay = state.next_delay(None) if retryable_error(exc, replay_safe) else None
        if delay is not None:
            self._notify(state, type(exc).__name__, delay, None)
        return transport_error(exc, method, f"{self.url}{path}", state.attempts), delay

    def _notify(self, state: RetryState, reason: str, delay: float, retry_after: float | None) -> None:
        event = RetryEvent(attempt=state.attempts, reason=reason, delay_s=delay, retry_after_s=retry_after)
        log.info("attempt %d failed (%s); retrying in %.2f s", event.attempt, reason, delay)
        if self.on_retry is not None:
            self.on_retry(event)

    @staticmethod
    def _json(response: httpx.Response) -> dict:
        try:
            data = response.json()
        except ValueError as exc:
            raise UnexpectedResponse(f"{response.request.method} {response.request.url.path}: the answer is "
                                     f"not JSON ({exc}); is this an mhcflash sampling service?") from None
        if not isinstance(data, dict):
            raise UnexpectedResponse(f"{response.request.method} {response.request.url.path}: expected a JSON "
                                     f"object, got {type(data).__name__}")
        return data

    @staticmethod
    def _readiness(response: httpx.Response) -> tuple[bool, str]:
        """(ready, reason) from a `/ready` answer; raises for an answer no sampling service gives."""
        if response.status_code == 200:
            return True, "ready"
        if response.status_code >= 500:
            try:
                reason = response.json().get("reason") or response.json().get("detail")
            except (ValueError, AttributeError):
                reason = None
            return False, f"{response.status_code} {reason or response.reason_phrase}"
        raise error_from_response(response, None)
