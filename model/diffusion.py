"""DDPM on centred CA coordinates: cosine schedule, forward noising, Genie's loss, ancestral sampling.

Sources:
- Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (DDPM): forward process
  ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (eq. 4), posterior mean from the predicted noise
  ``mu = (x_t - beta_t / sqrt(1 - abar_t) eps_hat) / sqrt(alpha_t)`` (eq. 11), ``sigma_t^2 = beta_t``.
- Nichol & Dhariwal 2021, "Improved DDPM", eq. 17: ``abar(t) = f(t) / f(0)``,
  ``f(t) = cos^2(pi/2 (t/T + s) / (1 + s))``, ``beta_t = 1 - abar_t / abar_{t-1}`` clipped at 0.999.
- Genie (aqlaboratory/genie ``genie/diffusion/genie.py``, ``schedule.py``, ``utils/loss.py``): the
  same cosine form with Genie's constants, the loss (mean over real residues of the unsquared norm of
  ``eps_hat - eps``), ancestral sampling with ``sigma = noise_scale * sqrt(beta_t)`` and no noise on
  the last step.
- Fewer steps over the same trained model: Nichol & Dhariwal 2021, sec. 4 ("Improving sampling
  speed"; ``space_timesteps`` / ``SpacedDiffusion`` in openai/improved-diffusion): visit an evenly
  spaced subsequence of the timesteps and step ``t -> s`` with the DDPM posterior between them,
  ``alpha' = abar_t / abar_s``, ``beta' = 1 - alpha'``; the spacing is DDIM's "uniform" one (Song et
  al. 2021, "Denoising Diffusion Implicit Models", sec. 4.2 and appendix D.2).

Indexing: arrays have T + 1 entries; index 0 is the clean data (``beta_0 = 0``, ``abar_0 = 1``), real
timesteps are ``t = 1 .. T``. Genie indexes its arrays ``s = 0 .. T-1``; our ``t`` is Genie's ``s + 1``.

Symbols: B batch, L residues, T timesteps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

__all__ = ["BETA_MAX", "Schedule", "loss", "predict_x0", "q_sample", "respaced_timesteps", "reverse_step",
           "sample"]

# Upper clip of beta_t (Nichol & Dhariwal, Genie). With Genie's form and T = 1000 the largest
# unclipped beta is ~0.75 (at t = T), so the clip only matters for very small T.
BETA_MAX = 0.999


class Schedule:
    """Variance schedule with ``betas``, ``alphas``, ``alpha_bars``: each [T + 1] float32, index 0 clean.

    Cosine schedule as in Genie: ``f(t) = cos^2(pi/2 * t / (T + 1))``, ``abar_t = f(t) / f(0)``,
    ``beta_t = clip(1 - abar_t / abar_{t-1}, 0, BETA_MAX)``; ``alpha_bars`` is then recomputed as the
    cumulative product of ``1 - beta`` so the three arrays are exactly consistent after clipping.

    NOTE: Genie divides by ``T + 1`` and has no offset ``s`` (Nichol & Dhariwal use ``t / T`` and
    ``s = 0.008``). Genie's form keeps ``abar_T`` > 0 (~2.5e-6 at T = 1000) and is used here so trained
    weights behave like Genie's. Endpoints: ``abar_0 = 1``, ``abar_1 = 1 - ~2.5e-6``,
    ``abar_T ~ (pi / (2 (T + 1)))^2``; ``alpha_bars`` is strictly decreasing.
    """

    def __init__(self, betas: torch.Tensor) -> None:
        """``betas``: [T + 1] with ``betas[0] == 0``."""
        if betas.ndim != 1 or betas.shape[0] < 2 or float(betas[0]) != 0.0:
            raise ValueError("betas must be [T + 1] with betas[0] == 0 (index 0 is the clean data)")
        b64 = betas.to(torch.float64)
        a64 = 1.0 - b64
        self.num_timesteps = betas.shape[0] - 1
        self.betas = b64.float()  # [T + 1]
        self.alphas = a64.float()  # [T + 1]
        self.alpha_bars = torch.cumprod(a64, 0).float()  # [T + 1]
        # log abar_t from float64: a jump's beta' = -expm1(log abar_t - log abar_s) keeps its precision
        # near t = 0, where abar_t / abar_s is within ~1e-6 of 1 (float32 1 - ratio would cancel)
        self.log_alpha_bars = torch.cumsum(torch.log1p(-b64), 0).float()  # [T + 1]
        self._per_device: dict[torch.device, dict[str, torch.Tensor]] = {}

    @classmethod
    def cosine(cls, num_timesteps: int) -> Schedule:
        t = torch.arange(num_timesteps + 1, dtype=torch.float64)  # [T + 1]
        f = torch.cos(t / (num_timesteps + 1) * math.pi * 0.5) ** 2
        abar = f / f[0]
        betas = torch.zeros(num_timesteps + 1, dtype=torch.float64)
        betas[1:] = (1.0 - abar[1:] / abar[:-1]).clamp(0.0, BETA_MAX)
        return cls(betas)

    @classmethod
    def from_config(cls, config) -> Schedule:
        if config.schedule != "cosine":
            raise ValueError(f"unknown schedule {config.schedule!r}; only 'cosine' is implemented")
        return cls.cosine(config.numTimesteps)

    def on(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """The per-step coefficients as [T + 1] float32 tensors on ``device`` (cached, copied once)."""
        device = torch.device(device)
        if device not in self._per_device:
            tab = {
                "betas": self.betas,
                "alphas": self.alphas,
                "alpha_bars": self.alpha_bars,
                "sqrt_alpha_bars": self.alpha_bars.sqrt(),
                "sqrt_one_minus_alpha_bars": (1.0 - self.alpha_bars).sqrt(),
                "log_alpha_bars": self.log_alpha_bars,
            }
            self._per_device[device] = {k: v.to(device) for k, v in tab.items()}
        return self._per_device[device]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        """Forward noising (DDPM eq. 4). See :func:`q_sample`."""
        return q_sample(self, x0, t, noise, mask)


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1)  # [B] -> [B, 1, 1]


def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``, zero on padding when ``mask`` is given.

    Args:
        x0: [B, L, 3] centred clean CA coordinates.
        t: [B] long timesteps in [0, T].
        noise: [B, L, 3] standard normal.
        mask: [B, L] (1 residue, 0 padding) or None.
    Returns:
        x_t: [B, L, 3].
    """
    tab = schedule.on(x0.device)
    x_t = _per_sample(tab["sqrt_alpha_bars"][t]) * x0 + _per_sample(tab["sqrt_one_minus_alpha_bars"][t]) * noise
    if mask is not None:
        x_t = x_t * mask.unsqueeze(-1).to(x_t.dtype)
    return x_t


