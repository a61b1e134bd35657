"""Service settings, read from `MHCFLASH_*` environment variables (pydantic-settings).

| variable | default | meaning |
|---|---|---|
| `MHCFLASH_WEIGHTS` | shipped `weights/` | weights directory (`config.txt` + `model.safetensors`, or a `weights_only` `.ckpt`/`.pt`); a folder holding several is resolved through its `DEFAULT` file or its only model folder |
| `MHCFLASH_DEVICE` | `auto` | `auto` (first GPU if any, else CPU), `cpu`, `cuda`, `cuda:1`, ... |
| `MHCFLASH_PRECISION` | `auto` | `auto` (bf16 autocast on CUDA, as the weights were trained; float32 on CPU), `float32`, or `bf16` (CUDA only; float32 on CPU) |
| `MHCFLASH_MIN_LENGTH` | `max(3, config minimumNumResidues)`, capped at max | shortest length accepted (at least 3) |
| `MHCFLASH_MAX_LENGTH` | config `maximumNumResidues` | longest length accepted (may only lower the model's) |
| `MHCFLASH_MAX_COUNT` | 16 | samples per request |
| `MHCFLASH_MAX_TOTAL_RESIDUES` | 8192 | length * count per request |
| `MHCFLASH_DEFAULT_STEPS` | the model's T (`numTimesteps`) | sampling steps of a request that gives no `steps` (1 .. T; fewer than T: the respaced sampler); T until a smaller default is measured |
| `MHCFLASH_QUEUE_MAX_SAMPLES` | 256 | samples waiting to enter a batch; beyond it: 429 + Retry-After |
| `MHCFLASH_REQUEST_TIMEOUT_S` | 600 | a request not done by then gets 504 and its samples are dropped |
| `MHCFLASH_RESIDUE_BUDGET` | auto | padded residues (batch size * padded length) per step; auto: 4096 on CPU, from free VRAM on GPU |
| `MHCFLASH_MAX_BATCH_REQUESTS` | 0 (no limit) | distinct requests per batch; 1 = one request at a time (benchmark baseline) |
| `MHCFLASH_PAD_MULTIPLE` | 8 | batch length padded up to a multiple of this (fewer distinct shapes, steadier allocator) |
| `MHCFLASH_LENGTH_GROUP_RATIO` | 0.75 | active samples are stepped in length groups: a sample shares a batch only with samples whose padded length is >= this x the group's longest (less padding of short chains; `service.batching.length_groups`); 0 = one batch padded to the longest |
| `MHCFLASH_ATTENTION_BACKEND` | `auto` | `auto`: the first usable backend in the order fa3, fa2, sdpa_cudnn, fa4, sdpa_flash, sdpa_efficient, math; a name forces that backend (an error at start-up if it cannot run the model's head widths). Read by the model when it chooses its kernel; `/info` reports the one in use |
| `MHCFLASH_CUDA_GRAPHS` | `auto` | `auto` / `on`: replay each sampling step from a CUDA graph per (batch bucket, padded length) on CUDA devices (`model.sampling_step`); `off`: eager. CPU is always eager |
| `MHCFLASH_COMPILE` | `auto` | `auto`: `torch.compile` the pair-transform layers on CUDA devices (fused Triton kernels; the warm-up compiles them before `/ready`, ~30 s on an H100; a failed compile falls back to eager; needs `MHCFLASH_WARMUP`); `on`: on any device (CPU: C++, slow to compile); `off`: eager |
| `MHCFLASH_CUDA_GRAPH_CACHE` | 32 | captured step graphs kept (least recently used evicted) |
| `MHCFLASH_API_KEY` | unset (auth off) | when set, `POST /sample` and `GET /info` need header `X-API-Key` |
| `MHCFLASH_MAX_BODY_BYTES` | 4096 | larger request bodies get 413 |
| `MHCFLASH_HOST` / `MHCFLASH_PORT` | `127.0.0.1` / 8000 | where `python -m service` listens |
| `MHCFLASH_WARMUP` | true | run one short batch before `/ready` turns true |
| `MHCFLASH_MAX_WORKER_RESTARTS` | 3 | engine worker restarts before the engine stays down (`/ready` 503) |
| `MHCFLASH_EXIT_ON_ENGINE_DEATH` | true | when the engine stays down, exit the process with code 70 so Docker / Kubernetes restart it |
| `MHCFLASH_SHUTDOWN_TIMEOUT_S` | 120 | on shutdown, time to finish accepted work before failing the rest with 503 |
| `MHCFLASH_LOG_LEVEL` | `info` | log level |
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.limits import DEFAULT_MAX_COUNT, DEFAULT_MAX_TOTAL_RESIDUES, MIN_LENGTH_FLOOR

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_WEIGHTS = REPO_ROOT / "weights"


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MHCFLASH_", extra="forbid", protected_namespaces=())

    weights: Path = Field(SHIPPED_WEIGHTS, description="Weights directory or weights root.")
    device: str = "auto"
    precision: Literal["auto", "float32", "bf16"] = "auto"
    # Lengths: checked against the loaded model at start-up (model.limits.SampleLimits.for_model).
    min_length: int | None = Field(None, ge=MIN_LENGTH_FLOOR)
    max_length: int | None = Field(None, ge=MIN_LENGTH_FLOOR)
    max_count: int = Field(DEFAULT_MAX_COUNT, ge=1)
    max_total_residues: int = Field(DEFAULT_MAX_TOTAL_RESIDUES, ge=1)
    # None: the model's T (checked against it at start-up); the one place the default step count is set
    default_steps: int | None = Field(None, ge=1)
    queue_max_samples: int = Field(256, ge=1)
    request_timeout_s: float = Field(600.0, gt=0)
    residue_budget: int | None = Field(None, ge=1)
    max_batch_requests: int = Field(0, ge=0)
    pad_multiple: int = Field(8, ge=1)
    length_group_ratio: float = Field(0.75, ge=0.0, le=1.0)
    cuda_graphs: Literal["auto", "on", "off"] = "auto"
    cuda_graph_cache: int = Field(32, ge=1)
    compile: Literal["auto", "on", "off"] = "auto"
    api_key: SecretStr | None = None
    max_body_bytes: int = Field(4096, ge=64)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    warmup: bool = True
    max_worker_restarts: int = Field(3, ge=0)
    exit_on_engine_death: bool = True
    shutdown_timeout_s: float = Field(120.0, ge=0)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value != "auto" and not (value == "cpu" or value == "cuda" or value.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N (got {value!r})")
        return value

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty MHCFLASH_API_KEY= means "off", not "the empty key".
        return value if value is not None and value.get_secret_value() else None
