"""The cost of self-conditioning in training: step time (forward + backward + AdamW) with it off and on.

    python benchmarks/self_conditioning_cost.py configs/tiny_cpu.txt --batch 16 --length 48
    python benchmarks/self_conditioning_cost.py configs/tiny_cpu.txt --set usePairFree=True
    python benchmarks/self_conditioning_cost.py configs/ship_pairfree.txt --device cuda --batch 56 --length 72

Both models are built from the config (``selfConditioning`` False / True) and stepped alternately in one
process on the same padded batch (real zeros in the mask: chain lengths spread over L / 2 .. L), through
``DiffusionModule._loss``, so the "on" steps include the coins, the no-grad first pass and the
estimate's features. Prints the median step time of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from model.config import load_config_with_overrides
from model.training import DiffusionModule


def _batch(batch: int, length: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    lengths = torch.linspace(length // 2, length, batch).round().long()  # [B]
    mask = (torch.arange(length)[None, :] < lengths[:, None]).float()  # [B, L]
    steps = torch.randn(batch, length, 3, generator=g)
    x0 = torch.cumsum(3.8 * steps / steps.norm(dim=-1, keepdim=True), dim=1) * mask[..., None]  # [B, L, 3]
    x0 = (x0 - x0.sum(1, keepdim=True) / lengths[:, None, None]) * mask[..., None]
    return {"x0": x0.to(device), "mask": mask.to(device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[], help="key=value config overrides")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=48)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = load_config_with_overrides(args.config, args.set)
    batch = _batch(args.batch, args.length, device)
    runs = {}
    for on in (False, True):
        torch.manual_seed(0)
        module = DiffusionModule(config.replace(selfConditioning=on)).to(device).train()
        runs[on] = (module, torch.optim.AdamW(module.parameters(), lr=1e-4), [])

    def step(on: bool) -> float:
        module, opt, _ = runs[on]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        module._loss(batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    for _ in range(3):  # warm-up
        step(False), step(True)
    for _ in range(args.steps):
        for on in (False, True):
            runs[on][2].append(step(on))
    off, on = (statistics.median(runs[k][2]) for k in (False, True))
    print(f"{config.name} mode={config.mode} pairFree={config.usePairFree} B={args.batch} L={args.length} "
          f"device={device} threads={torch.get_num_threads()}")
    print(f"step off {off * 1e3:.1f} ms, on {on * 1e3:.1f} ms, on / off {on / off:.2f}")


if __name__ == "__main__":
    main()
