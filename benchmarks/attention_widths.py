"""Which padded head widths make the attention core fastest: PyTorch SDPA backends x (q / k, v) widths.

Flash-IPA's attention rows are narrow and unequal (q / k 58 + 1 folded mask column, v 104 for the
shipped widths, bf16); ``model.ipa.attention.pack_rows`` pads them to what the chosen kernel takes. This
script asks each SDPA backend whether it accepts a pair of padded widths (PyTorch's own check), times
the forward and forward + backward at those widths, and reports the achieved FLOP/s counted on the
USEFUL widths (what the issue's "attention core" figure counts) against a bf16 matmul rate measured in
the same run.

    python benchmarks/attention_widths.py --out DIR                  # L = 4096, B = 8 and 32, H = 12
    python benchmarks/attention_widths.py --smoke --out DIR          # tiny sizes (any CUDA card)

Inputs are [B, L, H, D] rows transposed to [B, H, L, D] as ``model.ipa.attention._run_fused`` passes them.
Three input sets are rotated so caches do not flatter. Times are CUDA-event means after warm-up.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from stack import stack  # benchmarks/stack.py and timing.py (run as a script: its folder is on sys.path)
from timing import event_ms
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION,
            "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}
# (q / k, v) padded widths to try; the useful widths are --useful (59 = 58 + the folded mask column)
WIDTHS = ((104, 104), (112, 112), (128, 128), (64, 104), (64, 112), (64, 128), (72, 104), (80, 112))


def matmul_tflops(n: int, dtype: torch.dtype) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    return 2 * n**3 / (event_ms(lambda: a @ b, 20) * 1e-3) / 1e12


def time_width(backend: str, b: int, length: int, heads: int, dqk: int, dv: int, iters: int,
               dtype: torch.dtype) -> dict:
    sets = []
    for _ in range(3):
        q, k = (torch.randn(b, length, heads, dqk, device="cuda", dtype=dtype).transpose(1, 2) for _ in range(2))
        v = torch.randn(b, length, heads, dv, device="cuda", dtype=dtype).transpose(1, 2)
        sets.append([t.requires_grad_() for t in (q, k, v)])
    grad = torch.randn(b, heads, length, dv, device="cuda", dtype=dtype)
    state = {"i": 0}

    def fwd():
        q, k, v = sets[state["i"] % 3]
        state["i"] += 1
        with sdpa_kernel([BACKENDS[backend]]):
            return F.scaled_dot_product_attention(q, k, v, scale=1.0)

    def fwd_bwd():
        fwd().backward(grad)

    try:
        with torch.no_grad():
            fwd()
        fwd_bwd()
    except RuntimeError as err:  # the backend rejects these widths (or shapes)
        return {"accepted": False, "why": str(err).splitlines()[0][:160]}
    torch.cuda.synchronize()
    with torch.no_grad():
        for _ in range(3):
            fwd()
        ms_f = event_ms(fwd, iters)
    for _ in range(2):
        fwd_bwd()
    ms_fb = event_ms(fwd_bwd, max(3, iters // 3))
    return {"accepted": True, "fwd_ms": ms_f, "fwd_bwd_ms": ms_fb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--useful", type=int, nargs=2, default=[59, 104], metavar=("QK", "V"),
                    help="useful widths the FLOPs are counted on (Flash-IPA shipped: 58 + mask column, 104)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="L = 256, B = 2: a quick check of the script")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.smoke:
        args.lengths, args.batches, args.iters = [256], [2], 3
    dtype = torch.bfloat16
    mm = matmul_tflops(1024 if args.smoke else 8192, dtype)
    uq, uv = args.useful
    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 matmul {mm:.0f} TFLOP/s")
    print(f"{'backend':>14} {'B':>3} {'L':>5} {'qk':>4} {'v':>4} {'fwd ms':>8} {'useful TF/s':>11} "
          f"{'% mm':>5} {'fwd+bwd ms':>10} {'% mm':>5}")
    for length in args.lengths:
        for b in args.batches:
            useful = 2 * b * args.heads * length * length * (uq + uv)  # forward FLOPs on the useful widths
            for backend in BACKENDS:
                for dqk, dv in WIDTHS:
                    if dqk < uq or dv < uv:
                        continue
                    r = time_width(backend, b, length, args.heads, dqk, dv, args.iters, dtype)
                    r.update(backend=backend, B=b, L=length, H=args.heads, dqk=dqk, dv=dv)
                    if r["accepted"]:
                        r["useful_tflops_fwd"] = useful / (r["fwd_ms"] * 1e-3) / 1e12
                        r["fraction_fwd"] = r["useful_tflops_fwd"] / mm
                        # backward ~2.5x the forward's matmul FLOPs (dQ, dK, dV, dP; FA2 paper's count)
                        r["fraction_fwd_bwd"] = 3.5 * useful / (r["fwd_bwd_ms"] * 1e-3) / 1e12 / mm
                        print(f"{backend:>14} {b:3d} {length:5d} {dqk:4d} {dv:4d} {r['fwd_ms']:8.3f} "
                              f"{r['useful_tflops_fwd']:11.1f} {100 * r['fraction_fwd']:5.1f} "
                              f"{r['fwd_bwd_ms']:10.3f} {100 * r['fraction_fwd_bwd']:5.1f}")
                    else:
                        print(f"{backend:>14} {b:3d} {length:5d} {dqk:4d} {dv:4d}  rejected: {r['why'][:70]}")
                    rows.append(r)
                    torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    res = {"stack": stack(), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "matmul_tflops": mm,
           "useful_widths": [uq, uv], "rows": rows, "command": " ".join(sys.argv)}
    (args.out / "attention_widths.json").write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out / 'attention_widths.json'}")


if __name__ == "__main__":
    main()
