"""Session 7 exploration: where the fused pre-branch forward's time goes at batch-1 sampling (128 residues)."""
import itertools, json, sys
from pathlib import Path
import torch
sys.path.insert(0, "benchmarks")
from mhc_cost import graph_ms
from model import mhc, mhc_pre_triton, sinkhorn_triton, mhc_mix_triton
from model.config import Config
from model.triton_support import dot_width

dev = torch.device("cuda")
n, c = 4, 128
cfg = Config()
out = {"device": torch.cuda.get_device_name(), "rows": []}
k_fwd = mhc_pre_triton._kernels()[0]
for count in [int(v) for v in sys.argv[2].split(',')]:
    torch.manual_seed(0)
    s = torch.randn(count, n, c, device=dev)
    maps = mhc.MHCMappings(c, n, cfg).to(dev)
    with torch.no_grad():
        maps.phi.normal_(0, 1.0 / (n * c) ** 0.5)
    params = tuple(p.detach().float().contiguous() for p in (maps.alpha_pre, maps.alpha_post, maps.alpha_res, maps.b_pre, maps.b_post, maps.b_res))
    phi = maps.phi.detach().float().contiguous()
    x = torch.empty(count, c, device=dev); hp = torch.empty(count, n, device=dev); hr = torch.empty(count, n, n, device=dev)
    ref = mhc_pre_triton.mhc_pre(s, phi, *params, 20)
    def launch(bm, bk, bc, w, stages, iters, prec="tf32x3"):
        k_fwd[(-(-count // bm),)](s, phi, *params, x, hp, hr, hp, hp, hp, count, mhc.RMS_EPS, N=n, C=c,
            MP=dot_width(2 * n + n * n), ITERS=iters, FLOOR=mhc.SINKHORN_LOGIT_FLOOR, BLOCK_M=bm, BLOCK_K=bk,
            BLOCK_C=bc, SAVE=False, SINKHORN=True, PRECISION=prec, num_warps=w, num_stages=stages)
    base = mhc_pre_triton._tiling(count, c, False)[:4]
    res = {"count": count, "default_tiling": base}
    res["default_us"] = 1e3 * graph_ms(lambda: mhc_pre_triton.mhc_pre(s, phi, *params, 20))
    for iters in (0, 1, 5, 10, 20):
        res[f"iters{iters}_us"] = 1e3 * graph_ms(lambda i=iters: launch(*base, 3, i))
    sweep = []
    res["tf32_us"] = 1e3 * graph_ms(lambda: launch(*base, 3, 20, "tf32"))
    res["ieee_us"] = 1e3 * graph_ms(lambda: launch(*base, 3, 20, "ieee"))
    print("tf32 / ieee", res["tf32_us"], res["ieee_us"], flush=True)
    print(count, "iters", [round(res[f'iters{i}_us'], 1) for i in (0, 1, 5, 10, 20)], "default", res["default_us"], flush=True)
    for bm, bk, bc, w, st in itertools.product((16,), (64, 128, 512), (32, 128), (1, 2, 4), (1, 3)):
        if count >= 4032 and bm == 16 and w == 2: continue
        try:
            launch(bm, bk, bc, w, st, 20, 'ieee'); torch.cuda.synchronize()
            err = max(float((x - ref[0]).abs().max()), float((hr - ref[2]).abs().max()))
            us = 1e3 * graph_ms(lambda a=(bm, bk, bc, w, st): launch(*a, 20, 'ieee'))
            us0 = 1e3 * graph_ms(lambda a=(bm, bk, bc, w, st): launch(*a, 0, 'ieee'))
            sweep.append({"bm": bm, "bk": bk, "bc": bc, "w": w, "st": st, "us": us, "us_iters0": us0, "err": err})
        except Exception as e:
            sweep.append({"bm": bm, "bk": bk, "bc": bc, "w": w, "st": st, "error": str(e)[:100]})
    res["sweep"] = sweep
    # sinkhorn alone and mix_out alone at this count
    z = torch.randn(count, n, n, device=dev)
    for blk in (1, 2, 4, 8, 16):
        for w in (1, 2, 4):
            res[f"sinkhorn_blk{blk}_w{w}_us"] = 1e3 * graph_ms(lambda b=blk, w=w: sinkhorn_triton.sinkhorn_fused(z, 20, mhc.SINKHORN_LOGIT_FLOOR, block=b, num_warps=w))
    y = torch.randn(count, c, device=dev)
    res["mix_out_us"] = 1e3 * graph_ms(lambda: mhc_mix_triton.mix_out(hr, hp, s, y))
    res["mix_out_mean_us"] = 1e3 * graph_ms(lambda: mhc_mix_triton.mix_out(hr, hp, s, y, with_mean=True))
    res["plain_add_us"] = 1e3 * graph_ms(lambda: y + y)
    ok = sorted((v for v in sweep if "us" in v), key=lambda v: v["us"])
    print(f"== count {count}: default {base} {res['default_us']:.1f} us; iters 0/1/5/10/20:",
          [round(res[f'iters{i}_us'], 1) for i in (0, 1, 5, 10, 20)], flush=True)
    for v in ok[:8]: print("   ", v)
    print("   sinkhorn:", {k: round(v, 1) for k, v in res.items() if k.startswith("sinkhorn")})
    print("   mix_out", round(res["mix_out_us"], 1), "with mean", round(res["mix_out_mean_us"], 1), "add", round(res["plain_add_us"], 1))
    out["rows"].append(res)
Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
