"""Request and response models of the sampling service (pydantic v2).

Strict on the way in: `{"length": "64"}` or `{"length": 64.0}` is a 422, not a silent coercion, and
unknown fields are rejected, so a typo (`"lenght"`) never samples a default length. The numeric
ranges that depend on the loaded model and on the operator's limits (length, count, residues per
request) are checked in `validate_limits` against `Limits`, so the 422 message names the field and
the range that actually applies on this server.

NOTE: there is no `num_steps` knob: Genie's ancestral sampler needs all T steps of the schedule it
was trained with (SPEC, "Genie core"); skipping steps would need a DDIM-style sampler we do not ship.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

NOISE_SCALE_MIN = 0.0
NOISE_SCALE_MAX = 2.0
SEED_MAX = 2**63 - 1


@dataclass(frozen=True)
class Limits:
    """Per-request limits in force on this server (from settings and the loaded model)."""

    min_length: int
    max_length: int
    max_count: int
    max_total_residues: int


class SampleRequest(BaseModel):
    """`POST /sample` body."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"length": 64},
                {"length": 120, "count": 4, "seed": 7, "noise_scale": 0.6},
            ]
        },
    )

    length: int = Field(
        ..., ge=1, description="Number of residues of each sampled backbone (range: see GET /info limits)."
    )
    count: int = Field(1, ge=1, description="Number of independent samples (range: see GET /info limits).")
    seed: int | None = Field(
        None,
        ge=0,
        le=SEED_MAX,
        description="Seed of the first sample; sample i uses seed + i. Same seed and length give the "
        "same backbone whatever else the server is batching. Omitted: random seeds (returned).",
    )
    noise_scale: float = Field(
        0.6,
        ge=NOISE_SCALE_MIN,
        le=NOISE_SCALE_MAX,
        allow_inf_nan=False,
        description="Scale of the noise added at each ancestral step (Genie's default 0.6; 0 = deterministic).",
    )


def validate_limits(req: SampleRequest, limits: Limits) -> list[dict]:
    """Errors (FastAPI 422 `detail` items) for `req` under the server's limits; [] if it fits."""
    errors = []
    if not limits.min_length <= req.length <= limits.max_length:
        errors.append(
            _error(
                "length",
                f"length must be between {limits.min_length} and {limits.max_length} residues "
                f"(got {req.length})",
                req.length,
            )
        )
    if req.count > limits.max_count:
        errors.append(
            _error("count", f"count must be between 1 and {limits.max_count} (got {req.count})", req.count)
        )
    total = req.length * req.count
    if not errors and total > limits.max_total_residues:
        errors.append(
            _error(
                "count",
                f"length * count must be at most {limits.max_total_residues} residues per request "
                f"(got {req.length} * {req.count} = {total})",
                req.count,
            )
        )
    if req.seed is not None and req.seed > seed_max(limits):
        errors.append(_error("seed", f"seed must be between 0 and {seed_max(limits)} (sample i uses seed + i, "
                             f"up to {SEED_MAX})", req.seed))
    return errors


def seed_max(limits: Limits) -> int:
    """Largest first seed: every count up to `max_count` keeps seed + i <= SEED_MAX.

    NOTE: a fixed bound (not `SEED_MAX - count + 1`) so that the OpenAPI schema can state it exactly.
    """
    return SEED_MAX - (limits.max_count - 1)


def publish_limits(openapi: dict, limits: Limits) -> dict:
    """Write this server's request ranges into its OpenAPI document (in place) and return it.

    The static schema only knows `length >= 1`; the loaded model and the operator's settings decide
    the real ranges. Publishing them makes every schema-valid body acceptable (except the
    `length * count` product, which JSON Schema cannot express: see its description) and every
    out-of-range body schema-invalid, so schema-driven clients and fuzzers see the true contract.
    Integer bounds are written as ints (pydantic renders `le=2**63 - 1` as the float 2**63).
    """
    body = openapi["components"]["schemas"]["SampleRequest"]
    props = body["properties"]
    props["length"].update(minimum=limits.min_length, maximum=limits.max_length)
    props["length"]["description"] = f"Number of residues of each sampled backbone ({limits.min_length}-" \
                                     f"{limits.max_length} on this server)."
    props["count"].update(minimum=1, maximum=limits.max_count)
    props["count"]["description"] = f"Number of independent samples (1-{limits.max_count}); length * count " \
                                    f"must be at most {limits.max_total_residues}."
    for option in props["seed"].get("anyOf", []):
        if option.get("type") == "integer":
            option.update(minimum=0, maximum=seed_max(limits))
    fits = [ex for ex in body.get("examples", [])
            if limits.min_length <= ex["length"] <= limits.max_length and ex.get("count", 1) <= limits.max_count
            and ex["length"] * ex.get("count", 1) <= limits.max_total_residues]
    body["examples"] = fits or [{"length": limits.max_length}]
    return openapi


def _error(field: str, msg: str, value) -> dict:
    return {"type": "value_error", "loc": ["body", field], "msg": msg}


class Timings(BaseModel):
    queue_wait_s: float = Field(description="Submit to the first sample entering a batch.")
    sampling_s: float = Field(description="First sample entering a batch to the last sample finished.")
    total_s: float = Field(description="Request received to response ready.")


class Sample(BaseModel):
    id: str = Field(description="Unique id of this sample: <request id>-<index>.")
    index: int
    length: int
    seed: int
    pdb: str = Field(description="CA-only poly-Ala PDB text (one MODEL).")


class SampleResponse(BaseModel):
    request_id: str
    model: str = Field(description="Name of the loaded weights.")
    mode: str = Field(description="Denoiser mode: standard, mhc, flash or mhc_flash.")
    weights_sha256: str
    noise_scale: float
    samples: list[Sample]
    timings: Timings

    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "request_id": "3f2a9c1e5b7d",
                    "model": "default",
                    "mode": "mhc_flash",
                    "weights_sha256": "9b1c...e0",
                    "noise_scale": 0.6,
                    "samples": [
                        {
                            "id": "3f2a9c1e5b7d-0",
                            "index": 0,
                            "length": 64,
                            "seed": 7,
                            "pdb": "ATOM      1  CA  ALA A   1 ...\nEND\n",
                        }
                    ],
                    "timings": {"queue_wait_s": 0.01, "sampling_s": 3.2, "total_s": 3.25},
                }
            ]
        },
    )


class ErrorResponse(BaseModel):
    detail: str | list = Field(description="What went wrong (a list of field errors for 422).")
    error_id: str | None = Field(None, description="Quote it when reporting a server error.")
