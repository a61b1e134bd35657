"""`AsyncClient`: the asyncio client of the sampling service, with `sample_many` for many lengths."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Self

import httpx

from service.client._base import DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_READ_TIMEOUT_S, ClientBase
from service.client.errors import NotReady
from service.client.results import SampleResult, ServiceInfo
from service.client.retry import RetryEvent, RetryPolicy, RetryState


class AsyncClient(ClientBase):
    """asyncio client of an mhcflash sampling service; same arguments and calls as `Client`, awaited.

    Use as ``async with AsyncClient(url) as client:``, or ``await client.aclose()``.
    """

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = DEFAULT_READ_TIMEOUT_S,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S, retry: RetryPolicy | None = None,
                 on_retry: Callable[[RetryEvent], None] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(url, api_key=api_key, timeout=timeout, connect_timeout=connect_timeout, retry=retry,
                         on_retry=on_retry)
        self._http = httpx.AsyncClient(transport=transport, **self._http_options())
        self._sleep = asyncio.sleep

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, *, replay_safe: bool, json: dict | None = None,
                       timeout: float | None = None) -> httpx.Response:
        state = RetryState(self.retry, self._rng)
        while True:
            try:
                response = await self._http.request(method, path, json=json, **self._send_options(timeout))
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
            await self._sleep(delay)
            state.advance(delay)

    async def sample(self, length: int, count: int = 1, seed: int | None = None, noise_scale: float | None = None,
                     *, steps: int | None = None, timeout: float | None = None) -> SampleResult:
        """`count` backbones of `length` residues; sample i uses seed `seed + i` (see `Client.sample`)."""
        body = self._sample_body(length, count, seed, noise_scale, steps)
        response = await self._request("POST", "/sample", json=body, replay_safe=seed is not None, timeout=timeout)
        return SampleResult.from_json(self._json(response))

    async def sample_many(self, lengths: Sequence[int], count: int = 1, seed: int | None = None,
                          noise_scale: float | None = None, *, steps: int | None = None, concurrency: int = 4,
                          timeout: float | None = None) -> list[SampleResult]:
        """One request per length, at most `concurrency` in flight; results in the order of `lengths`.

        With a `seed`, request i uses seed `seed + i * count`: the samples of all requests get the
        consecutive seeds `seed, seed + 1, ...` (as `mhcflash sample -l L1 -l L2 --count N` numbers
        them), so repeated lengths never repeat a backbone. The first error cancels the requests
        still running and is raised.
        """
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1 (got {concurrency})")
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int, length: int) -> SampleResult:
            async with gate:
                first = None if seed is None else seed + i * count
                return await self.sample(length, count, first, noise_scale, steps=steps, timeout=timeout)

        tasks = [asyncio.create_task(one(i, length)) for i, length in enumerate(lengths)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()  # no-op for the finished ones
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def info(self, *, timeout: float | None = None) -> ServiceInfo:
        """Model, mode, weights hash, device, attention backend and limits of the service."""
        response = await self._request("GET", "/info", replay_safe=True, timeout=timeout)
        return ServiceInfo.from_json(self._json(response))

    async def health(self) -> bool:
        """Liveness: True when the process answers 200; False when unreachable or answering an error."""
        try:
            response = await self._http.get("/health", timeout=self._probe_timeout)
        except httpx.TransportError:
            return False
        return response.status_code == 200

    async def ready(self) -> bool:
        """Readiness: True once the weights are loaded and warmed up; False when starting, draining or down."""
        return (await self._poll_ready())[0]

    async def wait_ready(self, timeout: float = 300.0, interval: float = 1.0) -> float:
        """Poll `/ready` until the service is ready; return the seconds waited. Raises `NotReady`."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        while True:
            ready, reason = await self._poll_ready()
            now = time.monotonic()
            if ready:
                return now - t0
            if now >= deadline:
                raise NotReady(f"{self.url} not ready after {now - t0:.1f} s: {reason}")
            await self._sleep(min(interval, deadline - now))

    async def _poll_ready(self) -> tuple[bool, str]:
        try:
            return self._readiness(await self._http.get("/ready", timeout=self._probe_timeout))
        except httpx.TransportError as exc:
            return False, f"unreachable ({type(exc).__name__}: {exc})"
