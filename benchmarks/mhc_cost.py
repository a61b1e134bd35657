"""What one mHC residual costs on the GPU, piece by piece, reference vs fused, launch overhead removed
(CUDA graphs).

For each (B, L) (default: 56 x 72, a training batch, and 256 x 128, a sampling batch), n = 4, C = 128,
float32 streams, every callable is captured 10 times into one CUDA graph and replayed; the time is
the replay's CUDA-event time / 10:
  sampling (no gradient): the plain residual's add; the pre-branch (``mhc_pre_reference`` vs
    ``kernels.pre.fused_pre``), the Sinkhorn (reference loop vs kernel) and H_res S + H_post^T y
    (``mix_out`` vs ``kernels.mix.mix_out``), each with the fused result's max error against float64;
    the whole ``MHCResidual`` (``fused=False`` vs ``fused=True``) against ``PlainResidual`` around the
    same cheap branch;
  Sinkhorn tilings: the fused kernel's forward and forward + backward (kernels launched directly) at
    each (matrices per program, warps) choice;
  training (forward + backward, ``torch.cuda.make_graphed_callables``): ``MHCResidual`` reference and
    fused vs ``PlainResidual`` around the same branch.
    NOTE: those rows include the autograd engine's host work around the two graphs (one
    AccumulateGrad per parameter), so at a few thousand residues they time the host, not the kernels;
    the graphed training step A/B (``profile_train_step.py --ab flash,mhc_flash --graph``) is the measure.

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

from model.config import Config
from model.mhc import MHCResidual
from model.mhc.kernels import mix, pre, sinkhorn
from model.mhc.reference import mhc_pre_reference, mix_out, sinkhorn_knopp
from model.network.structure import PlainResidual

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
    """y = x W + b (one float32 [C, C] linear): a stand-in branch, the same for every residual."""

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
    out = torch.empty_like(z)
    zr = z.clone().requires_grad_()
    ref_out = sinkhorn.sinkhorn_fused(zr, iters)
    (ref_grad,) = torch.autograd.grad(ref_out, zr, g)
    rows = []
    for block, warps in itertools.product((4, 8, 16, 32), (1, 2, 4)):
        kw = {"block": block, "num_warps": warps}
        fwd = graph_ms(lambda kw=kw: sinkhorn.sinkhorn_into(z, out, iters, **kw))
        fb = graph_ms(lambda kw=kw: (sinkhorn.sinkhorn_into(z, out, iters, **kw),
                                     sinkhorn.sinkhorn_vjp(z, g, iters, **kw)))
        o = sinkhorn.sinkhorn_fused(zr, iters, **kw)
        (gr,) = torch.autograd.grad(o, zr, g)
        err = max(float((o - ref_out).detach().abs().max()), float((gr - ref_grad).abs().max()))
        rows.append({**kw, "forward_ms": fwd, "forward_backward_ms": fb, "max_abs_diff_vs_default": err})
    return rows


def _err(a: torch.Tensor, exact: torch.Tensor) -> float:
    return float((a.double() - exact).abs().max())


def run_shape(batch: int, length: int, n: int, c: int) -> dict:
    dev = torch.device("cuda")
    cfg = Config()
    iters = cfg.mhcSinkhornIters
    torch.manual_seed(0)
    s = torch.randn(batch, length, n, c, device=dev)  # [B, L, n, C] streams, float32
    flat = s[..., 0, :].contiguous()  # [B, L, C] the plain residual's stream
    branch = CheapBranch(c).to(dev)
    maps_kw = {"n": n, "alpha_init": cfg.mhcAlphaInit, "sinkhorn_iters": iters}
    fused_res = MHCResidual(branch, c, **maps_kw, fused=True).to(dev)
    ref_res = MHCResidual(branch, c, **maps_kw, fused=False).to(dev)
    ref_res.load_state_dict(fused_res.state_dict())
    for m in (fused_res, ref_res):
        m.record = False
    maps = fused_res.mappings
    args = (maps.phi, *maps.column_parameters(), iters)
    errors: dict[str, float] = {}
    with torch.no_grad():
        rows: dict[str, float] = {}
        rows["plain residual add s + y"] = graph_ms(lambda: flat + flat)
        exact = mhc_pre_reference(s.double(), *(a.double() if torch.is_tensor(a) else a for a in args))
        x, h_post, pending = pre.fused_pre(s, *args)
        for name, a, e in zip(("x", "h_post", "h_res"), (x, h_post, pending.wait()), exact, strict=True):
            errors[f"pre-branch {name}"] = _err(a, e)
        rows["pre-branch, reference (mappings + Sinkhorn loop + H_pre S)"] = graph_ms(
            lambda: mhc_pre_reference(s, *args))
        rows["pre-branch, fused (kernel + Sinkhorn kernel)"] = graph_ms(lambda: pre.fused_pre(s, *args)[2].wait())
        logits = torch.randn(batch, length, n, n, device=dev)
        rows["Sinkhorn, reference loop"] = graph_ms(lambda: sinkhorn_knopp(logits, iters))
        rows["Sinkhorn, fused kernel"] = graph_ms(lambda: sinkhorn.sinkhorn_fused(logits, iters))
        h_res = exact[2].float()
        y = torch.randn_like(flat)
        errors["mix_out"] = _err(mix.mix_out(h_res, h_post, s, y), mix_out(h_res.double(), h_post.double(),
                                                                             s.double(), y.double()))
        rows["mix_out, reference (bmm + addcmul)"] = graph_ms(lambda: mix_out(h_res, h_post, s, y))
        rows["mix_out, fused"] = graph_ms(lambda: mix.mix_out(h_res, h_post, s, y))
        rows["mix_out + mean, fused"] = graph_ms(lambda: mix.mix_out(h_res, h_post, s, y, with_mean=True))
        plain = PlainResidual(branch).to(dev)
        rows["whole residual, plain (branch + add)"] = graph_ms(lambda: plain(flat))
        rows["whole residual, mHC reference"] = graph_ms(lambda: ref_res(s))
        rows["whole residual, mHC fused"] = graph_ms(lambda: fused_res(s))
    training = {"plain residual fwd + bwd": train_ms(plain.train(), flat.clone()),
                "mHC residual fwd + bwd, reference": train_ms(ref_res.train(), s.clone()),
                "mHC residual fwd + bwd, fused": train_ms(fused_res.train(), s.clone())}
    return {"batch": batch, "length": length, "n": n, "C": c, "sampling_ms": rows, "training_ms": training,
            "max_abs_err_vs_float64": errors, "sinkhorn_tilings": sinkhorn_tilings(batch * length, n, iters)}


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
        for name, ms in {**res["sampling_ms"], **res["training_ms"]}.items():
            print(f"  {ms * 1e3:9.1f} us  {name}")
        for name, err in res["max_abs_err_vs_float64"].items():
            print(f"  max |fused - float64| {err:.1e}  {name}")
        print(f"  Sinkhorn tilings (default: block {sinkhorn.BLOCK}, warps {sinkhorn.NUM_WARPS}):")
        for v in sorted(res["sinkhorn_tilings"], key=lambda v: v["forward_backward_ms"]):
            print(f"    fwd {v['forward_ms'] * 1e3:7.1f} us  fwd+bwd {v['forward_backward_ms'] * 1e3:7.1f} us  "
                  f"block {v['block']:2d} warps {v['num_warps']}  diff {v['max_abs_diff_vs_default']:.1e}")
    text = json.dumps(out, indent=1)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
