"""Registers and spills of the causal conv's Triton kernels, compiled offline for a GPU target.

No GPU needed: `triton.compile` builds each kernel for --arch (sm_90 by
default) the way the JIT specialises it at run time (unit channel strides
as constants; pointers and the other strides divisible by 16), and
`cuobjdump -res-usage` (shipped with Triton) reads the registers and the
stack (spills) per thread. A prediction for the launch sweep
(benchmarks/conv_tune.py), not a timing.

    python benchmarks/conv_registers.py [--arch 90] [--launch dpre:64:16:128:4 ...]

A launch is KERNEL:BT:RT:BC:WARPS (RT is dpre's rows per inner step; use
BT for the others).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from megacpp.ops.causal_conv import triton_conv as T

DEFAULT_LAUNCHES = ["dpre:64:64:128:4", "dpre:64:16:128:4", "dpre:128:16:128:4", "dpre:256:16:128:4",
                    "fwd:64:64:128:4", "dx:64:64:128:4"]


def _ints(names: str) -> dict:
    return {n: "i32" for n in names.split()}


def _consts(names: str) -> dict:
    return {n: "constexpr" for n in names.split()}


# kernel -> (function, signature with bf16 activations and float32 weights, its unit strides)
KERNELS = {
    "fwd": (T._conv_fwd_kernel,
            {"x_ptr": "*bf16", "w_ptr": "*fp32", "bias_ptr": "*fp32", "doc_ptr": "*i32", "y_ptr": "*bf16",
             "L": "i32", "CH": "i32", **_ints("s_xb s_xl s_xc s_db s_dl s_yb s_yl s_yc"),
             **_consts("K HAS_BIAS HAS_DOC SILU BT BC")}, ("s_xc", "s_yc", "s_dl")),
    "dpre": (T._conv_dpre_kernel,
             {"x_ptr": "*bf16", "w_ptr": "*fp32", "bias_ptr": "*fp32", "doc_ptr": "*i32", "dy_ptr": "*bf16",
              "g_ptr": "*bf16", "dw_ptr": "*fp32", "db_ptr": "*fp32", "L": "i32", "CH": "i32",
              **_ints("s_xb s_xl s_xc s_db s_dl s_gb s_gl s_gc"),
              **_consts("K KP HAS_BIAS HAS_DOC SILU BT BC RT")}, ("s_xc", "s_gc", "s_dl")),
    "dx": (T._conv_dx_kernel,
           {"g_ptr": "*bf16", "w_ptr": "*fp32", "doc_ptr": "*i32", "dx_ptr": "*bf16", "L": "i32", "CH": "i32",
            **_ints("s_gb s_gl s_gc s_db s_dl s_ob s_ol s_oc"), **_consts("K HAS_DOC BT BC")},
           ("s_gc", "s_oc", "s_dl")),
}


def resources(kernel: str, bt: int, rt: int, bc: int, warps: int, arch: int = 90, k: int = 4,
              stages: int = 3) -> dict:
    """{"registers", "stack"} per thread of one launch (packed rows, bias, SiLU)."""
    fn, sig, unit = KERNELS[kernel]
    consts = {"K": k, "HAS_DOC": True, "BT": bt, "BC": bc, **{s: 1 for s in unit}}
    if kernel != "dx":
        consts.update(HAS_BIAS=True, SILU=True)
    if kernel == "dpre":
        consts.update(KP=triton.next_power_of_2(k), RT=rt)
    names = list(sig)
    sig = {n: ("constexpr" if n in consts else t) for n, t in sig.items()}
    div = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
           if sig[n].startswith("*") or (sig[n] == "i32" and n not in ("L", "CH"))}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in consts.items()}, attrs=div)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if m is None:
        raise RuntimeError(f"conv_registers: no REG/STACK line in cuobjdump's output:\n{out}")
    return {"registers": int(m.group(1)), "stack": int(m.group(2))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--launch", nargs="+", default=DEFAULT_LAUNCHES, help="KERNEL:BT:RT:BC:WARPS")
    args = ap.parse_args(argv)
    print(f"{'kernel':6} {'BT':>4} {'RT':>4} {'BC':>4} {'warps':>5} {'registers':>9} {'stack B':>7}")
    for spec in args.launch:
        kernel, *nums = spec.split(":")
        bt, rt, bc, warps = (int(v) for v in nums)
        r = resources(kernel, bt, rt, bc, warps, args.arch)
        print(f"{kernel:6} {bt:>4} {rt:>4} {bc:>4} {warps:>5} {r['registers']:>9} {r['stack']:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
