"""The CUDA-graph cache the training step and the sampling step share (`model.cuda_graphs.GraphCache`).

No GPU here: the recorder is a plain function returning a stand-in entry, and `torch.cuda.graph_pool_handle`
returns 0, 1, 2, ... so the tests see which pool each capture was given. The owners' own tests
(tests/test_graphs.py, tests/test_train_graphs.py) run the cache through their steps.
"""

from __future__ import annotations

import pytest
import torch

from model import cuda_graphs
from model.cuda_graphs import GraphCache, GraphCaptureError

CPU = torch.device("cpu")


@pytest.fixture
def pools(monkeypatch):
    handles = iter(range(100))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: next(handles))


def make_cache(**kw) -> tuple[GraphCache, list[str]]:
    warnings: list[str] = []
    cache = GraphCache(owner="owner", eager_text="going on eagerly", off_hint="Turn it off", warn=warnings.append,
                       **{"max_graphs": 2, **kw})
    return cache, warnings


def capture(cache: GraphCache, key, fail: Exception | None = None):
    """What an owner does: record an entry into the cache's pool (here: the pool handle it got)."""
    def record():
        pool = cache.pool()
        if fail is not None:
            raise fail
        return ("entry", key, pool)

    return cache.capture(key, record, device=CPU, describe=f"shape {key}")


def test_capture_after_lru_and_one_shared_pool(pools):
    cache, warnings = make_cache(capture_after=2)
    assert not cache.ready("a") and cache.ready("a") and cache.ready("a")  # the 2nd request and later
    entries = [capture(cache, k) for k in ("a", "b")]
    assert [e[2] for e in entries] == [0, 0]  # both in one pool
    assert cache.get("a") == entries[0]  # "a" is now the most recently used
    capture(cache, "c")  # full: drops the least recently used, "b"
    assert cache.keys() == ["a", "c"] and cache.get("b") is None
    st = cache.stats
    assert (st.captures, st.evictions, st.cached, len(cache)) == (3, 1, 2, 2) and cache.enabled and not warnings


def test_a_pool_whose_graphs_are_all_gone_is_never_captured_into_again(pools):
    cache, _ = make_cache(max_graphs=1)
    pools_used = [capture(cache, k)[2] for k in ("a", "b", "a")]  # each capture drops the only other graph
    assert pools_used == [0, 1, 2]
    cache.clear()
    assert capture(cache, "b")[2] == 3 and cache.stats.cached == 1


def test_a_failed_capture_warns_once_and_disables_the_cache(pools):
    cache, warnings = make_cache()
    capture(cache, "a")
    assert capture(cache, "b", fail=GraphCaptureError("RuntimeError: operation not permitted")) is None
    assert not cache.enabled and cache.keys() == [] and cache.stats.cached == 0
    assert cache.stats.disabled_reason == "CUDA graph capture failed (RuntimeError: operation not permitted)"
    assert warnings == [("owner: capturing shape b failed (RuntimeError: operation not permitted); going on "
                         "eagerly. Turn it off to skip the attempt.")]


def test_a_failure_that_broke_the_generator_raises_with_advice(pools, monkeypatch):
    monkeypatch.setattr(cuda_graphs, "rng_broken", lambda device: True)
    cache, warnings = make_cache()
    with pytest.raises(RuntimeError, match=r"capturing shape a failed .*generator unusable.*Turn it off and rerun"):
        capture(cache, "a", fail=GraphCaptureError("RuntimeError: INTERNAL ASSERT FAILED"))
    assert not cache.enabled and not warnings


def test_out_of_memory_drops_every_graph_and_is_raised(pools):
    cache, warnings = make_cache()
    capture(cache, "a")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        capture(cache, "b", fail=torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert cache.keys() == [] and cache.enabled and not warnings  # freed, but graphs stay on
    assert capture(cache, "b")[2] == 1  # a fresh pool


def test_an_error_of_the_computation_itself_propagates_and_keeps_graphs_on(pools):
    cache, warnings = make_cache()
    with pytest.raises(ValueError, match="bad mask"):
        capture(cache, "a", fail=ValueError("bad mask"))
    assert cache.enabled and not warnings and cache.stats.captures == 0


def test_settings_are_checked():
    with pytest.raises(ValueError, match="max_graphs and capture_after must be >= 1"):
        make_cache(max_graphs=0)
    assert not cuda_graphs.rng_broken(CPU)
    cuda_graphs.restore_rng(CPU)  # nothing to do off CUDA
