"""The model as the sampling service sees it: one loaded denoiser, ready to sample. The service's one seam.

The HTTP service (``service/``) imports this module and ``model.limits`` (the request ranges, shared
with the command line) and no other model module (a test parses its imports). Everything below is
model-side: weights, device, precision, compilation, warm-up, the per-step function, PDB text.

    sampler = Sampler.load(weights, device="auto", precision="auto")
        weights: a weights directory, a weights root (its DEFAULT or only model) or a weights_only
        checkpoint; safetensors or weights_only loading, never unpickling (``model.weights_io``)
    sampler.warm_up((L_min, L_max), compile=True | False, off_hint=...)
        torch.compile the model's compiled parts if asked, then run a few sampling steps; a failed
        compile falls back to eager and warms up again; non-finite output raises WarmupError
    step = sampler.step_function(cuda_graphs="auto", max_graphs=32, off_hint=...)
        x_s [B, L, 3] = step(x_t [B, L, 3], t [B] long in [1, T], mask [B, L] float,
                             noise [B, L, 3] (ignored where s == 0), noise_scale [B],
                             t_prev [B] long: s, each sample's next timestep (None: t - 1))
        the denoiser forward + Genie's reverse step (a jump t -> s for a sampler of fewer steps,
        ``model.diffusion.respaced_timesteps``), replayed from a CUDA graph per (batch bucket, L)
        on CUDA (``model.sampling_step``); ``step.stats`` counts captures / replays / eager steps
        a self-conditioned model (``sampler.self_conditioning``, ``step.self_conditioning``) steps as
        (x_s, x0_hat) = step(..., t_prev, x0_self [B, L, 3]): the caller carries each sample's x0_hat
        to its next step (zeros at its first)
    sampler.sample(lengths, seeds, noise_scale, steps=None) -> [x_0 [L_i, 3] float32 CPU] (the reference
        sampler; steps None: all T)
    sampler.timesteps(steps) -> the timesteps a sample of ``steps`` steps visits, T .. 1
    sampler.to_pdb(ca [L, 3]) -> CA-only poly-Ala PDB text
    sampler.residue_budget(max_length) -> padded residues per step that fit (GPU: one probe step)
    sampler.describe() -> model, mode, weights sha256, T, parameters, device, GPU, precision, compiled
        parts, versions, attention backend and FlashAttention version (what ``GET /info`` reports)

Per-sample randomness is the caller's: sample i of seed s draws x_T and then each step's noise from
its own ``torch.Generator(device).manual_seed(s)``, in the order of ``model.diffusion.sample`` (x_T, then
one draw per step whose next timestep is not 0), so a sample does not depend on what it is batched with.

Symbols: B batch, L residues (padded), T timesteps.
"""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path

import torch

from model.diffusion import respaced_timesteps
from model.sampling_step import BATCH_BUCKETS, SamplingStep, eager_step
from model.weights_io import WeightsError

log = logging.getLogger("mhcflash.sampler")

__all__ = ["BATCH_BUCKETS", "DeviceError", "Sampler", "SamplingStep", "WarmupError", "WeightsError",
           "compile_enabled", "graphs_enabled", "pick_device", "respaced_timesteps", "save_random_weights"]


class DeviceError(ValueError):
    """A device that is not there (``cuda`` without a GPU, ``cuda:3`` on a one-GPU host)."""


class WarmupError(RuntimeError):
    """The warm-up ran but its output is not finite (broken weights): do not serve them."""


def pick_device(name: str | torch.device) -> torch.device:
    """``auto``: the first GPU if any, else the CPU; ``cpu``, ``cuda``, ``cuda:N``. DeviceError if not there."""
    if str(name) == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if found == 0:
            raise DeviceError(f"no CUDA device is available here (torch {torch.__version__}, CUDA build "
                              f"{torch.version.cuda or 'none'}); use cpu or auto")
        if (device.index or 0) >= found:
            raise DeviceError(f"only {found} CUDA device(s) here (cuda:0 .. cuda:{found - 1})")
    return device


def compile_enabled(setting: str, device: torch.device) -> bool:
    """``auto`` -> compile on CUDA devices; ``on`` -> on any device; ``off`` -> never."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def graphs_enabled(setting: str, device: torch.device) -> bool:
    """``auto`` / ``on`` -> CUDA graphs on CUDA devices; ``off`` -> never; the CPU never (a warning for ``on``)."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"cuda_graphs must be auto, on or off (got {setting!r})")
    if setting == "off":
        return False
    if device.type != "cuda":
        if setting == "on":
            log.warning("CUDA graphs are on but the device is %s: CUDA graphs need CUDA; running eagerly", device)
        return False
    return True


def save_random_weights(directory: str | Path, config_values: dict, *, seed: int = 0,
                        card: str | None = None) -> Path:
    """A randomly initialised denoiser of ``Config().replace(**config_values)`` saved as a weights
    directory (tests, smoke runs of the service); returns the directory."""
    from model import build_denoiser
    from model.config import Config
    from model.weights_io import save_weights

    torch.manual_seed(seed)
    config = Config().replace(**config_values)
    return save_weights(directory, build_denoiser(config), extra_card=card)


