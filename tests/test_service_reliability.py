"""Service reliability: overload, disconnects, timeouts, injected OOM / step errors / worker crashes,
draining shutdown (in-process and SIGTERM), API key, body limits, junk input, unsafe weights.

Every test is bounded (tiny model, T = 20, a few requests) and runs on CPU.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from service.app import create_app
from service.testing import asgi_client, make_tiny_weights, serve_in_thread, tiny_settings, wait_for

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_tiny_weights(tmp_path_factory.mktemp("rel") / "tiny")


def _engine(app):
    return app.state.service.engine


def _metric(app, name, **labels):
    value = app.state.service.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def test_queue_full_answers_429_fast_and_recovers(weights):
    async def run():
        app = create_app(tiny_settings(weights, queue_max_samples=8, residue_budget=40))
        async with asgi_client(app) as c:
            eng = _engine(app)
            big = asyncio.create_task(c.post("/sample", json={"length": 30, "count": 8}))
            assert await wait_for(lambda: eng.load()[0] >= 6)
            t0 = time.monotonic()
            r = await c.post("/sample", json={"length": 13, "count": 3})
            rejected_in = time.monotonic() - t0
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            assert "queue is full" in r.json()["detail"]
            assert (await big).status_code == 200  # accepted work is unaffected
            ok = await c.post("/sample", json={"length": 13, "count": 3})  # load gone: served again
            assert ok.status_code == 200
            assert _metric(app, "mhcflash_requests_rejected_total", reason="queue_full") == 1
            return rejected_in

    assert asyncio.run(run()) < 0.5


def test_disconnecting_client_frees_its_slots(weights):
    # One 60-residue sample per step (budget 64): 8 samples would take 8 x 20 steps.
    with serve_in_thread(tiny_settings(weights, residue_budget=64)) as srv:
        eng = srv.app.state.service.engine
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/sample", json={"length": 60, "count": 8}, timeout=0.4)
        freed = asyncio.run(wait_for(lambda: eng.load() == (0, 0), timeout=5))
        assert freed
        assert eng.stats.samples_cancelled >= 6 and eng.stats.samples_completed <= 2
        r = httpx.post(srv.url + "/sample", json={"length": 13}, timeout=30)
        assert r.status_code == 200


def test_cancelled_request_task_frees_slots(weights):
    async def run():
        app = create_app(tiny_settings(weights, residue_budget=64))
        async with asgi_client(app) as c:
            eng = _engine(app)
            task = asyncio.create_task(c.post("/sample", json={"length": 60, "count": 6}))
            assert await wait_for(lambda: eng.stats.batches_run >= 2)
            task.cancel()
            assert await wait_for(lambda: eng.load() == (0, 0), timeout=5)
            assert eng.stats.samples_cancelled >= 5
            assert _metric(app, "mhcflash_samples_cancelled_total") >= 5

    asyncio.run(run())


def test_request_timeout_gives_504_and_drops_samples(weights):
    async def run():
        app = create_app(tiny_settings(weights, residue_budget=64, request_timeout_s=0.3))
        async with asgi_client(app) as c:
            r = await c.post("/sample", json={"length": 60, "count": 6})
            assert r.status_code == 504 and "not finished within 0.3 s" in r.json()["detail"]
            assert await wait_for(lambda: _engine(app).load() == (0, 0), timeout=5)
            assert _metric(app, "mhcflash_errors_total", kind="timeout") == 1

    asyncio.run(run())


class _FaultyStep:
    """Wraps the engine's step function (denoiser + reverse step); raises an injected error when
    `fault(x, t, mask)` says so."""

    def __init__(self, inner, fault):
        self.inner, self.fault = inner, fault

    def __getattr__(self, name):  # graphed, stats: the real step's
        return getattr(self.inner, name)

    def __call__(self, x, t, mask, noise, noise_scale, t_prev=None):  # x [B, L, 3], t, t_prev [B], mask [B, L]
        err = self.fault(x, t, mask)
        if err is not None:
            raise err
        return self.inner(x, t, mask, noise, noise_scale, t_prev)


def _coords(pdb_text):
    rows = [ln for ln in pdb_text.splitlines() if ln.startswith("ATOM")]
    return torch.tensor([[float(r[30:38]), float(r[38:46]), float(r[46:54])] for r in rows])  # [L, 3]


def test_oom_splits_batch_and_keeps_results(weights):
    bodies = [{"length": 13, "seed": 1}, {"length": 22, "seed": 2}, {"length": 29, "seed": 3, "count": 2}]

    async def run(inject):
        app = create_app(tiny_settings(weights))
        async with asgi_client(app) as c:
            eng = _engine(app)
            if inject:  # "out of memory" whenever a step holds more than 2 samples
                oom = torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
                eng.step = _FaultyStep(eng.step, lambda x, t, m: oom if x.shape[0] > 2 else None)
            rs = await asyncio.gather(*[c.post("/sample", json=b) for b in bodies])
            return [r.status_code for r in rs], rs, eng, app

    codes, faulty, eng, app = asyncio.run(run(True))
    assert codes == [200, 200, 200]
    assert eng.stats.oom_retries >= 1 and _metric(app, "mhcflash_errors_total", kind="oom") >= 1
    assert eng.residue_budget < 256 and eng.stats.samples_failed == 0
    _, clean, _, _ = asyncio.run(run(False))
    for a, b in zip(faulty, clean):  # splitting reuses each sample's noise: same backbones
        for sa, sb in zip(a.json()["samples"], b.json()["samples"]):
            assert torch.allclose(_coords(sa["pdb"]), _coords(sb["pdb"]), atol=2e-3, rtol=0)


def test_oom_on_one_sample_fails_only_its_request(weights):
    async def run():
        app = create_app(tiny_settings(weights))
        async with asgi_client(app) as c:
            eng = _engine(app)
            oom = torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
            # Any batch holding a real 40-residue chain runs out of memory.
            eng.step = _FaultyStep(eng.step, lambda x, t, m: oom if (m.sum(1) >= 40).any() else None)
            big, small = await asyncio.gather(c.post("/sample", json={"length": 40}),
                                              c.post("/sample", json={"length": 13}))
            assert big.status_code == 503 and "out of GPU memory for length 40" in big.json()["detail"]
            assert small.status_code == 200
            assert (await c.post("/sample", json={"length": 17})).status_code == 200  # still serving

    asyncio.run(run())


def test_step_error_fails_only_that_batch_and_server_keeps_serving(weights):
    async def run():
        app = create_app(tiny_settings(weights))
        async with asgi_client(app) as c:
            eng = _engine(app)
            calls = {"n": 0}

            def once(x, t, m):
                calls["n"] += 1
                return RuntimeError("injected kernel failure /secret/path") if calls["n"] == 3 else None

            eng.step = _FaultyStep(eng.step, once)
            r = await c.post("/sample", json={"length": 20})
            assert r.status_code == 503 and "error id" in r.json()["detail"]
            assert "secret" not in r.text and "Traceback" not in r.text
            assert (await c.post("/sample", json={"length": 20})).status_code == 200
            assert _metric(app, "mhcflash_errors_total", kind="step") == 1 and eng.alive

    asyncio.run(run())


def test_worker_crash_is_restarted_and_reported(weights):
    async def run():
        app = create_app(tiny_settings(weights, max_worker_restarts=1))
        async with asgi_client(app) as c:
            eng = _engine(app)
            eng.before_step = _crash_once()
            r = await c.post("/sample", json={"length": 20})
            assert r.status_code == 503 and "worker crashed" in r.json()["detail"]  # explicit, not lost
            assert (await c.post("/sample", json={"length": 20})).status_code == 200
            assert _metric(app, "mhcflash_engine_restarts_total") == 1
            assert _metric(app, "mhcflash_errors_total", kind="worker_crash") == 1
            assert (await c.get("/ready")).status_code == 200
            eng.before_step = _crash_once()  # second crash: no restarts left -> down
            r = await c.post("/sample", json={"length": 20})
            assert r.status_code == 503
            assert await wait_for(lambda: not eng.alive)
            ready = await c.get("/ready")
            assert ready.status_code == 503 and ready.json()["reason"] == "engine down"
            assert _metric(app, "mhcflash_engine_up") == 0
            r = await c.post("/sample", json={"length": 20})
            assert r.status_code == 503 and r.headers["retry-after"]

    asyncio.run(run())


def _crash_once():
    state = {"done": False}

    def hook():
        if not state["done"]:
            state["done"] = True
            raise SystemError("injected worker crash")

    return hook


def test_shutdown_drains_every_accepted_request(weights):
    async def run(timeout_s):
        app = create_app(tiny_settings(weights, residue_budget=64, shutdown_timeout_s=timeout_s))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            client = httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60)
            tasks = [asyncio.create_task(client.post("/sample", json={"length": 30 + i, "seed": i})) for i in range(5)]
            assert await wait_for(lambda: sum(_engine(app).load()) == 5)
        # lifespan exited: shutdown ran while the requests were in flight
        rs = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        await client.aclose()
        return [r.status_code for r in rs], rs

    codes, _ = asyncio.run(run(30.0))
    assert codes == [200] * 5  # drained: all finished
    codes, rs = asyncio.run(run(0.0))
    assert len(codes) == 5 and set(codes) <= {200, 503} and 503 in codes  # none lost: each answered
    assert all("shut down" in r.json()["detail"] for r in rs if r.status_code == 503)


def _subprocess_env(weights, **extra):
    env = {**os.environ, "PYTHONPATH": str(REPO), "MHCFLASH_WEIGHTS": str(weights), "MHCFLASH_DEVICE": "cpu",
           "MHCFLASH_LOG_LEVEL": "info", "MHCFLASH_RESIDUE_BUDGET": "64"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def test_sigterm_drains_in_flight_requests(weights):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=_subprocess_env(weights, MHCFLASH_PORT=port),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "service did not become ready"
            time.sleep(0.2)

        async def run():
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                tasks = [asyncio.create_task(c.post("/sample", json={"length": 40 + i})) for i in range(4)]
                await asyncio.sleep(0.5)  # accepted and running
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        rs = asyncio.run(run())
        assert [r.status_code for r in rs] == [200] * 4
        # uvicorn re-raises the captured SIGTERM after its graceful shutdown: exit by that signal.
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0]
    assert "draining accepted requests" in out


def test_bad_weights_fail_startup_clearly_without_running_code(weights, tmp_path):
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.txt").write_text((weights / "config.txt").read_text())
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(evil / "model.pt", "wb") as f:
        pickle.dump({"state_dict": {"w": Evil()}}, f, protocol=2)
    proc = subprocess.run([sys.executable, "-m", "service"], cwd=REPO, env=_subprocess_env(evil, MHCFLASH_PORT=0),
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0
    assert "cannot start" in proc.stderr and "model.pt refused" in proc.stderr
    assert not marker.exists()

    async def start(path):
        app = create_app(tiny_settings(path))
        async with app.router.lifespan_context(app):
            pass

    from model.weights_io import WeightsError

    with pytest.raises(WeightsError, match="does not exist"):
        asyncio.run(start(tmp_path / "missing"))


def test_api_key_enforced(weights):
    async def run():
        app = create_app(tiny_settings(weights, api_key="s3cret-key"))
        async with asgi_client(app) as c:
            for headers in ({}, {"x-api-key": "wrong"}, {"x-api-key": "s3cret-ke"}):
                r = await c.post("/sample", json={"length": 13}, headers=headers)
                assert r.status_code == 401 and r.json() == {"detail": "unauthorized"}
            assert (await c.get("/info")).status_code == 401
            ok = await c.post("/sample", json={"length": 13}, headers={"x-api-key": "s3cret-key"})
            assert ok.status_code == 200
            assert (await c.get("/health")).status_code == 200 and (await c.get("/ready")).status_code == 200
            assert _metric(app, "mhcflash_requests_rejected_total", reason="unauthorized") == 4

    asyncio.run(run())


JUNK = [
    (b"", "application/json"), (b"null", "application/json"), (b"[]", "application/json"),
    (b'"length"', "application/json"), (b"{", "application/json"), (b'{"length": NaN}', "application/json"),
    (b'{"length": 1e309}', "application/json"), (b'{"length": 20, "noise_scale": Infinity}', "application/json"),
    (b'{"length": 20, "noise_scale": 1e400}', "application/json"),
    (b'{"length": ' + b"9" * 2000 + b"}", "application/json"), (b'{"length": {"a": [[[[]]]]}}', "application/json"),
    (b"\xff\xfe\x00garbage", "application/json"), (b'{"length": 20}', "text/plain"),
    (b'{"length": 20}', "application/x-www-form-urlencoded"), (b"length=20", "multipart/form-data"),
    (b'{"length": 20}' + b" " * 5000, "application/json"), (b'{"length": 20, "count": null}', "application/json"),
    (b'{"length": 20, "seed": "../../etc/passwd"}', "application/json"),
    (b'{"weights": "/etc/passwd", "length": 20}', "application/json"),
]


def test_junk_input_is_always_4xx(weights):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    async def run():
        app = create_app(tiny_settings(weights))
        async with asgi_client(app) as c:
            for body, ctype in JUNK:
                r = await c.post("/sample", content=body, headers={"content-type": ctype})
                assert 400 <= r.status_code < 500, (body[:60], r.status_code, r.text)
                assert "Traceback" not in r.text
            r = await c.post("/sample", content=b"x" * 10_000, headers={"content-type": "application/json"})
            assert r.status_code == 413

            async def chunks():
                for _ in range(10):
                    yield b" " * 1000

            r = await c.post("/sample", content=chunks(), headers={"content-type": "application/json"})
            assert r.status_code == 413  # chunked body without Content-Length is limited too
            assert (await c.get("/sample")).status_code == 405
            return app, c

    # Property-based junk: random JSON values under the request's keys (bounded: 40 examples).
    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                               | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                               | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
    bodies = st.dictionaries(st.sampled_from(["length", "count", "seed", "noise_scale", "x"]), json_values,
                             max_size=4).filter(lambda d: not (isinstance(d.get("length"), int)
                                                               and not isinstance(d.get("length"), bool)
                                                               and 5 <= d["length"] <= 64))

    async def fuzz(samples):
        app = create_app(tiny_settings(weights))
        async with asgi_client(app) as c:
            for body in samples:
                r = await c.post("/sample", content=json.dumps(body), headers={"content-type": "application/json"})
                assert 400 <= r.status_code < 500, (body, r.status_code, r.text)

    asyncio.run(run())
    collected = []

    @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(bodies)
    def collect(body):
        collected.append(body)

    collect()
    asyncio.run(fuzz(collected))


def test_failed_compile_falls_back_to_eager_and_serves(weights, monkeypatch, caplog):
    """MHCFLASH_COMPILE=on with a compiler that fails (as without gcc / Python headers for Triton):
    the warm-up logs it, the pair stack runs eagerly, /info says so and requests are served."""
    import model.network.compile as compile_module
    from model.network.compile import compiled_parts

    real = compile_module.compile_denoiser

    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("injected: no C compiler for the generated kernels")

    monkeypatch.setattr(compile_module, "compile_denoiser", lambda d: real(d, backend=broken_backend))
    with caplog.at_level("WARNING", logger="mhcflash"), serve_in_thread(tiny_settings(weights, compile="on")) as srv:
        info = httpx.get(srv.url + "/info", timeout=10).json()
        r = httpx.post(srv.url + "/sample", json={"length": 12, "seed": 3}, timeout=60)
        denoiser = srv.app.state.service.sampler.denoiser
    assert info["compiled"] == "none"
    assert r.status_code == 200 and r.json()["samples"][0]["pdb"].startswith(("HEADER", "ATOM", "MODEL", "REMARK"))
    assert compiled_parts(denoiser) == []  # the pair stack and the point rotations are eager again
    assert any("torch.compile of the model (pair stack / point rotations) failed" in rec.getMessage() and "injected" in rec.getMessage()
               for rec in caplog.records)


def test_compile_without_warm_up_serves_eagerly(weights, caplog):
    """Without the warm-up a failed compile would hit a request's step: the service does not compile."""
    with caplog.at_level("WARNING", logger="mhcflash"), \
            serve_in_thread(tiny_settings(weights, compile="on", warmup=False)) as srv:
        info = httpx.get(srv.url + "/info", timeout=10).json()
        layers = srv.app.state.service.sampler.denoiser.pair_transform_net.layers
    assert info["compiled"] == "none"
    assert all(layer._compiled_call_impl is None for layer in layers)
    assert any("MHCFLASH_COMPILE needs the warm-up" in rec.getMessage() for rec in caplog.records)
