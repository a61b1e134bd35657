"""The Python client and `mhcflash client` against the real service over HTTP (uvicorn on 127.0.0.1).

A tiny random mHC + Flash-IPA model (T = 20 steps), served with an API key. The retry timing against
scripted answers is in tests/test_client_retry.py; here the real server's 429 is retried.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time

import numpy as np
import pytest
from biotite.structure.io.pdb import PDBFile
from typer.testing import CliRunner

from service import schemas
from service.cli import app
from service.client import (
    AsyncClient,
    Client,
    InvalidRequest,
    NotReady,
    RetryPolicy,
    Sample,
    SampleResult,
    Timings,
    Unauthorized,
)
from service.testing import serve_in_thread, tiny_settings

KEY = "client-test-key"
runner = CliRunner()


@pytest.fixture(scope="module")
def server(tiny_weights):
    with serve_in_thread(tiny_settings(tiny_weights, api_key=KEY)) as srv:
        yield srv


def read_ca(path) -> np.ndarray:
    atoms = PDBFile.read(str(path)).get_structure(model=1)
    assert set(atoms.atom_name) == {"CA"} and set(atoms.res_name) == {"ALA"}
    return atoms.coord  # [L, 3]


def test_results_mirror_the_service_schema():
    for client_type, schema in ((SampleResult, schemas.SampleResponse), (Sample, schemas.Sample),
                                (Timings, schemas.Timings)):
        assert [f.name for f in dataclasses.fields(client_type)] == list(schema.model_fields), client_type


def test_sync_sample_writes_valid_pdb_files_and_seeds_reproduce(server, tmp_path):
    with Client(server.url, api_key=KEY) as client:
        result = client.sample(13, count=2, seed=4)
        again = client.sample(13, seed=5)  # sample 1 of the first request had seed 4 + 1
    assert result.mode == "mhc_flash" and result.model == "tiny" and len(result.weights_sha256) == 64
    assert [(s.index, s.length, s.seed) for s in result.samples] == [(0, 13, 4), (1, 13, 5)]
    assert [s.id for s in result.samples] == [f"{result.request_id}-0", f"{result.request_id}-1"]
    assert 0 < result.timings.sampling_s <= result.timings.total_s and result.noise_scale == 0.6
    assert again.samples[0].pdb == result.samples[1].pdb and result.samples[0].pdb != result.samples[1].pdb

    paths = result.write_pdbs(tmp_path / "out")
    assert [p.name for p in paths] == ["sample_len13_seed4.pdb", "sample_len13_seed5.pdb"]
    for path in paths:
        ca = read_ca(path)
        assert ca.shape == (13, 3) and np.isfinite(ca).all() and np.abs(ca).max() > 0.1
    before = paths[0].read_text()
    with pytest.raises(FileExistsError, match="sample_len13_seed4.pdb exists \\(and 1 more\\); not overwritten"):
        result.write_pdbs(tmp_path / "out", prefix="sample")
    with pytest.raises(FileExistsError, match="sample_len13_seed5.pdb exists; not overwritten"):
        again.write_pdbs(tmp_path / "out")
    assert paths[0].read_text() == before
    assert again.write_pdbs(tmp_path / "out", overwrite=True) == paths[1:]
    by_id = result.write_pdbs(tmp_path / "ids", prefix=None)
    assert [p.name for p in by_id] == [f"{s.id}.pdb" for s in result.samples]


def test_async_sample_many_and_sample(server):
    async def run():
        async with AsyncClient(server.url, api_key=KEY) as client:
            many = await client.sample_many([9, 11, 9], seed=10, concurrency=3)
            one = await client.sample(9, seed=12)
            return many, one

    many, one = asyncio.run(run())
    assert [(s.length, s.seed) for r in many for s in r.samples] == [(9, 10), (11, 11), (9, 12)]
    assert [r.steps for r in many] == [20, 20, 20]  # the service's default: the tiny model's T
    assert one.samples[0].pdb == many[2].samples[0].pdb  # same length and seed: same backbone
    assert many[0].samples[0].pdb != many[2].samples[0].pdb
    assert len({r.request_id for r in many}) == 3


def test_steps_are_sent_and_reported(server):
    async def run():
        async with AsyncClient(server.url, api_key=KEY) as client:
            return await client.sample_many([9, 11], seed=3, steps=4)

    many = asyncio.run(run())
    assert [r.steps for r in many] == [4, 4]
    with Client(server.url, api_key=KEY) as client:
        one = client.sample(9, seed=3, steps=4)
        info = client.info()
    assert one.steps == 4 and one.samples[0].pdb == many[0].samples[0].pdb
    assert (info.limits.max_steps, info.limits.default_steps) == (20, 20)


def test_api_key_required_and_accepted(server):
    with Client(server.url) as anonymous:
        assert anonymous.health() and anonymous.ready()  # probes need no key
        for call in (lambda: anonymous.sample(9, seed=1), anonymous.info):
            with pytest.raises(Unauthorized) as info:
                call()
            assert info.value.status_code == 401 and info.value.attempts == 1
    with Client(server.url, api_key="wrong") as wrong, pytest.raises(Unauthorized, match="401 from GET /info"):
        wrong.info()
    with Client(server.url, api_key=KEY) as client:
        info = client.info()
    assert (info.model, info.mode, info.num_timesteps, info.device) == ("tiny", "mhc_flash", 20, "cpu")
    assert (info.limits.min_length, info.limits.max_length, info.limits.max_count) == (5, 64, 8)
    assert info.raw["auth"] is True and info.attention_backend == info.raw["attention"]["backend"]


def test_422_message_is_surfaced_without_retries(server):
    events = []
    with Client(server.url, api_key=KEY, on_retry=events.append) as client:
        with pytest.raises(InvalidRequest) as info:
            client.sample(500, seed=1)
        with pytest.raises(InvalidRequest, match="noise_scale must be between 0 and 2 \\(got 5\\)"):
            client.sample(9, noise_scale=5.0)
    err = info.value
    assert err.status_code == 422 and err.attempts == 1 and events == []
    assert [f.field for f in err.fields] == ["length"]
    assert str(err) == "422 from POST /sample: length must be between 5 and 64 residues (got 500)"


def test_wait_ready(server):
    with Client(server.url) as client:
        assert client.wait_ready(timeout=5) < 1.0
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    t0 = time.monotonic()
    with Client(f"http://127.0.0.1:{port}", connect_timeout=0.5) as client:
        assert not client.health() and not client.ready()
        with pytest.raises(NotReady, match=f"127.0.0.1:{port} not ready after .* s: unreachable \\(ConnectError"):
            client.wait_ready(timeout=0.6, interval=0.2)
    assert time.monotonic() - t0 < 5


def test_retry_honours_the_servers_retry_after_on_429(tiny_weights):
    # One request at a time, at most 3 samples waiting: a running request of 1 and a waiting one of 3
    # fill the queue until the first finishes.
    settings = tiny_settings(tiny_weights, queue_max_samples=3, max_count=3, max_batch_requests=1)
    with serve_in_thread(settings) as srv:
        engine = srv.app.state.service.engine

        async def run():
            async with AsyncClient(srv.url) as filler, AsyncClient(
                    srv.url, retry=RetryPolicy(max_attempts=20, max_wait_s=120), on_retry=events.append) as client:
                big = [asyncio.create_task(filler.sample(16, seed=0))]
                while engine.load() != (0, 1):
                    await asyncio.sleep(0.005)
                big.append(asyncio.create_task(filler.sample(16, count=3, seed=1)))
                while engine.load()[0] < 3:
                    await asyncio.sleep(0.005)
                t0 = time.monotonic()
                result = await client.sample(9, seed=7)  # 3 waiting + 1 > 3: 429 until the queue moves
                elapsed = time.monotonic() - t0
                await asyncio.gather(*big)
                return result, elapsed

        events = []
        result, elapsed = asyncio.run(asyncio.wait_for(run(), 120))
    assert result.samples[0].seed == 7
    assert events and all(e.reason == "429" for e in events)
    assert all(e.retry_after_s is not None and e.retry_after_s >= 1 and e.delay_s == e.retry_after_s
               for e in events)  # waited exactly what the server asked
    assert elapsed >= sum(e.delay_s for e in events)


def test_cli_client_sample_end_to_end(server, tiny_weights, tmp_path):
    out = tmp_path / "pdbs"
    args = ["client", "sample", "--url", server.url, "-l", "9", "-l", "11", "--count", "2", "--seed", "3",
            "--out", str(out)]
    result = runner.invoke(app, args, env={"MHCFLASH_API_KEY": KEY})
    assert result.exit_code == 0, result.output
    names = ["sample_len9_seed3.pdb", "sample_len9_seed4.pdb", "sample_len11_seed5.pdb", "sample_len11_seed6.pdb"]
    assert result.stdout.split() == [str(out / n) for n in names]
    assert "4 samples from tiny (mhc_flash" in result.stderr
    # the same files, names and backbones as `mhcflash sample` on the same weights (PDB rounding, batching)
    local = tmp_path / "local"
    done = runner.invoke(app, ["sample", str(tiny_weights), "-l", "9", "-l", "11", "-n", "2", "--seed", "3",
                               "--out", str(local), "--no-progress"])
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in local.iterdir()) == sorted(names)
    for name in names:
        np.testing.assert_allclose(read_ca(out / name), read_ca(local / name), atol=2e-3)

    again = runner.invoke(app, args, env={"MHCFLASH_API_KEY": KEY})
    assert again.exit_code == 2 and again.output.strip() == \
        f"error: {out / names[0]} exists; not overwritten (pass --overwrite, or another --out or --prefix)"


@pytest.mark.parametrize(("args", "env", "code", "message"), [
    (["-l", "500"], {"MHCFLASH_API_KEY": KEY}, 2,
     "error: 422 from POST /sample: length must be between 5 and 64 residues (got 500)"),
    (["-l", "9"], {}, 2, "error: 401 from POST /sample: unauthorized"),
])
def test_cli_client_errors_are_one_line(server, tmp_path, args, env, code, message):
    result = runner.invoke(app, ["client", "sample", "--url", server.url, *args, "--out", str(tmp_path)], env=env)
    assert result.exit_code == code and result.output.strip() == message
    assert list(tmp_path.iterdir()) == []


def test_cli_client_info_and_unreachable_service(server):
    result = runner.invoke(app, ["client", "info", "--url", server.url, "--api-key", KEY])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["limits"]["max_length"] == 64
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = runner.invoke(app, ["client", "info", "--url", f"http://127.0.0.1:{port}", "--attempts", "2"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert result.output.startswith(f"error: cannot reach GET http://127.0.0.1:{port}/info (ConnectError")
    assert result.output.strip().endswith("is the service running there? (after 2 attempts)")
