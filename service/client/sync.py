"""`Client`: the blocking client of the sampling service (notebooks, scripts)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Self

import httpx

from service.client._base import DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_READ_TIMEOUT_S, ClientBase
from service.client.errors import NotReady
from service.client.results import SampleResult, ServiceInfo
from service.client.retry import RetryEvent, RetryPolicy, RetryState


class Client(ClientBase):
    """Blocking client of an mhcflash sampling service.

    Args:
        url: the service's base URL, e.g. ``http://127.0.0.1:8000``.
        api_key: sent as ``X-API-Key`` (needed on ``/sample`` and ``/info`` when the service has
            ``MHCFLASH_API_KEY`` set).
        timeout: seconds to wait for an answer (read timeout); a call's ``timeout=`` overrides it.
        connect_timeout: seconds to wait for a connection.
        retry: which failures are retried and how long to wait (`RetryPolicy`, module ``retry``).
        on_retry: called with a `RetryEvent` before each wait (logging, progress).
        transport: an httpx transport (tests: ``httpx.MockTransport``).

    Use as a context manager, or call ``close()``.
    """

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = DEFAULT_READ_TIMEOUT_S,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S, retry: RetryPolicy | None = None,
                 on_retry: Callable[[RetryEvent], None] | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(url, api_key=api_key, timeout=timeout, connect_timeout=connect_timeout, retry=retry,
                         on_retry=on_retry)
        self._http = httpx.Client(transport=transport, **self._http_options())
        self._sleep = time.sleep

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, *, replay_safe: bool, json: dict | None = None,
                 timeout: float | None = None) -> httpx.Response:
        state = RetryState(self.retry, self._rng)
        while True:
            try:
                response = self._http.request(method, path, json=json, **self._send_options(timeout))
            except httpx.TransportError as exc:
                error, delay = self._on_transport(exc, method, path, state, replay_safe)
                if delay is None:
                    raise error from exc
            else:
                if response.status_code < 400:
                    return response
                error, delay = self._on_status(response, state)
                if delay is None:
                    raise error
            self._sleep(delay)
            state.advance(delay)

    def sample(self, length: int, count: int = 1, seed: int | None = None, noise_scale: float | None = None, *,
               steps: int | None = None, timeout: float | None = None) -> SampleResult:
        """`count` backbones of `length` residues; sample i uses seed `seed + i` (None: random, returned).

        `noise_scale`: None keeps the service's default (0.6). `steps`: sampling steps, 1 .. the model's
        T (None: the service's default; the result's `steps` says which). `timeout`: read timeout of this call.
        """
        body = self._sample_body(length, count, seed, noise_scale, steps)
        response = self._request("POST", "/sample", json=body, replay_safe=seed is not None, timeout=timeout)
        return SampleResult.from_json(self._json(response))

    def info(self, *, timeout: float | None = None) -> ServiceInfo:
        """Model, mode, weights hash, device, attention backend and limits of the service."""
        return ServiceInfo.from_json(self._json(self._request("GET", "/info", replay_safe=True, timeout=timeout)))

    def health(self) -> bool:
        """Liveness: True when the process answers 200; False when unreachable or answering an error."""
        try:
            response = self._http.get("/health", timeout=self._probe_timeout)
        except httpx.TransportError:
            return False
        return response.status_code == 200

    def ready(self) -> bool:
        """Readiness: True once the weights are loaded and warmed up; False when starting, draining or down."""
        return self._poll_ready()[0]

    def wait_ready(self, timeout: float = 300.0, interval: float = 1.0) -> float:
        """Poll `/ready` until the service is ready; return the seconds waited. Raises `NotReady`."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        while True:
            ready, reason = self._poll_ready()
            now = time.monotonic()
            if ready:
                return now - t0
            if now >= deadline:
                raise NotReady(f"{self.url} not ready after {now - t0:.1f} s: {reason}")
            self._sleep(min(interval, deadline - now))

    def _poll_ready(self) -> tuple[bool, str]:
        try:
            return self._readiness(self._http.get("/ready", timeout=self._probe_timeout))
        except httpx.TransportError as exc:
            return False, f"unreachable ({type(exc).__name__}: {exc})"
