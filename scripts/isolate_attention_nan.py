"""Replay the attention calls of a kept non-finite step (scripts/hunt_nonfinite.py) one by one, on
the fused kernel alone, and find which inputs make its backward non-finite.

    python scripts/isolate_attention_nan.py OUT/nonfinite_step.pt --out OUT
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from model import build_denoiser
from model.config import parse_config
from model.diffusion import Schedule, q_sample
from model.diffusion import loss as genie_loss
from model.ipa import attention


def record_calls(den, dump):
    """Forward + backward in bf16 on the kept step; every fused attention call's (q, k, v, dO)."""
    calls, run = [], attention._run_fused

    def spy(name, q, k, v):
        out = run(name, q, k, v)
        entry = {"name": name, "q": q.detach().clone(), "k": k.detach().clone(), "v": v.detach().clone()}
        calls.append(entry)
        if out.requires_grad:
            out.register_hook(lambda g, e=entry: e.__setitem__("dout", g.detach().clone()))
        return out

    attention._run_fused = spy
    try:
        dev = next(den.parameters()).device
        x0, mask, t, eps = (dump[k].to(dev) for k in ("x0", "mask", "t", "eps"))
        x_t = q_sample(Schedule.from_config(parse_config(dump["config"])), x0, t, eps, mask)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            eps_hat = den(x_t, t, mask)
        genie_loss(eps_hat, eps, mask).backward()
    finally:
        attention._run_fused = run
    return calls, mask


def grads(name, q, k, v, dout):
    q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
    out = attention._run_fused(name, q, k, v)
    out.backward(dout)
    return out, q.grad, k.grad, v.grad


def where_bad(x, mask):
    bad = ~torch.isfinite(x.float())  # [B, L, H, D]
    if not bad.any():
        return None
    idx = bad.nonzero()
    rows = idx[:, :2].unique(dim=0)
    real = mask[rows[:, 0], rows[:, 1]] > 0
    return {"count": int(bad.sum()), "rows": rows[:8].tolist(), "rows_real": int(real.sum()),
            "rows_padded": int((~real).sum()), "heads": idx[:, 2].unique().tolist()[:12],
            "columns": idx[:, 3].unique().tolist()[:20]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dump", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    dump = torch.load(args.dump, weights_only=False)
    den = build_denoiser(parse_config(dump["config"])).cuda().train()
    den.load_state_dict(dump["state_dict"])
    calls, mask = record_calls(den, dump)
    report = []
    for i, c in enumerate(calls):
        q, k, v, dout = c["q"], c["k"], c["v"], c.get("dout")
        if dout is None:
            continue
        s = torch.einsum("blhd,bmhd->bhlm", q.float(), k.float())  # [B, H, L, L] fp32 logits
        real_k = mask[:, None, None, :] > 0
        s_real = s.masked_fill(~real_k, float("-inf"))
        entry = {"call": i, "backend": c["name"], "shape_q": list(q.shape), "shape_v": list(v.shape),
                 "max_abs_q": q.float().abs().amax().item(), "max_abs_k": k.float().abs().amax().item(),
                 "max_abs_q_col": q.float().abs().amax(dim=(0, 1, 2)).tolist(),
                 "max_abs_k_col_real": k.float().masked_fill(~(mask[:, :, None, None] > 0), 0).abs().amax(dim=(0, 1, 2)).tolist(),
                 "logit_max_real": s_real.amax().item(),
                 "logit_row_spread_max": (s_real.amax(-1) - s_real.masked_fill(~real_k, float("inf")).amin(-1)).amax().item(),
                 "max_abs_dout": dout.float().abs().amax().item()}
        out, dq, dk, dv = grads(c["name"], q, k, v, dout)
        entry["cudnn"] = {"out": where_bad(out, mask), "dq": where_bad(dq, mask), "dk": where_bad(dk, mask),
                          "dv": where_bad(dv, mask)}
        bad = any(entry["cudnn"][x] for x in ("dq", "dk", "dv"))
        if bad:
            variants = {}
            for label, (qq, kk, vv) in {
                "mask_1e4": (q, torch.where(k < -1e5, torch.full_like(k, -1e4), k), v),
                "padded_query_rows_zeroed": (q * (mask[:, :, None, None] > 0), k, v),
            }.items():
                r = grads(c["name"], qq, kk, vv, dout)
                variants[label] = {n: where_bad(x, mask) for n, x in zip(("out", "dq", "dk", "dv"), r)}
            for name in ("sdpa_flash", "sdpa_efficient"):
                qq, kk, vv = (torch.nn.functional.pad(x, (0, max(q.shape[-1], v.shape[-1]) - x.shape[-1]))
                              for x in (q, k, v))
                try:
                    r = grads(name, qq, kk, vv, torch.nn.functional.pad(dout, (0, qq.shape[-1] - dout.shape[-1])))
                    variants[name] = {n: where_bad(x, mask) for n, x in zip(("out", "dq", "dk", "dv"), r)}
                except RuntimeError as e:
                    variants[name] = str(e)[:200]
            repeat = [where_bad(grads(c["name"], q, k, v, dout)[1], mask) is not None for _ in range(5)]
            entry["variants"], entry["cudnn_repeat_bad_dq"] = variants, repeat
            torch.save({"q": q.cpu(), "k": k.cpu(), "v": v.cpu(), "dout": dout.cpu(), "mask": mask.cpu()},
                       args.out / f"attention_call{i}.pt")
        report.append(entry)
        print(json.dumps(entry)[:1500], flush=True)
    (args.out / "isolate.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
