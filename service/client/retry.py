"""When the client retries, and how long it waits: `RetryPolicy`.

| outcome of an attempt | retried? |
|---|---|
| 429 (queue full), 503 (not ready, shutting down, engine down, a step failed) | yes: the service says the request produced nothing |
| could not connect (connect error / connect timeout / no free connection) | yes: the request never reached the service |
| connection dropped after the request was sent | only when replaying is safe: `GET`, or `POST /sample` with a seed (same seeds, same backbones) |
| read / write timeout | no: the next attempt would wait as long again |
| any other status (400, 401, 404, 413, 415, 422, 500, 504, ...) | no |

The wait before a retry is the server's `Retry-After` (seconds or an HTTP date) when it sent one, else
exponential backoff with jitter: `backoff_s * 2**(retry - 1)`, capped at `backoff_max_s`, of which a
random half is waited (`equal jitter`: retries of many clients spread out, none retries at once).
Retries stop after `max_attempts` requests, or when the next wait would take the total time spent
waiting past `max_wait_s` (then the last error is raised at once, with its Retry-After).
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass

import httpx

RETRY_STATUSES = frozenset({429, 503})
NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)  # the request did not reach the server
DROPPED = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)  # sent; no complete answer came back


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds of the retries (see the module docstring). `RetryPolicy(max_attempts=1)`: never retry."""

    max_attempts: int = 5
    max_wait_s: float = 300.0
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1 (got {self.max_attempts})")
        if min(self.max_wait_s, self.backoff_s, self.backoff_max_s) < 0:
            raise ValueError("max_wait_s, backoff_s and backoff_max_s must be >= 0")

    def backoff(self, retry: int, rng: random.Random) -> float:
        """Wait before retry number `retry` (1, 2, ...) when the server sent no Retry-After."""
        ceiling = min(self.backoff_max_s, self.backoff_s * 2 ** (retry - 1))
        return ceiling / 2 + rng.uniform(0.0, ceiling / 2)


@dataclass(frozen=True)
class RetryEvent:
    """Passed to `on_retry` before each wait: the attempt that failed (1-based), why, and the wait."""

    attempt: int
    reason: str  # "429", "503", "ConnectError", ...
    delay_s: float
    retry_after_s: float | None  # the server's Retry-After, when it sent one


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or an HTTP date); None if absent or invalid."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def retryable_error(exc: httpx.TransportError, replay_safe: bool) -> bool:
    """Whether a request that failed with `exc` may be sent again (see the module docstring)."""
    if isinstance(exc, NEVER_SENT):
        return True
    return replay_safe and isinstance(exc, DROPPED)


class RetryState:
    """The attempts of one call: counts them and decides each wait (None: give up)."""

    def __init__(self, policy: RetryPolicy, rng: random.Random) -> None:
        self.policy = policy
        self.rng = rng
        self.attempts = 1
        self.waited = 0.0

    def next_delay(self, retry_after: float | None) -> float | None:
        if self.attempts >= self.policy.max_attempts:
            return None
        delay = retry_after if retry_after is not None else self.policy.backoff(self.attempts, self.rng)
        if self.waited + delay > self.policy.max_wait_s:
            return None
        return delay

    def advance(self, delay: float) -> None:
        self.waited += delay
        self.attempts += 1
