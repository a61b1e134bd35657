"""Request and response models of the sampling service (pydantic v2).

Strict on the way in: `{"length": "64"}` or `{"length": 64.0}` is a 422, not a silent coercion, and
unknown fields are rejected, so a typo (`"lenght"`) never samples a default length. The pydantic
model checks types only: every numeric range (length, count, seed, noise scale, steps, residues per
request) comes from `model.limits.SampleLimits` of the loaded model and the operator's settings,
the one definition the command line uses too. `validate_limits` turns its violations into 422
items naming the field and the range in force on this server, and `publish_limits` writes the same
ranges into the OpenAPI schema.

`steps` picks the sampler per request: T (the model's `numTimesteps`) is Genie's ancestral sampler;
fewer visit evenly spaced timesteps and step between them with the DDPM posterior (Nichol & Dhariwal
2021, sec. 4; `model.diffusion.respaced_timesteps`). Left out, the server's `MHCFLASH_DEFAULT_STEPS`
(T unless set) applies; the response says which count was used.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from model.limits import SampleLimits

Limits = SampleLimits  # the limits in force on this server (settings + the loaded model)


class SampleRequest(BaseModel):
    """`POST /sample` body. Ranges: see `GET /openapi.json` (published at start-up) or `GET /info`."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"length": 64},
                {"length": 120, "count": 4, "seed": 7, "noise_scale": 0.6},
                {"length": 64, "seed": 1, "steps": 100},
            ]
        },
    )

    length: int = Field(..., description="Number of residues of each sampled backbone.")
    count: int = Field(1, description="Number of independent samples.")
    seed: int | None = Field(
        None,
        description="Seed of the first sample; sample i uses seed + i. Same seed and length give the "
        "same backbone whatever else the server is batching. Omitted: random seeds (returned).",
    )
    noise_scale: float = Field(
        0.6, description="Scale of the noise added at each ancestral step (Genie's default 0.6; 0 = deterministic)."
    )
    steps: int | None = Field(
        None,
        description="Sampling steps: the model's T is Genie's ancestral sampler; fewer visit evenly spaced "
        "timesteps (respaced DDPM). Omitted: the server's default (MHCFLASH_DEFAULT_STEPS; GET /info, "
        "limits.default_steps). Same seed, length and steps give the same backbone.",
    )


def validate_limits(req: SampleRequest, limits: Limits) -> list[dict]:
    """Errors (FastAPI 422 `detail` items) for `req` under the server's limits; [] if it fits."""
    return [{"type": "value_error", "loc": ["body", v.field], "msg": v.message}
            for v in limits.check(length=req.length, count=req.count, seed=req.seed, noise_scale=req.noise_scale,
                                  steps=req.steps)]


def publish_limits(openapi: dict, limits: Limits) -> dict:
    """Write this server's request ranges (`limits.ranges()`) into its OpenAPI document (in place); return it.

    Every schema-valid body is then accepted (except the `length * count` product, which JSON Schema
    cannot express: see the count's description) and every out-of-range body is schema-invalid, so
    schema-driven clients and fuzzers see the true contract. The examples kept are those that pass
    `limits.check`.
    """
    body = openapi["components"]["schemas"]["SampleRequest"]
    props = body["properties"]
    for name, allowed in limits.ranges().items():
        bounds = {"minimum": allowed.lo} | ({} if allowed.hi is None else {"maximum": allowed.hi})
        options = props[name].get("anyOf")  # seed, steps: integer or null
        for option in options or [props[name]]:
            if option.get("type") in ("integer", "number"):
                option.update(bounds)
        props[name]["description"] = f"{props[name].get('description', '')} Range on this server: " \
                                     f"{allowed.text()}.".strip()
    if limits.max_total_residues is not None:
        props["count"]["description"] += f" length * count must be at most {limits.max_total_residues}."
    fits = [ex for ex in body.get("examples", []) if not limits.check(**ex)]
    body["examples"] = fits or [{"length": limits.max_length}]
    return openapi


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
    steps: int = Field(description="Sampling steps each sample took (the request's, or the server's default).")

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
                    "steps": 1000,
                }
            ]
        },
    )


class ErrorResponse(BaseModel):
    detail: str | list = Field(description="What went wrong (a list of field errors for 422).")
    error_id: str | None = Field(None, description="Quote it when reporting a server error.")
