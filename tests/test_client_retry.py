"""The client's retry policy, timeouts and concurrency, against scripted answers (httpx.MockTransport).

The waits are recorded instead of slept (the client's sleep is replaced), so the tests assert the exact
waits the policy chose in no time. The real service's 429 is retried in tests/test_client.py.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time

import httpx
import pytest

from service.client import (
    AsyncClient,
    Client,
    ConnectionFailed,
    InvalidRequest,
    Overloaded,
    RequestTimedOut,
    RetryPolicy,
    ServerError,
    ServerTimeout,
    Unauthorized,
    Unavailable,
    UnexpectedResponse,
)
from service.client.retry import parse_retry_after

URL = "http://mhcflash.test"
FAST = RetryPolicy(max_attempts=5, max_wait_s=60.0, backoff_s=0.5, backoff_max_s=8.0)


def sample_json(length: int = 9, count: int = 1, seed: int = 0) -> dict:
    return {"request_id": "r1", "model": "tiny", "mode": "mhc_flash", "weights_sha256": "ab" * 32, "noise_scale": 0.6,
            "samples": [{"id": f"r1-{i}", "index": i, "length": length, "seed": seed + i, "pdb": "END\n"}
                        for i in range(count)],
            "timings": {"queue_wait_s": 0.0, "sampling_s": 0.1, "total_s": 0.1}}


class Script:
    """Answers requests with the next item (a Response or an exception to raise); the last repeats."""

    def __init__(self, *items) -> None:
        self.items = list(items)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        item = self.items[min(len(self.requests), len(self.items)) - 1]
        if isinstance(item, type) and issubclass(item, Exception):
            raise item("scripted failure", request=request)
        return httpx.Response(item.status_code, headers=item.headers, content=item.content)  # a fresh copy


def status(code: int, retry_after: str | None = None, detail="scripted") -> httpx.Response:
    headers = {} if retry_after is None else {"retry-after": retry_after}
    return httpx.Response(code, json={"detail": detail}, headers=headers)


OK = httpx.Response(200, json=sample_json())


def call(kind: str, handler, method: str, *args, waits: list | None = None, events: list | None = None,
         policy: RetryPolicy = FAST, **kwargs):
    """`Client` or `AsyncClient` (`kind`) over `handler`: the call's result; waits and retry events recorded."""
    waits = [] if waits is None else waits
    options = {"retry": policy, "transport": httpx.MockTransport(handler),
               "on_retry": None if events is None else events.append}
    if kind == "sync":
        with Client(URL, **options) as client:
            client._sleep = waits.append
            return getattr(client, method)(*args, **kwargs)

    async def run():
        async with AsyncClient(URL, **options) as client:
            async def record(delay: float) -> None:
                waits.append(delay)

            client._sleep = record
            return await getattr(client, method)(*args, **kwargs)

    return asyncio.run(run())


KINDS = pytest.mark.parametrize("kind", ["sync", "async"])


@KINDS
def test_429_and_503_wait_for_retry_after_then_succeed(kind):
    script = Script(status(429, "2"), status(503, "3"), OK)
    waits, events = [], []
    result = call(kind, script, "sample", 9, seed=4, waits=waits, events=events)
    assert result.samples[0].length == 9
    assert waits == [2.0, 3.0]
    assert [(e.attempt, e.reason, e.retry_after_s) for e in events] == [(1, "429", 2.0), (2, "503", 3.0)]
    bodies = [json.loads(r.content) for r in script.requests]
    assert bodies == [{"length": 9, "count": 1, "seed": 4}] * 3  # the same request each time


@KINDS
def test_backoff_without_retry_after_is_exponential_with_jitter(kind):
    policy = RetryPolicy(max_attempts=5, max_wait_s=60.0, backoff_s=1.0, backoff_max_s=3.0)
    waits = []
    script = Script(status(503), status(503), status(503), status(503), OK)
    call(kind, script, "sample", 9, waits=waits, policy=policy)
    assert len(waits) == 4 and len(script.requests) == 5
    for wait, ceiling in zip(waits, [1.0, 2.0, 3.0, 3.0]):  # 1 * 2^(n-1), capped at 3; a random half waited
        assert ceiling / 2 <= wait <= ceiling
    assert len(set(waits)) == 4  # jittered: no two clients retry in lockstep


@KINDS
def test_attempts_are_bounded(kind):
    script = Script(status(429, "1", "the sampling queue is full; retry later"))
    waits = []
    with pytest.raises(Overloaded) as info:
        call(kind, script, "sample", 9, waits=waits, policy=RetryPolicy(max_attempts=3))
    assert len(script.requests) == 3 and waits == [1.0, 1.0]
    err = info.value
    assert err.status_code == 429 and err.retry_after == 1.0 and err.attempts == 3
    assert str(err) == "429 from POST /sample: the sampling queue is full; retry later (Retry-After 1 s) " \
                       "(after 3 attempts)"


@KINDS
def test_total_wait_is_bounded(kind):
    policy = RetryPolicy(max_attempts=10, max_wait_s=25.0)
    script, waits = Script(status(503, "10")), []
    with pytest.raises(Unavailable) as info:
        call(kind, script, "sample", 9, waits=waits, policy=policy)
    assert waits == [10.0, 10.0] and len(script.requests) == 3  # a third wait would pass 25 s in all
    assert info.value.retry_after == 10.0
    script, waits = Script(status(429, "100")), []
    with pytest.raises(Overloaded):
        call(kind, script, "sample", 9, waits=waits, policy=policy)
    assert waits == [] and len(script.requests) == 1  # longer than the whole budget: raised at once


