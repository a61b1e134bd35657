import torch, sys
sys.path.insert(0, "benchmarks")
from model import mhc, mhc_pre_triton
from model.config import Config
dev = torch.device("cuda"); n, c = 4, 128; count = 32768
torch.manual_seed(0)
s = torch.randn(count, n, c, device=dev)
maps = mhc.MHCMappings(c, n, Config()).to(dev)
with torch.no_grad():
    maps.phi.normal_(0, 1.0 / (n * c) ** 0.5); maps.alpha_pre.fill_(0.5); maps.alpha_post.fill_(0.5); maps.alpha_res.fill_(0.5)
params = [maps.phi, *maps.column_parameters()]
gx, gp, gr = torch.randn(count, c, device=dev), torch.randn(count, n, device=dev), torch.randn(count, n, n, device=dev)
sq = s.clone().requires_grad_()
o = mhc_pre_triton.mhc_pre(sq, *params, 20)
g = torch.autograd.grad(o, [sq, params[0]], [gx, gp, gr])
s64 = s.double().requires_grad_(); p64 = [p.detach().double().requires_grad_() for p in params]
ref = mhc.mhc_pre_reference(s64, *p64, 20)
gref = torch.autograd.grad(ref, [s64, p64[0]], [gx.double(), gp.double(), gr.double()])
for name, a, b in zip(("gs", "gphi"), g, gref):
    print(name, "kernel nan", int(a.isnan().sum()), "ref nan", int(b.isnan().sum()), "max|ref|", float(b.abs().max()), "maxdiff", float((a.double() - b).abs().max()))
for name, a, b in zip(("x", "hpost", "hres"), o, ref):
    print(name, "kernel nan", int(a.isnan().sum()), "ref nan", int(b.isnan().sum()))
