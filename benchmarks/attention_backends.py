"""FlashAttention 4 against PyTorch SDPA (cuDNN) on Flash-IPA's packed attention rows, per serving shape.

The service picks one attention kernel per shape class (batch x length); this script gives the figures
behind that choice. For each backend installed and usable here, at each B x L (masks with real zeros:
the last quarter of every other sample is padding), it times ``model.ipa.attention.packed_attention``:

- ``fwd``: the forward alone, as sampling runs it (no autograd);
- ``fwd_bwd``: forward + backward, as training runs it;

and checks the output and the q / k / v gradients against the fp32 ``math`` reference on the same rows
(max abs difference over the reference's max abs value). A backend that fails a pass (for example FA4's
sm90 backward at v width 104: shared memory) is reported with its error, after its forward's time and
output error. Widths: the shipped Flash-IPA rows (q / k 58 useful columns, v 104, 8 heads by default).

    python benchmarks/attention_backends.py --out DIR
    python benchmarks/attention_backends.py --smoke --out DIR      # two small shapes

Writes DIR/attention_backends.json and prints a table. CUDA events, means after warm-up.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from stack import stack  # benchmarks/stack.py and timing.py (run as a script: its folder is on sys.path)
from timing import event_ms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model.ipa.attention import packed_attention
from model.ipa.backends import available_backends, describe, resolve_backend

SHAPES = "1x128,16x128,64x128,128x128,8x256,32x256,4x512,16x512,2x1024"


def rows(b: int, n: int, heads: int, dqk: int, dv: int, seed: int, dtype, device):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, n, heads, dqk, generator=g, device=device, dtype=dtype) * dqk ** -0.5
    k = torch.randn(b, n, heads, dqk, generator=g, device=device, dtype=dtype)
    v = torch.randn(b, n, heads, dv, generator=g, device=device, dtype=dtype)
    mask = torch.ones(b, n, device=device, dtype=torch.bool)
    mask[1::2, n - n // 4:] = False  # real zeros: padded residues in every other sample
    return q, k, v, mask


def run(name: str, q, k, v, mask):
    return packed_attention([q], [k], [v], mask, backend=name) * mask[:, :, None, None]


def compare(name: str, q, k, v, mask, *, grads: bool) -> dict:
    """Max abs error of the output (and, with ``grads``, the q / k / v gradients) against fp32 math, relative to
    the reference's max abs value (dq is O(10-100) with these inputs)."""
    outs = {}
    for which, dtype in ((name, q.dtype), ("math", torch.float32)):
        leaves = [t.detach().to(dtype).requires_grad_(grads) for t in (q, k, v)]
        out = run(which, *leaves, mask)
        if grads:
            torch.manual_seed(0)
            out.float().backward(torch.randn_like(out.float()) * mask[:, :, None, None])
        outs[which] = [out.detach().float()] + ([t.grad.float() for t in leaves] if grads else [])
    return {key: float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
            for key, a, b in zip(("out", "dq", "dk", "dv"), outs[name], outs["math"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated BxL")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--widths", type=int, nargs=2, default=[58, 104], metavar=("QK", "V"))
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--smoke", action="store_true", help="1x128 and 4x256 only")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attention_backends.py needs a CUDA GPU")
    device, dtype = torch.device("cuda"), torch.bfloat16
    shapes = [tuple(int(x) for x in s.split("x")) for s in ("1x128,4x256" if args.smoke else args.shapes).split(",")]
    status = available_backends(device)
    names = [n for n in ("fa4", "sdpa_cudnn", "sdpa_flash") if n in status and status[n].usable]
    auto = describe(resolve_backend((args.widths[0], args.widths[1]), device, dtype))
    info = {"stack": stack(), "dtype": str(dtype), "heads": args.heads, "widths": args.widths, "auto": auto,
            "backends": {n: {"found": status[n].found, "usable": status[n].usable} for n in status}}
    print(f"# {info['stack']['running']['gpu']}  torch {torch.__version__}  bf16  H={args.heads}  widths {args.widths}")
    print(f"# auto choice: {auto}")
    rows_out = []
    print(f"{'B x L':>10} {'backend':>11} {'fwd ms':>8} {'fwd+bwd':>8} {'rel out':>8} {'rel dq':>8} "
          f"{'rel dk':>8} {'rel dv':>8}")
    for b, n in shapes:
        q, k, v, mask = rows(b, n, args.heads, *args.widths, seed=b * 7919 + n, dtype=dtype, device=device)
        for name in names:
            row = {"batch": b, "length": n, "backend": name}
            try:
                with torch.no_grad():
                    for _ in range(3):
                        run(name, q, k, v, mask)
                    row["fwd_ms"] = event_ms(lambda name=name, t=(q, k, v, mask): run(name, *t), args.iters)
                    row["rel_err"] = compare(name, q, k, v, mask, grads=False)
                leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
                go = torch.randn(b, n, args.heads, args.widths[1], device=device, dtype=dtype)

                def step(name=name, leaves=leaves, go=go, mask=mask):
                    run(name, *leaves, mask).backward(go)

                for _ in range(3):
                    step()
                row["fwd_bwd_ms"] = event_ms(step, args.iters)
                row["rel_err"] = compare(name, q, k, v, mask, grads=True)
            except Exception as exc:  # noqa: BLE001  (a backend that rejects a pass is reported, not fatal)
                row["error"] = f"{type(exc).__name__}: {exc}"
            rows_out.append(row)
            err = row.get("rel_err", {})
            cells = [f"{row[key]:8.3f}" if key in row else f"{'-':>8}" for key in ("fwd_ms", "fwd_bwd_ms")]
            cells += [f"{err[key]:8.4f}" if key in err else f"{'-':>8}" for key in ("out", "dq", "dk", "dv")]
            print(f"{b:>4} x {n:<4} {name:>11} " + " ".join(cells)
                  + (f"  ({row['error'][:70]})" if "error" in row else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention_backends.json").write_text(json.dumps({**info, "rows": rows_out}, indent=1))


if __name__ == "__main__":
    main()
