"""What a model samples: the accepted lengths, counts, seeds, noise scales and step counts, defined once.

One definition for every place that takes a sampling request: `mhcflash sample` and `mhcflash
evaluate` (flags), and the HTTP service (its 422 messages, the ranges it publishes in its OpenAPI
schema, and the start-up check of its `MHCFLASH_*` limits). Each accepted range is a `Range`;
`SampleLimits.ranges()` lists them, `SampleLimits.check()` tests a request against exactly those
ranges, and the service writes exactly those numbers into its schema, so a message, the schema and
the settings cannot disagree.

Lengths come from the model's config (`minimumNumResidues` .. `maximumNumResidues`: what it was
trained on); an operator may narrow them (the service's `MHCFLASH_MIN_LENGTH` / `MHCFLASH_MAX_LENGTH`)
but never raise the maximum. `max_count` / `max_total_residues` are per-request caps of the service;
the command line has none (None). Sampling steps come from the model's schedule: 1 .. T
(`numTimesteps`; fewer than T is the respaced sampler of `model.diffusion.respaced_timesteps`), and
`default_steps` is what a request without `steps` gets (T unless set: the service's
`MHCFLASH_DEFAULT_STEPS`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_MAX_COUNT", "DEFAULT_MAX_TOTAL_RESIDUES", "MIN_LENGTH_FLOOR", "NOISE_SCALE_MAX",
           "NOISE_SCALE_MIN", "SEED_MAX", "LimitsError", "Range", "SampleLimits", "Violation", "as_flags",
           "check_sampling"]

SEED_MAX = 2**63 - 1  # seeds are int64 (torch.Generator.manual_seed); sample i uses seed + i
NOISE_SCALE_MIN = 0.0  # 0 = deterministic ancestral steps
NOISE_SCALE_MAX = 2.0  # Genie samples at 0.6; far beyond 1 the chains fall apart
MIN_LENGTH_FLOOR = 3  # Frenet-Serret frames need three consecutive CA atoms
DEFAULT_MAX_COUNT = 16  # the service's samples per request
DEFAULT_MAX_TOTAL_RESIDUES = 8192  # the service's length * count per request


class LimitsError(ValueError):
    """Limits that cannot be used with this model. ``field`` names the limit (e.g. ``max_length``)."""

    def __init__(self, field: str, value, message: str) -> None:
        super().__init__(message)
        self.field, self.value = field, value


@dataclass(frozen=True)
class Range:
    """An inclusive range ``lo <= v <= hi`` (``hi`` None: no upper bound); ``unit`` for messages."""

    lo: int | float
    hi: int | float | None = None
    unit: str = ""

    def __contains__(self, value) -> bool:
        # NOTE: written as comparisons that are False for NaN, so NaN is never inside a range.
        return value >= self.lo and (self.hi is None or value <= self.hi)

    def text(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        if self.hi is None:
            return f"at least {_number(self.lo)}{unit}"
        return f"between {_number(self.lo)} and {_number(self.hi)}{unit}"


def _number(value) -> str:
    """Integers in full (a seed bound is 19 digits), other numbers as %g (2.0 -> '2')."""
    return str(value) if isinstance(value, int) else f"{value:g}"


@dataclass(frozen=True)
class Violation:
    """One field of a request outside its range; ``message`` says the field, the range and the value."""

    field: str
    value: object
    message: str


@dataclass(frozen=True)
class SampleLimits:
    """The requests a model accepts (see the module docstring)."""

    min_length: int
    max_length: int
    max_count: int | None = None
    max_total_residues: int | None = None
    max_steps: int | None = None  # T; None: no ``steps`` field (limits not made from a model)
    default_steps: int | None = None  # a request without ``steps``; None: ``max_steps``

    @classmethod
    def for_model(cls, config, *, min_length: int | None = None, max_length: int | None = None,
                  max_count: int | None = None, max_total_residues: int | None = None,
                  default_steps: int | None = None) -> SampleLimits:
        """Limits of a model with ``config`` (a ``model.config.Config``), narrowed by the optional arguments.

        Defaults: lengths ``max(MIN_LENGTH_FLOOR, minimumNumResidues)`` (capped at the maximum) to
        ``maximumNumResidues``; steps 1 .. ``numTimesteps`` (T), ``default_steps`` T. Raises
        :class:`LimitsError` naming the argument and the model's range.
        """
        max_steps = int(config.numTimesteps)
        if default_steps is not None and default_steps not in Range(1, max_steps):
            raise LimitsError("default_steps", default_steps, f"must be {Range(1, max_steps).text()}: this model's "
                              f"schedule has {max_steps} timesteps (numTimesteps of its config)")
        model_max = int(config.maximumNumResidues)
        model_range = f"this model samples {int(config.minimumNumResidues)}-{model_max} residues " \
                      f"(minimumNumResidues / maximumNumResidues of its config)"
        allowed = Range(MIN_LENGTH_FLOOR, model_max, "residues")
        if max_length is not None and max_length not in allowed:
            raise LimitsError("max_length", max_length, f"must be {allowed.text()}: {model_range}; the maximum "
                              f"may only be lowered")
        max_length = max_length or model_max
        allowed = Range(MIN_LENGTH_FLOOR, max_length, "residues")
        if min_length is not None and min_length not in allowed:
            raise LimitsError("min_length", min_length, f"must be {allowed.text()} (up to the maximum length); "
                              f"{model_range}")
        min_length = min_length or min(max(MIN_LENGTH_FLOOR, int(config.minimumNumResidues)), max_length)
        for name, value in (("max_count", max_count), ("max_total_residues", max_total_residues)):
            if value is not None and value < 1:
                raise LimitsError(name, value, f"must be {Range(1).text()}")
        if max_total_residues is not None and max_total_residues < min_length:
            raise LimitsError("max_total_residues", max_total_residues,
                              f"must be at least the minimum length {min_length}, or no request fits")
        return cls(min_length, max_length, max_count, max_total_residues, max_steps, default_steps or max_steps)

    def seed_max(self, count: int = 1) -> int:
        """Largest first seed: seed + i stays <= SEED_MAX for every sample i of a request.

        NOTE: with a ``max_count`` the bound does not depend on the request's count, so that a schema
        can state it as one number.
        """
        return SEED_MAX - ((self.max_count or max(count, 1)) - 1)

    def ranges(self, count: int = 1) -> dict[str, Range]:
        """Field -> accepted range: ``length``, ``count``, ``seed`` (for a request of ``count``), ``noise_scale``,
        and ``steps`` (with a ``max_steps``)."""
        ranges = {
            "length": Range(self.min_length, self.max_length, "residues"),
            "count": Range(1, self.max_count),
            "seed": Range(0, self.seed_max(count)),
            "noise_scale": Range(NOISE_SCALE_MIN, NOISE_SCALE_MAX),
        }
        if self.max_steps is not None:
            ranges["steps"] = Range(1, self.max_steps)
        return ranges

    def check(self, *, length: int, count: int = 1, seed: int | None = None,
              noise_scale: float | None = None, steps: int | None = None) -> list[Violation]:
        """The fields of a request outside :meth:`ranges` (``seed`` / ``noise_scale`` / ``steps`` None: not
        given); [] if it fits.

        A request whose fields all fit must also keep ``length * count`` within ``max_total_residues``.
        """
        values = {"length": length, "count": count, "seed": seed, "noise_scale": noise_scale, "steps": steps}
        out = []
        for name, allowed in self.ranges(count).items():
            value = values[name]
            if value is None or value in allowed:
                continue
            why = f"{name} must be {allowed.text()} (got {_number(value)})"
            if name == "seed":
                why += f"; sample i uses seed + i, at most {SEED_MAX}"
            out.append(Violation(name, value, why))
        total = length * count
        if not out and self.max_total_residues is not None and total > self.max_total_residues:
            out.append(Violation("count", count, f"length * count must be at most {self.max_total_residues} "
                                                 f"residues per request (got {length} * {count} = {total})"))
        return out


def check_sampling(config, lengths, count: int, seed: int, noise_scale: float,
                   steps: int | None = None) -> list[Violation]:
    """A command-line sampling run under the model's limits: ``count`` samples of each of ``lengths``,
    seeds ``seed``, ``seed + 1``, ..., in ``steps`` steps (None: T) (the checks of a service request; no
    per-request caps)."""
    limits = SampleLimits.for_model(config)
    total = count * len(lengths) if count >= 1 else count  # count < 1: reported as given
    found: dict[tuple, Violation] = {}
    for length in lengths:
        for v in limits.check(length=length, count=total, seed=seed, noise_scale=noise_scale, steps=steps):
            found.setdefault((v.field, v.value), v)
    return list(found.values())


def as_flags(violations: list[Violation]) -> str:
    """One line naming each offending command-line flag: ``--length 5: length must be between ...``."""
    return "; ".join(f"--{v.field.replace('_', '-')} {v.value}: {v.message}" for v in violations)