@pytest.mark.parametrize(("code", "kind_of_error"), [
    (400, InvalidRequest), (401, Unauthorized), (404, InvalidRequest), (413, InvalidRequest),
    (415, InvalidRequest), (422, InvalidRequest), (500, ServerError), (504, ServerTimeout)])
def test_no_retry_on_other_statuses(code, kind_of_error):
    script, waits = Script(status(code, "1")), []
    with pytest.raises(kind_of_error) as info:
        call("sync", script, "sample", 9, seed=1, waits=waits)
    assert len(script.requests) == 1 and waits == [] and info.value.status_code == code
    assert "scripted" in str(info.value) and info.value.attempts == 1


def test_422_items_name_the_field_and_500_the_error_id():
    detail = [{"type": "value_error", "loc": ["body", "length"], "msg": "length must be between 5 and 64 residues "
                                                                       "(got 500)"},
              {"type": "int_type", "loc": ["body", "count"], "msg": "Input should be a valid integer"}]
    with pytest.raises(InvalidRequest) as info:
        call("sync", Script(httpx.Response(422, json={"detail": detail})), "sample", 500)
    assert [f.field for f in info.value.fields] == ["length", "count"]
    assert str(info.value) == "422 from POST /sample: length must be between 5 and 64 residues (got 500); " \
                              "count: Input should be a valid integer"
    body = {"detail": "internal server error", "error_id": "0123456789ab"}
    with pytest.raises(ServerError, match=r"500 from POST /sample: internal server error \(error id 0123456789ab\)"):
        call("sync", Script(httpx.Response(500, json=body)), "sample", 9)


@KINDS
def test_dropped_connection_is_retried_only_when_replay_is_safe(kind):
    script = Script(httpx.RemoteProtocolError, OK)
    with pytest.raises(ConnectionFailed, match="cannot reach POST http://mhcflash.test/sample"):
        call(kind, script, "sample", 9)  # no seed: a replay would sample other backbones
    assert len(script.requests) == 1
    script = Script(httpx.RemoteProtocolError, OK)
    assert call(kind, script, "sample", 9, seed=3).samples  # a seed: the replay gives the same backbones
    assert len(script.requests) == 2
    script = Script(httpx.ReadError, httpx.Response(200, json={"detail": "not info"}), OK)
    with pytest.raises(UnexpectedResponse, match=r"GET /info response: missing field '\w+' \(is this an mhcflash"):
        call(kind, script, "info")  # GET: retried; then an answer that is not /info's schema
    assert len(script.requests) == 2
    script = Script(httpx.ConnectError, httpx.ConnectTimeout, OK)
    assert call(kind, script, "sample", 9).samples  # never reached the server: always retried
    assert len(script.requests) == 3


@KINDS
def test_read_timeout_is_not_retried(kind):
    script = Script(httpx.ReadTimeout, OK)
    with pytest.raises(RequestTimedOut, match="no answer from POST http://mhcflash.test/sample within the timeout"):
        call(kind, script, "sample", 9, seed=1)
    assert len(script.requests) == 1


def test_default_and_per_call_timeouts():
    script = Script(OK)
    call("sync", script, "sample", 9)
    call("sync", script, "sample", 9, timeout=5.0)
    first, second = (r.extensions["timeout"] for r in script.requests)
    assert first == {"connect": 10.0, "read": 660.0, "write": 30.0, "pool": None}  # past the server's 600 s
    assert second == {"connect": 10.0, "read": 5.0, "write": 30.0, "pool": None}


def test_retry_after_as_seconds_or_http_date():
    now = time.time()
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    for junk in (None, "", "-1", "soon", "1.5"):
        assert parse_retry_after(junk) is None


def test_sample_many_bounds_concurrency_and_numbers_seeds():
    in_flight, peak, bodies = 0, 0, []

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        body = json.loads(request.content)
        bodies.append(body)
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        return httpx.Response(200, json=sample_json(body["length"], body["count"], body["seed"]))

    lengths = [9, 30, 9, 12, 17, 9, 40]
    results = call("async", handler, "sample_many", lengths, count=2, seed=100, concurrency=3)
    assert peak == 3
    assert [r.samples[0].length for r in results] == lengths  # in the order asked
    assert [s.seed for r in results for s in r.samples] == list(range(100, 114))  # consecutive over all requests
    assert sorted(b["seed"] for b in bodies) == list(range(100, 114, 2))


def test_sample_many_raises_the_first_error_and_cancels_the_rest():
    finished = []

    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if body["length"] == 500:
            return httpx.Response(422, json={"detail": [{"loc": ["body", "length"], "msg": "length must be ..."}]})
        await asyncio.sleep(5)
        finished.append(body["length"])
        return httpx.Response(200, json=sample_json(body["length"]))

    t0 = time.monotonic()
    with pytest.raises(InvalidRequest, match="length must be"):
        call("async", handler, "sample_many", [9, 500, 12], concurrency=3)
    assert time.monotonic() - t0 < 4 and finished == []