def predict_x0(schedule: Schedule, x_t: torch.Tensor, eps_hat: torch.Tensor, t: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
    """The clean trace implied by a noise prediction (DDPM eq. 4 solved for x0), for self-conditioning.

    ``x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)``, in float32, re-centred on each sample's
    real residues (like x_t) and zero on padding.

    Args:
        x_t: [B, L, 3]; eps_hat: [B, L, 3]; t: [B] long in [1, T]; mask: [B, L] (1 residue, 0 padding).
    Returns:
        x0_hat: [B, L, 3] float32.
    """
    tab = schedule.on(x_t.device)
    x0 = (x_t.float() - _per_sample(tab["sqrt_one_minus_alpha_bars"][t]) * eps_hat.float()) \
        / _per_sample(tab["sqrt_alpha_bars"][t])  # [B, L, 3]
    m = mask.to(x0.dtype).unsqueeze(-1)  # [B, L, 1]
    centre = (x0 * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1.0)  # [B, 1, 3]
    return (x0 - centre) * m


def loss(eps_hat: torch.Tensor, eps: torch.Tensor, mask: torch.Tensor, eps_norm: float = 1e-10) -> torch.Tensor:
    """Genie's loss: mean over real residues (pooled over the batch) of ``|eps_hat - eps|``.

    The norm is unsquared (Genie's ``rmsd``); ``eps_norm`` under the square root keeps the gradient
    finite at a perfect prediction. Computed in float32.

    Args:
        eps_hat: [B, L, 3] predicted noise.
        eps: [B, L, 3] true noise.
        mask: [B, L] (1 residue, 0 padding).
    Returns:
        scalar loss.
    """
    diff = (eps_hat.float() - eps.float())  # [B, L, 3]
    per_residue = torch.sqrt((diff * diff).sum(-1) + eps_norm)  # [B, L]
    m = mask.float()
    return (per_residue * m).sum() / m.sum().clamp_min(1.0)


def respaced_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """The timesteps a ``steps``-step sampler visits: ``steps`` entries from T down to 1, evenly spaced.

    Nichol & Dhariwal 2021's respacing (``space_timesteps`` with one section) / DDIM's "uniform"
    spacing: entry i is ``1 + round(i * (T - 1) / (steps - 1))`` (half rounded up, in exact integer
    arithmetic), listed in descending order. ``steps == T`` gives T, T - 1, ..., 1 exactly; ``steps
    == 1`` gives [T] (one jump from T to the data). Consecutive entries differ by at least 1.

    Raises ValueError unless ``1 <= steps <= num_timesteps``.
    """
    T, k = int(num_timesteps), int(steps)
    if T < 1 or not 1 <= k <= T:
        raise ValueError(f"steps must be between 1 and {T} (the model's timesteps), got {steps}")
    if k == 1:
        return [T]
    # round(i (T - 1) / (k - 1)) half up = floor((2 i (T - 1) + (k - 1)) / (2 (k - 1)))
    ascending = [1 + (2 * i * (T - 1) + (k - 1)) // (2 * (k - 1)) for i in range(k)]
    return ascending[::-1]


def reverse_step(schedule: Schedule, x_t: torch.Tensor, eps_hat: torch.Tensor, t: torch.Tensor,
                 mask: torch.Tensor, noise: torch.Tensor, noise_scale: torch.Tensor | float,
                 t_prev: torch.Tensor | None = None, *, recenter: bool = True,
                 posterior_variance: bool = False) -> torch.Tensor:
    """One ancestral DDPM step ``x_t -> x_s`` (``s = t_prev``, default ``t - 1``), per-sample t, s and noise scale.

    One step (``s = t - 1``): ``mu = (x_t - beta_t / sqrt(1 - abar_t) * eps_hat) / sqrt(alpha_t)``
    (DDPM eq. 11), ``x_{t-1} = mu + noise_scale * sqrt(beta_t) * noise``.
    A jump (``s < t - 1``, a respaced sampler, :func:`respaced_timesteps`): the same formulas with the
    DDPM posterior between the two timesteps (Nichol & Dhariwal 2021, sec. 4): ``alpha' = abar_t /
    abar_s``, ``beta' = min(1 - alpha', BETA_MAX)`` (then ``alpha' = 1 - beta'``) in place of
    ``alpha_t``, ``beta_t``; the noise keeps Genie's ``sigma = noise_scale * sqrt(beta')``.
    No noise where ``s == 0`` (the last step, Genie); padding is zeroed. A pure function of tensors:
    samples at different t and s can share one batch, and each sample's result depends only on its
    own rows. Where ``s == t - 1`` the coefficients are the schedule's own ``beta_t`` / ``alpha_t``,
    so ``t_prev = t - 1`` is bit-identical to leaving it out. ``posterior_variance`` uses DDPM's other
    choice, ``sigma = noise_scale * sqrt(beta_tilde)``, ``beta_tilde = (1 - abar_s) / (1 - abar_t) * beta'``
    (Ho et al. sec. 3.2; Nichol & Dhariwal respace it the same way), in place of Genie's ``sqrt(beta')``.

    NOTE: the clip at BETA_MAX acts only on long jumps at the noisy end (e.g. 1000 -> 889 of a
    10-step sampler at T = 1000, where 1 - alpha' ~ 0.9999); there it keeps 1 / sqrt(alpha') below
    ~32 (as the schedule's own clip does) at the cost of a mean that is not the exact posterior's.

    NOTE: Genie and Genie 2 only mask the result. With ``recenter`` (default) the real residues of
    each sample are also re-centred on their mean after the step: the added noise is not zero-mean,
    so without it the centre of mass random-walks away from the origin the model was trained at.

    Args:
        x_t: [B, L, 3] current coordinates.
        eps_hat: [B, L, 3] predicted noise at ``(x_t, t)``.
        t: [B] long timesteps in [1, T].
        mask: [B, L] (1 residue, 0 padding).
        noise: [B, L, 3] standard normal (ignored where s == 0).
        noise_scale: [B] or a float.
        t_prev: [B] long, the next timestep s in [0, t - 1]; None: ``t - 1``.
    Returns:
        x_s: [B, L, 3].
    """
    tab = schedule.on(x_t.device)
    x_t = x_t.float()
    if t_prev is None:
        t_prev = t - 1  # [B]
    log_ab = tab["log_alpha_bars"]
    beta_jump = (-torch.expm1(log_ab[t] - log_ab[t_prev])).clamp(max=BETA_MAX)  # [B] 1 - abar_t / abar_s
    one = t_prev == t - 1  # [B] a single step: the schedule's own coefficients, exactly
    beta = _per_sample(torch.where(one, tab["betas"][t], beta_jump))  # [B, 1, 1]
    alpha = _per_sample(torch.where(one, tab["alphas"][t], 1.0 - beta_jump))
    s1m = _per_sample(tab["sqrt_one_minus_alpha_bars"][t])
    mean = (x_t - beta / s1m * eps_hat.float()) / alpha.sqrt()  # [B, L, 3]
    scale = torch.as_tensor(noise_scale, dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0])  # [B]
    var = beta
    if posterior_variance:  # beta_tilde = (1 - abar_s) / (1 - abar_t) * beta'
        var = beta * _per_sample(-torch.expm1(log_ab[t_prev])) / s1m.square()
    sigma = _per_sample(scale) * var.sqrt() * _per_sample((t_prev > 0).to(x_t.dtype))  # [B, 1, 1]
    x_prev = mean + sigma * noise.float()
    m = mask.to(x_t.dtype).unsqueeze(-1)  # [B, L, 1]
    if recenter:
        centre = (x_prev * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1.0)  # [B, 1, 3]
        x_prev = x_prev - centre
    return x_prev * m


def _plan_batches(lengths: Sequence[int], max_batch_size: int, max_residues: int | None) -> list[list[int]]:
    """Group sample indices into batches, longest first, by count and padded-residue budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        cur = batches[-1] if batches else None
        if cur is not None and len(cur) < max_batch_size and (
                max_residues is None or (len(cur) + 1) * lengths[cur[0]] <= max_residues):
            cur.append(i)
        else:
            batches.append([i])
    return batches


def _draw(gens: list[torch.Generator], sizes: list[int], length: int, device: torch.device) -> torch.Tensor:
    """Standard normal [B, L, 3], zero on padding; row b comes from ``gens[b]`` alone."""
    z = torch.zeros(len(sizes), length, 3, device=device)
    for b, (gen, n) in enumerate(zip(gens, sizes)):
        z[b, :n] = torch.randn(n, 3, generator=gen, device=device)
    return z


@torch.no_grad()
def sample(denoiser: torch.nn.Module, lengths: Sequence[int], seeds: Sequence[int] | None = None,
           noise_scale: float | Sequence[float] = 0.6, *, schedule: Schedule | None = None,
           device: torch.device | str | None = None, max_batch_size: int = 32,
           max_residues: int | None = None,
           progress: Callable[[int, int], None] | None = None,
           return_trajectory: bool = False, steps: int | None = None,
           self_condition: bool | None = None) -> list[torch.Tensor]:
    """Generate CA traces by ancestral sampling from ``x_T ~ N(0, I)`` down to ``x_0``.

    ``steps`` (None: T) visits :func:`respaced_timesteps` ``(T, steps)`` and jumps between them
    (:func:`reverse_step` with ``t_prev``); ``steps == T`` is Genie's sampler, step for step.

    Sample ``i`` draws all its noise (start and every step) from its own ``torch.Generator`` seeded
    with ``seeds[i]``, so it is reproducible whatever it is batched with (up to the denoiser's own
    batch-size numerics). Samples are grouped longest-first into padded, masked batches of at most
    ``max_batch_size`` samples and, if given, ``max_residues`` padded residues.

    A self-conditioned denoiser (``denoiser.self_conditioning``) gets each step's x0 estimate
    (:func:`predict_x0` of the previous step's eps_hat; zeros at the first step) as ``x0_self``.

    Args:
        denoiser: ``denoiser(x_t [B, L, 3], t [B], mask [B, L][, x0_self]) -> eps_hat [B, L, 3]``; run in
            eval mode (its previous mode is restored).
        lengths: residues per sample.
        seeds: one int per sample; None draws them from torch's global generator.
        noise_scale: Genie's noise scale (0.6 default), one float or one per sample.
        schedule: defaults to ``Schedule.from_config(denoiser.config)``.
        device: defaults to the denoiser's parameter device.
        progress: called as ``progress(steps_done, steps_total)`` after every step.
        return_trajectory: also keep every step.
        steps: sampling steps, 1 .. T (None: T).
        self_condition: pass the previous estimate (None: when the denoiser is self-conditioned;
            False: never, as if it had no estimate at every step).
    Returns:
        one float32 CPU tensor per sample, in input order: [L_i, 3] (``x_0``), or
        [steps + 1, L_i, 3] (``x_T .. x_0``) with ``return_trajectory``.
    """
    n = len(lengths)
    if n == 0:
        return []
    if any(int(L) < 1 for L in lengths):
        raise ValueError(f"every length must be >= 1, got {list(lengths)}")
    if seeds is None:
        seeds = torch.randint(0, 2**62, (n,)).tolist()
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} lengths")
    scales = [float(noise_scale)] * n if isinstance(noise_scale, (int, float)) else [float(s) for s in noise_scale]
    if len(scales) != n:
        raise ValueError(f"{len(scales)} noise scales for {n} lengths")
    if schedule is None:
        schedule = Schedule.from_config(denoiser.config)
    if device is None:
        device = next(denoiser.parameters()).device
    device = torch.device(device)
    T = schedule.num_timesteps
    if self_condition is None:
        self_condition = bool(getattr(denoiser, "self_conditioning", False))
    visits = respaced_timesteps(T, T if steps is None else steps)  # T .. 1
    pairs = list(zip(visits, visits[1:] + [0]))  # (t, s): x_t -> x_s
    batches = _plan_batches([int(L) for L in lengths], max_batch_size, max_residues)
    total, done = len(batches) * len(pairs), 0
    out: list[torch.Tensor | None] = [None] * n

    was_training = denoiser.training
    denoiser.eval()
    try:
        for idx in batches:
            B, Lmax = len(idx), max(int(lengths[i]) for i in idx)
            gens = [torch.Generator(device=device).manual_seed(int(seeds[i])) for i in idx]
            mask = torch.zeros(B, Lmax, device=device)  # [B, L]
            for b, i in enumerate(idx):
                mask[b, : int(lengths[i])] = 1.0

            sizes = [int(lengths[i]) for i in idx]
            scale = torch.tensor([scales[i] for i in idx], device=device)  # [B]
            x = _draw(gens, sizes, Lmax, device)  # [B, L, 3] x_T
            x0_hat = torch.zeros_like(x) if self_condition else None  # [B, L, 3] no estimate yet
            traj = [x.cpu()] if return_trajectory else None
            for step, step_to in pairs:
                t = torch.full((B,), step, dtype=torch.long, device=device)  # [B]
                t_prev = torch.full((B,), step_to, dtype=torch.long, device=device)  # [B]
                if self_condition:
                    eps_hat = denoiser(x, t, mask, x0_hat)  # [B, L, 3]
                    x0_hat = predict_x0(schedule, x, eps_hat, t, mask)  # [B, L, 3] the next step's estimate
                else:
                    eps_hat = denoiser(x, t, mask)  # [B, L, 3]
                z = _draw(gens, sizes, Lmax, device) if step_to > 0 else torch.zeros_like(x)
                x = reverse_step(schedule, x, eps_hat, t, mask, z, scale, t_prev)
                if traj is not None:
                    traj.append(x.cpu())
                done += 1
                if progress is not None:
                    progress(done, total)
            final = torch.stack(traj, 1) if traj is not None else x.cpu()[:, None]  # [B, steps + 1 or 1, L, 3]
            for b, i in enumerate(idx):
                L = int(lengths[i])
                out[i] = final[b, :, :L].float() if traj is not None else final[b, 0, :L].float()
    finally:
        denoiser.train(was_training)
    return out  # type: ignore[return-value]
