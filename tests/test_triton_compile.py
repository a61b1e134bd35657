"""Every Triton kernel that a training step and a sampling step launch compiles for Hopper (sm90) on the
CPU: Triton's front end and its GPU-dialect passes run without a GPU. Triton's interpreter (the other
CPU tests) runs the kernels' Python and so accepts code that the compiler refuses (for example a
helper returning a tensor on one constexpr branch and a float on the other); this test catches that
before a GPU machine does. It records the launches of the fused mHC ops (forward, backward, sampling)
instead of running them, then compiles each distinct (kernel, constexprs) to TTGIR."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

DTYPES = {"float32": "*fp32", "float64": "*fp64", "bfloat16": "*bf16", "float16": "*fp16",
          "int32": "*i32", "int64": "*i64"}


def record_launches() -> list:
    """(JITFunction, args, kwargs) of every kernel launch of the fused mHC ops, none of them run."""
    import torch
    from triton.runtime.jit import JITFunction

    calls = []
    JITFunction.__getitem__ = lambda self, grid: (lambda *args, **kw: calls.append((self, args, kw)))
    from model.mhc.kernels import mix, pre

    b, length, n, c = 2, 5, 4, 32
    for cap, dtype in ((0.0, torch.float32), (5.0, torch.float32), (5.0, torch.bfloat16)):
        s = torch.randn(b, length, n, c, dtype=dtype, requires_grad=True)
        phi = torch.randn(n * c, 2 * n + n * n, requires_grad=True)
        params = [torch.tensor(0.1, requires_grad=True) for _ in range(3)]
        params += [torch.zeros(n, requires_grad=True), torch.zeros(n, requires_grad=True),
                   torch.zeros(n, n, requires_grad=True)]
        x, h_post, pending = pre.fused_pre(s, phi, *params, 20, res_logit_cap=cap)  # training
        y = torch.randn(b, length, c, dtype=dtype, requires_grad=True)
        out, mean = mix.mix_out(pending.wait(), h_post, s, y, with_mean=True)
        (out.float().sum() + mean.float().sum() + x.float().sum()).backward()
        with torch.no_grad():  # sampling
            _, h_post, pending = pre.fused_pre(s.detach(), phi.detach(), *[p.detach() for p in params], 20,
                                               res_logit_cap=cap)
            mix.mix_out(pending.wait(), h_post, s.detach(), y.detach())
    return calls


def compile_all(arch: int = 90) -> None:
    import torch
    import triton
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    done, names = set(), set()
    for jf, args, kw in record_launches():
        launch = {k: v for k, v in kw.items() if k in ("num_warps", "num_stages")}
        const = {k: v for k, v in kw.items() if k not in launch}
        sig = {}
        for name, a in zip([a for a in jf.arg_names if a not in const], args, strict=True):
            if isinstance(a, torch.Tensor):
                sig[name] = DTYPES[str(a.dtype).removeprefix("torch.")]
            else:
                sig[name] = {bool: "i1", int: "i32", float: "fp32"}[type(a)]
        key = (jf.fn.__name__, tuple(sorted(const.items())), tuple(sorted(sig.items())))
        if key in done:
            continue
        done.add(key)
        names.add(jf.fn.__name__)
        src = triton.compiler.ASTSource(fn=jf, signature={a: sig.get(a, "constexpr") for a in jf.arg_names},
                                        constexprs={(jf.arg_names.index(k),): v for k, v in const.items()})
        opts = backend.parse_options(launch)
        ctx = ir.context()
        ir.load_dialects(ctx)
        backend.load_dialects(ctx)
        mod = src.make_ir(target, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), ctx)
        stages: dict = {}
        backend.add_stages(stages, opts, src.language)
        meta: dict = {}
        stages["ttgir"](stages["ttir"](mod, meta), meta)
    expected = {"pre_forward_kernel", "pre_backward_kernel", "forward_kernel", "backward_kernel",
                "mix_out_kernel", "mix_out_backward_kernel"}
    assert names == expected, names
    print(f"compiled {len(done)} kernel variants")


def test_every_fused_kernel_compiles_for_hopper():
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root / "tests"), str(root), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", "import test_triton_compile as t; t.compile_all(90)"], env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0 and "compiled" in res.stdout, (res.stdout[-2000:], res.stderr[-4000:])
