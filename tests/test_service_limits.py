"""One truth for request limits, over real HTTP: the 422 messages, the published OpenAPI schema,
`GET /info` and the settings state the same ranges (tiny weights: the model samples 5-64 residues).

Every range the schema publishes is probed just outside both ends (422 naming the field and exactly
that range, never a static pydantic bound) and at both ends (accepted).
"""

from __future__ import annotations

import httpx
import pytest

from model.limits import SEED_MAX
from service.settings import ServiceSettings
from service.testing import make_tiny_weights, serve_in_thread, tiny_settings

FIELDS = ("length", "count", "seed", "noise_scale")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_tiny_weights(tmp_path_factory.mktemp("limits") / "tiny")


def published_ranges(url: str) -> dict[str, tuple]:
    """Field -> (minimum, maximum) from the server's OpenAPI schema."""
    props = httpx.get(url + "/openapi.json", timeout=10).json()["components"]["schemas"]["SampleRequest"]["properties"]
    out = {}
    for name in FIELDS:
        [option] = [o for o in props[name].get("anyOf", [props[name]]) if o.get("type") in ("integer", "number")]
        out[name] = (option["minimum"], option["maximum"])
    return out


@pytest.mark.parametrize("limits,expect", [
    ({}, {"length": (5, 64), "count": (1, 8)}),
    ({"min_length": 7, "max_length": 30, "max_count": 3}, {"length": (7, 30), "count": (1, 3)}),
], ids=["model", "narrowed-by-settings"])
def test_messages_schema_info_and_settings_agree(weights, limits, expect):
    with serve_in_thread(tiny_settings(weights, **limits)) as srv:
        ranges = published_ranges(srv.url)
        info = httpx.get(srv.url + "/info", timeout=10).json()["limits"]
        assert ranges["length"] == expect["length"] == (info["min_length"], info["max_length"])
        assert ranges["count"] == expect["count"] == (1, info["max_count"])
        assert ranges["seed"] == (0, SEED_MAX - (info["max_count"] - 1))
        assert ranges["noise_scale"] == (0, 2)
        shortest = ranges["length"][0]
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            for name, (lo, hi) in ranges.items():
                step = 0.25 if name == "noise_scale" else 1
                for bad in (lo - step, hi + step):
                    r = client.post("/sample", json={"length": shortest, name: bad})
                    assert r.status_code == 422, (name, bad, r.text)
                    [item] = r.json()["detail"]
                    assert item["loc"] == ["body", name]
                    assert item["msg"].startswith(f"{name} must be between {lo:g} and {hi:g}"
                                                  if name != "seed" else f"seed must be between {lo} and {hi} "), item
            for body in ({"length": ranges["length"][1]},
                         {"length": shortest, "count": ranges["count"][1], "seed": ranges["seed"][1],
                          "noise_scale": 2.0},
                         {"length": shortest, "seed": 0, "noise_scale": 0.0}):
                r = client.post("/sample", json=body)
                assert r.status_code == 200, (body, r.text)


def test_settings_share_the_bounds():
    """The settings refuse what the limits refuse: lengths below the floor of 3, counts below 1."""
    from pydantic import ValidationError

    for bad in ({"min_length": 2}, {"max_length": 0}, {"max_count": 0}):
        with pytest.raises(ValidationError):
            ServiceSettings(**bad)
