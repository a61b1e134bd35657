"""What one mHC residual costs on the GPU, piece by piece, with launch overhead removed (CUDA graphs).

For each (B, L) (default: 56 x 72, a training batch, and 256 x 128, a sampling batch), n = 4, C = 128,
float32 streams, every callable is captured 10 times into one CUDA graph and replayed; the time is
the replay's CUDA-event time / 10:
  sampling (no gradient): the plain residual's add, mHC's mapping logits (reference GEMM vs the fused
    kernel at each tiling / tl.dot precision, with its max error against float64), the whole
    ``MHCMappings``, Sinkhorn, the two stream mixings (reference vs fused), and the whole
    ``MHCResidual`` against ``PlainResidual`` around the same cheap branch;
  Sinkhorn tilings: the fused kernel's forward and forward + backward (``torch.autograd.grad``
    captured) at each (matrices per program, warps) choice;
  training (forward + backward, ``torch.cuda.make_graphed_callables``): ``MHCResidual`` vs
    ``PlainResidual`` around the same branch, fused mixing on and off.
    NOTE: those rows include the autograd engine's host work around the two graphs (one
    AccumulateGrad per parameter), so at a few thousand residues they time the host, not the kernels
    (two runs of 56 x 72 on the H100 gave fused / reference mixing 302 / 300 and 539 / 340 us); the
    graphed training step A/B (``profile_train_step.py --ab flash,mhc_flash --graph``) is the measure.

    python benchmarks/mhc_cost.py [--shapes 56x72,256x128] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from timing import event_ms

from model import mhc
from model.config import Config
from model.mhc.kernels import map as mhc_map_triton
from model.mhc.kernels import mix as mhc_mix_triton
from model.mhc.kernels import sinkhorn as sinkhorn_triton
from model.structure import PlainResidual

REPEAT = 10  # calls captured per graph


def graph_ms(fn, reps: int = 5) -> float:
    """Median milliseconds per call of ``fn`` (no gradient) replayed from a CUDA graph of REPEAT calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPEAT):
            fn()
    times = sorted(event_ms(graph.replay, 1) / REPEAT for _ in range(reps))
    return times[len(times) // 2]


class CheapBranch(nn.Module):
    """y = x W + b (one float32 [C, C] linear): a stand-in branch, the same for both residuals."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.lin = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


class _Call(nn.Module):
    """A fresh wrapper per capture: make_graphed_callables replaces the forward of what it is given."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def train_ms(module: nn.Module, streams: torch.Tensor, reps: int = 20) -> float:
    """Median ms of one forward + backward replayed from make_graphed_callables' graphs."""
    graphed = torch.cuda.make_graphed_callables(_Call(module), (streams,), allow_unused_input=True)
    grad = torch.randn_like(streams)
    times = []
    for _ in range(reps + 3):
        times.append(event_ms(lambda: graphed(streams).backward(grad), 1))
        for p in module.parameters():
            p.grad = None
    times = sorted(times[3:])
    return times[len(times) // 2]


def sinkhorn_tilings(count: int, n: int, iters: int) -> list[dict]:
    """The fused Sinkhorn's forward and forward + backward kernels (graphed, launched directly: no
    autograd in the capture) at each (matrices per program, warps) tiling, for ``count`` random [n, n]
    logit matrices; the max difference of output and gradient (through autograd) from the default."""
    dev = torch.device("cuda")
    z = torch.randn(count, n, n, device=dev) * 2.0
    g = torch.randn(count, n, n, device=dev)
    out, grad = torch.empty_like(z), torch.empty_like(z)
    sums = torch.empty(count, 2 * iters, n, dtype=torch.float64, device=dev)  # the backward's scratch
    floor = mhc.SINKHORN_LOGIT_FLOOR
    fwd_kernel, bwd_kernel = sinkhorn_triton._kernels()
    zr = z.clone().requires_grad_()
    ref_out = sinkhorn_triton.sinkhorn_fused(zr, iters, floor)
    (ref_grad,) = torch.autograd.grad(ref_out, zr, g)

    def forward(**kw):
        sinkhorn_triton._launch(fwd_kernel, count, z, out, iters=iters, n=n, floor=floor, **kw)

    def both(**kw):
        forward(**kw)
        sinkhorn_triton._launch(bwd_kernel, count, z, g, grad, sums, iters=iters, n=n, floor=floor, **kw)

    rows = []
    for block, warps in itertools.product((4, 8, 16, 32), (1, 2, 4)):
        kw = {"block": block, "num_warps": warps}
        fwd = graph_ms(lambda kw=kw: forward(**kw))
        fb = graph_ms(lambda kw=kw: both(**kw))
        o = sinkhorn_triton.sinkhorn_fused(zr, iters, floor, **kw)
        (gr,) = torch.autograd.grad(o, zr, g)
        err = max(float((o - ref_out).abs().max()), float((gr - ref_grad).abs().max()))
        rows.append({**kw, "forward_ms": fwd, "forward_backward_ms": fb, "max_abs_diff_vs_default": err})
    return rows


def run_shape(batch: int, length: int, n: int, c: int) -> dict:
    dev = torch.device("cuda")
    cfg = Config()
    torch.manual_seed(0)
    s = torch.randn(batch, length, n, c, device=dev)  # [B, L, n, C] streams, float32
    flat = s[..., 0, :].contiguous()  # [B, L, C] the plain residual's stream
    maps = mhc.MHCMappings(c, n, cfg).to(dev)
    with torch.no_grad():
        maps.phi.normal_(0, 1.0 / (n * c) ** 0.5)
        alpha = torch.cat([maps.alpha_pre.expand(n), maps.alpha_post.expand(n), maps.alpha_res.expand(n * n)])
        bias = torch.cat([maps.b_pre, maps.b_post, maps.b_res.flatten()])
        want = mhc.mapping_logits(s.double(), maps.phi.double(), alpha.double(), bias.double())
        rows: dict[str, float] = {}
        rows["plain residual add s + y"] = graph_ms(lambda: flat + flat)
        rows["mapping logits, reference (rms_norm + fp32 GEMM + addcmul)"] = graph_ms(
            lambda: mhc.mapping_logits(s, maps.phi, alpha, bias))
        variants = []
        for bm, bk, warps, prec in itertools.product((32, 64, 128), (32, 64, 128), (4, 8), ("tf32x3", "tf32")):
            if (n * c) % bk:
                continue
            kw = {"block_m": bm, "block_k": bk, "num_warps": warps, "precision": prec}
            try:
                err = float((mhc_map_triton.mapping_logits(s, maps.phi, alpha, bias, **kw).double() - want).abs().max())
                ms = graph_ms(lambda kw=kw: mhc_map_triton.mapping_logits(s, maps.phi, alpha, bias, **kw))
            except Exception as exc:  # noqa: BLE001 - a tiling Triton cannot compile: report and go on
                variants.append({**kw, "error": f"{type(exc).__name__}: {exc}"[:200]})
                continue
            variants.append({**kw, "ms": ms, "max_abs_err_vs_float64": err})
        ok = [v for v in variants if "ms" in v]
        rows["mapping logits, fused (default tiling)"] = graph_ms(lambda: mhc_map_triton.mapping_logits(s, maps.phi, alpha, bias))
        best = min((v for v in ok if v["precision"] == "tf32x3"), key=lambda v: v["ms"])
        rows["mapping logits, fused (best tf32x3 tiling)"] = best["ms"]
        maps.fused = True
        rows["MHCMappings forward (fused logits + sigmoids + Sinkhorn)"] = graph_ms(lambda: maps(s))
        maps.fused = False
        rows["MHCMappings forward (reference logits)"] = graph_ms(lambda: maps(s))
        maps.fused = True
        logits = torch.randn(batch, length, n, n, device=dev)
        rows["Sinkhorn forward (fused kernel)"] = graph_ms(lambda: mhc.sinkhorn_knopp(logits, cfg.mhcSinkhornIters))
        h_pre, h_post, h_res = maps(s)
        y = torch.randn_like(flat)
        rows["mix_in reference (bmm)"] = graph_ms(lambda: mhc.mix_in(h_pre, s, True))
        rows["mix_in fused"] = graph_ms(lambda: mhc_mix_triton.mix_in(h_pre, s))
        rows["mix_out reference (bmm + addcmul)"] = graph_ms(lambda: mhc.mix_out(h_res, h_post, s, y, True))
        rows["mix_out fused"] = graph_ms(lambda: mhc_mix_triton.mix_out(h_res, h_post, s, y))
        branch = CheapBranch(c).to(dev)
        mres = mhc.MHCResidual(branch, c, cfg, n=n).to(dev)
        mres.record = False
        plain = PlainResidual(branch).to(dev)
        rows["whole residual, plain (branch + add)"] = graph_ms(lambda: plain(flat))
        rows["whole residual, mHC (branch + mHC)"] = graph_ms(lambda: mres(s))
    training: dict[str, float] = {}
    s_req = s.clone()
    flat_req = flat.clone()
    training["plain residual fwd + bwd"] = train_ms(plain.train(), flat_req)
    for fused in (False, True):
        mres.fused_mixing = fused
        training[f"mHC residual fwd + bwd (fused_mixing {fused})"] = train_ms(mres.train(), s_req)
    return {"batch": batch, "length": length, "n": n, "C": c, "sampling_ms": rows, "training_ms": training,
            "mapping_variants": variants, "best_tf32x3": best,
            "sinkhorn_tilings": sinkhorn_tilings(batch * length, n, cfg.mhcSinkhornIters)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="56x72,256x128")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("mhc_cost.py needs a CUDA device")
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": []}
    for shape in args.shapes.split(","):
        b, length = (int(v) for v in shape.lower().split("x"))
        res = run_shape(b, length, 4, 128)
        out["shapes"].append(res)
        print(f"\n== B x L = {b} x {length} ({b * length} residues), n = 4, C = 128, float32 streams ==")
        for name, ms in res["sampling_ms"].items():
            print(f"  {ms * 1e3:9.1f} us  {name}")
        for name, ms in res["training_ms"].items():
            print(f"  {ms * 1e3:9.1f} us  {name}")
        print("  fastest mapping tilings:")
        for v in sorted((v for v in res["mapping_variants"] if "ms" in v), key=lambda v: v["ms"])[:6]:
            print(f"    {v['ms'] * 1e3:8.1f} us  block_m {v['block_m']:3d} block_k {v['block_k']:3d} "
                  f"warps {v['num_warps']} {v['precision']:6s} err {v['max_abs_err_vs_float64']:.1e}")
        print(f"  Sinkhorn tilings (default: block {sinkhorn_triton.BLOCK}, warps {sinkhorn_triton.NUM_WARPS}):")
        for v in sorted(res["sinkhorn_tilings"], key=lambda v: v["forward_backward_ms"]):
            print(f"    fwd {v['forward_ms'] * 1e3:7.1f} us  fwd+bwd {v['forward_backward_ms'] * 1e3:7.1f} us  "
                  f"block {v['block']:2d} warps {v['num_warps']}  diff {v['max_abs_diff_vs_default']:.1e}")
    text = json.dumps(out, indent=1)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