class Sampler:
    """A loaded denoiser on one device and precision, in eval mode, recording no mHC diagnostics.

    Attributes: ``name`` (the weights directory's name), ``mode`` (standard / mhc / flash / mhc_flash),
    ``sha256`` (of the weights file), ``num_timesteps`` (T), ``device``, ``precision`` ("bf16": autocast
    on CUDA, as the weights were trained; or "float32"), ``autocast_dtype`` (bf16 or None),
    ``config`` (the model's ``Config``), ``denoiser`` (the ``nn.Module``, for tests and benchmarks),
    ``self_conditioning`` (the step takes and returns each sample's x0 estimate, module docstring).
    """

    def __init__(self, loaded, device: torch.device, precision: str = "auto") -> None:
        from model.diffusion import Schedule
        from model.mhc import find_mhc_modules

        if precision not in ("auto", "float32", "bf16"):
            raise ValueError(f"precision must be auto, float32 or bf16 (got {precision!r})")
        self.denoiser = loaded.denoiser.eval()
        for module in find_mhc_modules(self.denoiser):  # sampling logs no mHC diagnostics: keep no H_res
            module.record, module.last_h_res = False, None
        self.config = loaded.config
        self.self_conditioning = bool(getattr(self.denoiser, "self_conditioning", False))
        self.name, self.sha256, self.mode = loaded.name, loaded.sha256, loaded.config.mode
        self.device = torch.device(device)
        self.schedule = Schedule.from_config(self.config)
        self.num_timesteps = self.schedule.num_timesteps
        use_bf16 = precision in ("auto", "bf16") and self.device.type == "cuda"
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.precision = "bf16" if use_bf16 else "float32"
        self._attention: dict | None = None

    @classmethod
    def load(cls, weights: str | Path, *, device: str | torch.device = "auto", precision: str = "auto") -> Sampler:
        """Weights (see the module docstring) onto ``device``. WeightsError names the file and the problem;
        DeviceError a device that is not there."""
        from model.weights_io import load_weights

        device = pick_device(device)
        return cls(load_weights(weights, device), device, precision)

    # ------------------------------------------------------------------------------- start-up
    @property
    def compiled(self) -> str:
        """What is compiled: "pair_stack,point_rotations", "point_rotations", ... or "none"."""
        from model.network.compile import compiled_parts

        return ",".join(compiled_parts(self.denoiser)) or "none"

    def warm_up(self, lengths: tuple[int, int], *, compile: bool = False,
                off_hint: str = "turn compiling off") -> bool:
        """Compile (if asked), then a few sampling steps on padded, masked batches of ``lengths`` (the
        shortest and longest accepted), so the first request pays no first-call cost. If compiling fails
        (no C compiler or Python headers for Triton, an inductor bug), log it (``off_hint``: how the
        caller turns compiling off), go back to the eager model and warm up again. Returns whether the
        compiled parts are kept; WarmupError on non-finite output."""
        import model.network.compile as denoiser_lib  # looked up at call time (tests replace compile_denoiser)

        t0 = time.perf_counter()
        if compile:
            denoiser_lib.compile_denoiser(self.denoiser)
        try:
            self._warm_up_steps(lengths, compile)
        except WarmupError:
            raise
        except Exception as exc:
            if not compile:
                raise
            root = exc  # dynamo wraps the compiler's error (BackendCompilerFailed.inner_exception): report that
            while (inner := root.__cause__ or getattr(root, "inner_exception", None)) is not None:
                root = inner
            log.warning("torch.compile of the model (pair stack / point rotations) failed, serving it eagerly "
                        "(%s to skip the attempt; see docs/TROUBLESHOOTING.md): %s: %s", off_hint,
                        type(root).__name__, (str(root).strip().splitlines() or [""])[0])
            denoiser_lib.uncompile_denoiser(self.denoiser)
            self._warm_up_steps(lengths, False)
            compile = False
        log.info("warm-up done in %.1f s (%s)", time.perf_counter() - t0, "compiled" if compile else "eager")
        return compile

    def _warm_up_steps(self, lengths: tuple[int, int], compiled: bool) -> None:
        """The eager step under this sampler's autocast. With the model compiled, a batch of 1 and a batch
        of 2 of other lengths: ``torch.compile`` builds its dynamic-shape graph and its B = 1 graph here."""
        short, long_ = lengths[0], min(lengths[1], lengths[0] + 5)
        for batch in ([[short, long_], [long_]] if compiled else [[short, long_]]):
            L = max(batch)
            x = torch.randn(len(batch), L, 3, device=self.device)  # [B, L, 3]
            mask = torch.zeros(len(batch), L, device=self.device)  # [B, L]
            for b, n in enumerate(batch):
                mask[b, :n] = 1.0
            t = torch.tensor([1, self.num_timesteps][:len(batch)], dtype=torch.long, device=self.device)  # [B]
            x = x * mask[..., None]
            x0_self = x if self.self_conditioning else None  # an estimate: its features run too
            out = eager_step(self.denoiser, self.schedule, x, t, mask, torch.randn_like(x),
                             torch.ones(len(batch), device=self.device), None, x0_self,
                             autocast_dtype=self.autocast_dtype)
            if not all(torch.isfinite(o).all() for o in (out if self.self_conditioning else (out,))):
                raise WarmupError("warm-up produced NaN / Inf: the weights are broken")

    def residue_budget(self, max_length: int, *, cpu_budget: int = 4096, memory_fraction: float = 0.8) -> int:
        """Padded residues per step: ``cpu_budget`` on CPU; on GPU sized from one probe step at ``max_length``.

        The probe's peak memory per residue at the longest length is the most expensive per-residue
        cost (dense modes grow with L^2), so the budget is conservative for shorter chains.
        """
        if self.device.type != "cuda":
            return max(cpu_budget, max_length)
        device = self.device
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        x = torch.randn(1, max_length, 3, device=device)  # [1, L, 3]
        mask = torch.ones(1, max_length, device=device)  # [1, L]
        t = torch.full((1,), 1, dtype=torch.long, device=device)  # [1]
        with torch.no_grad():
            self.denoiser(x, t, mask, *((x,) if self.self_conditioning else ()))
        torch.cuda.synchronize(device)
        per_residue = max(1, torch.cuda.max_memory_allocated(device) - base) / max_length
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(memory_fraction * free / per_residue)
        return max(max_length, min(budget, 1 << 20))

    # ------------------------------------------------------------------------------- sampling
    def step_function(self, *, cuda_graphs: str = "auto", max_graphs: int = 32,
                      off_hint: str = "Turn CUDA graphs off") -> SamplingStep:
        """The per-step function (module docstring); ``cuda_graphs`` auto / on / off (:func:`graphs_enabled`)."""
        return SamplingStep(self.denoiser, self.schedule, device=self.device, autocast_dtype=self.autocast_dtype,
                            graphed=graphs_enabled(cuda_graphs, self.device), max_graphs=max_graphs,
                            off_hint=off_hint)

    def sample(self, lengths: list[int], seeds: list[int], noise_scale: float = 0.6,
               steps: int | None = None) -> list[torch.Tensor]:
        """``model.diffusion.sample``: the reference sampler, one call; x_0 [L_i, 3] float32 CPU per sample."""
        from model.diffusion import sample

        return sample(self.denoiser, lengths, seeds, noise_scale, schedule=self.schedule, device=self.device,
                      steps=steps)

    def timesteps(self, steps: int | None = None) -> list[int]:
        """The timesteps a sample of ``steps`` steps visits (None: all T), T first, 1 last
        (``model.diffusion.respaced_timesteps``); ValueError outside 1 .. T."""
        return respaced_timesteps(self.num_timesteps, self.num_timesteps if steps is None else steps)

    @staticmethod
    def to_pdb(ca: torch.Tensor) -> str:
        """CA trace [L, 3] (Angstrom) -> CA-only poly-Ala PDB text."""
        from model.pdb_io import ca_to_pdb

        return ca_to_pdb(ca)

    # ------------------------------------------------------------------------------- report
    def attention(self) -> dict:
        """The attention backend the denoiser uses: its own report if it has one (after a forward), else
        ``model.ipa.backends.resolve_backend`` for the default head widths. Computed once."""
        if self._attention is None:
            self._attention = self._resolve_attention()
        return self._attention

    def _resolve_attention(self) -> dict:
        choice = getattr(self.denoiser, "attention_backend", None)
        source = "denoiser"
        if callable(choice):
            choice = choice()
        if choice is None:
            from model.ipa.backends import resolve_backend

            source = "resolve_backend (default head widths)"
            try:
                choice = resolve_backend(device=self.device, dtype=self.autocast_dtype or torch.float32,
                                         use_flash_attn3=self.config.useFlashAttn3)
            except Exception as exc:  # noqa: BLE001 - reported, not fatal: the denoiser already ran
                return {"backend": "unknown", "flash_attn_version": "none", "reason": str(exc), "source": source}
        return {"backend": str(choice.name), "flash_attn_version": str(choice.flash_attn_version or "none"),
                "reason": str(choice.reason), "source": source}

    def describe(self) -> dict:
        """What runs: model, mode, weights_sha256, num_timesteps, parameters, device, gpu, precision,
        compiled, versions (torch, cuda, python), attention."""
        dev = self.device
        return {
            "model": self.name,
            "mode": self.mode,
            "weights_sha256": self.sha256,
            "num_timesteps": self.num_timesteps,
            "parameters": sum(p.numel() for p in self.denoiser.parameters()),
            "device": str(dev),
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "precision": self.precision,
            "compiled": self.compiled,
            "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()},
            "attention": self.attention(),
        }
