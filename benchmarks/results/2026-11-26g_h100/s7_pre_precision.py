"""Session 7: tl.dot precision (tf32x3 / ieee / tf32) of the fused pre-branch, forward and forward + backward."""
import json, sys
from pathlib import Path
import torch
sys.path.insert(0, "benchmarks")
from mhc_cost import graph_ms
from model import mhc, mhc_pre_triton
from model.config import Config

dev = torch.device("cuda")
n, c = 4, 128
cfg = Config()
rows = []
for count in (128, 1024, 4032, 8064, 32768):
    torch.manual_seed(0)
    s = torch.randn(count, n, c, device=dev)
    maps = mhc.MHCMappings(c, n, cfg).to(dev)
    with torch.no_grad():
        maps.phi.normal_(0, 1.0 / (n * c) ** 0.5)
        maps.alpha_pre.fill_(0.5); maps.alpha_post.fill_(0.5); maps.alpha_res.fill_(0.5)
    params = [maps.phi, *maps.column_parameters()]
    gx, gp, gr = torch.randn(count, c, device=dev), torch.randn(count, n, device=dev), torch.randn(count, n, n, device=dev)
    sq = s.clone().requires_grad_()
    # float64 reference
    s64 = s.double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() for p in params]
    ref = mhc.mhc_pre_reference(s64, *p64, 20)
    gref = torch.autograd.grad(ref, [s64, p64[0]], [gx.double(), gp.double(), gr.double()])
    for prec in ("tf32x3", "ieee", "tf32"):
        mhc_pre_triton.PRECISION = prec
        with torch.no_grad():
            out = mhc_pre_triton.mhc_pre(s, *params, 20)
            err_f = max(float((o.double() - r).abs().max()) for o, r in zip(out, ref))
            fwd = graph_ms(lambda: mhc_pre_triton.mhc_pre(s, *params, 20))
        def fb():
            o = mhc_pre_triton.mhc_pre(sq, *params, 20)
            return torch.autograd.grad(o, [sq, params[0]], [gx, gp, gr])
        g = fb()
        err_b = max(float((a.double() - b).abs().max() / b.abs().max()) for a, b in zip(g, gref))
        both = graph_ms(fb)
        row = {"count": count, "precision": prec, "fwd_nograd_us": 1e3 * fwd, "fwd_bwd_us": 1e3 * both,
               "fwd_max_abs_err": err_f, "grad_max_rel_err": err_b}
        rows.append(row); print(row, flush=True)
Path(sys.argv[1]).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
