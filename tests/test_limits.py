"""`model.limits`: the one definition of what a model samples (used by the CLI and the service)."""

from __future__ import annotations

import math

import pytest

from model.config import Config
from model.limits import SEED_MAX, LimitsError, Range, SampleLimits, as_flags, check_sampling

CONFIG = Config().replace(minimumNumResidues=20, maximumNumResidues=256)


def test_lengths_come_from_the_model_and_may_only_be_narrowed():
    T = CONFIG.numTimesteps
    assert SampleLimits.for_model(CONFIG) == SampleLimits(20, 256, max_steps=T, default_steps=T)
    assert SampleLimits.for_model(CONFIG, min_length=30, max_length=100, max_count=4) == \
        SampleLimits(30, 100, 4, max_steps=T, default_steps=T)
    with pytest.raises(LimitsError, match="between 3 and 256 residues: this model samples 20-256") as err:
        SampleLimits.for_model(CONFIG, max_length=300)
    assert err.value.field == "max_length" and err.value.value == 300
    with pytest.raises(LimitsError, match="between 3 and 100 residues") as err:
        SampleLimits.for_model(CONFIG, min_length=101, max_length=100)
    assert err.value.field == "min_length"
    with pytest.raises(LimitsError, match="no request fits"):
        SampleLimits.for_model(CONFIG, max_total_residues=10)


def test_messages_name_the_field_and_the_real_range():
    limits = SampleLimits(20, 1024, max_count=16, max_total_residues=8192)
    [v] = limits.check(length=0)
    assert (v.field, v.value, v.message) == ("length", 0, "length must be between 20 and 1024 residues (got 0)")
    assert [v.message for v in limits.check(length=10, count=0)] == [
        "length must be between 20 and 1024 residues (got 10)", "count must be between 1 and 16 (got 0)"]
    [v] = limits.check(length=64, noise_scale=math.nan)  # NaN is in no range
    assert v.message == "noise_scale must be between 0 and 2 (got nan)"
    [v] = limits.check(length=64, seed=SEED_MAX)
    assert f"between 0 and {SEED_MAX - 15} (got {SEED_MAX})" in v.message  # seed + 15 must fit in int64
    [v] = limits.check(length=1000, count=9)
    assert v.message == "length * count must be at most 8192 residues per request (got 1000 * 9 = 9000)"
    assert limits.check(length=20, count=16, seed=SEED_MAX - 15, noise_scale=2.0) == []


def test_ranges_are_what_check_enforces():
    limits = SampleLimits(7, 30, max_count=3, max_steps=20)
    assert set(limits.ranges()) == {"length", "count", "seed", "noise_scale", "steps"}
    for name, allowed in limits.ranges().items():
        step = 1 if isinstance(allowed.lo, int) else 0.25
        base = {"length": 7, name: allowed.lo}
        assert limits.check(**base) == [], name
        assert [v.field for v in limits.check(**{**base, name: allowed.lo - step})] == [name]
        assert [v.field for v in limits.check(**{**base, name: allowed.hi + step})] == [name]
    assert Range(1).text() == "at least 1" and 10**9 in Range(1)


def test_command_line_checks_name_the_flags():
    assert check_sampling(CONFIG, [20, 256], count=50, seed=0, noise_scale=0.6) == []  # no per-request caps
    violations = check_sampling(CONFIG, [5, 64, 5], count=1, seed=-1, noise_scale=3.0)
    assert as_flags(violations) == (
        "--length 5: length must be between 20 and 256 residues (got 5); "
        f"--seed -1: seed must be between 0 and {SEED_MAX - 2} (got -1); sample i uses seed + i, at most {SEED_MAX}; "
        "--noise-scale 3.0: noise_scale must be between 0 and 2 (got 3)")
    assert as_flags(check_sampling(CONFIG, [64], count=0, seed=0, noise_scale=0.6)) == \
        "--count 0: count must be at least 1 (got 0)"


def test_steps_come_from_the_schedule_with_a_default():
    T = CONFIG.numTimesteps
    limits = SampleLimits.for_model(CONFIG, default_steps=50)
    assert (limits.max_steps, limits.default_steps) == (T, 50)
    assert limits.check(length=64, steps=1) == [] and limits.check(length=64, steps=T) == []
    [v] = limits.check(length=64, steps=0)
    assert (v.field, v.message) == ("steps", f"steps must be between 1 and {T} (got 0)")
    [v] = limits.check(length=64, steps=T + 1)
    assert v.field == "steps" and f"between 1 and {T}" in v.message
    for bad in (0, T + 1):
        with pytest.raises(LimitsError, match=f"between 1 and {T}: this model's schedule has {T}") as err:
            SampleLimits.for_model(CONFIG, default_steps=bad)
        assert err.value.field == "default_steps"
    assert "steps" not in SampleLimits(20, 256).ranges()  # limits not made from a model: no steps field
    assert as_flags(check_sampling(CONFIG, [64], count=1, seed=0, noise_scale=0.6, steps=0)) == \
        f"--steps 0: steps must be between 1 and {T} (got 0)"
    assert check_sampling(CONFIG, [64], count=1, seed=0, noise_scale=0.6, steps=10) == []
