"""Registers and spills of this project's Triton kernels, compiled offline for a GPU target.

No GPU needed. A child process runs one op forward and backward on CPU
under Triton's interpreter (fp16, the layer shapes of --preset) and records
every kernel launch: the kernel, its argument types, its constexprs and
its warps/stages, with the launch table a GPU would use (TUNED and LAUNCH,
which the interpreter otherwise skips). This process then compiles each
distinct launch for --arch (sm_90 by default) as the JIT specialises it
(integer arguments equal to 1 as constants; pointers and integers that are
multiples of 16 marked divisible by 16) and reads the registers and the
stack (spills) per thread with `cuobjdump -res-usage`, shipped with Triton.

A prediction for the launch sweeps (benchmarks/ssd_tune.py, conv_tune.py),
not a timing: a kernel at 255 registers with stack spills to local memory.

    python benchmarks/triton_registers.py [--ops ssd delta conv] [--arch 90] [--json OUT]
    python benchmarks/triton_registers.py --ops conv --set dpre:RT=16 --set path:bwd=tiles

--set KERNEL:KEY=VALUE overrides one launch-table entry (the module's LAUNCH)
for the recorded run. The operands run in fp16 (the interpreter cannot
multiply bf16, triton-lang/triton#11584); bf16 kernels are the same code
with the other 16-bit type.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

MODULES = {"ssd": "megacpp.ops.ssd.triton_ssd", "delta": "megacpp.ops.delta_rule.triton_delta_rule",
           "conv": "megacpp.ops.causal_conv.triton_conv", "gnorm": "megacpp.ops.gated_norm.triton_gated_norm",
           "swiglu": "megacpp.ops.swiglu.triton_swiglu"}
# per op: the shapes of nam-1b's layers (hidden 2048), at 2 chunks / 256 steps
# and few heads or channels: registers depend on the constexprs, not the sizes
SHAPES = {"ssd": {"b": 1, "l": 256, "h": 2, "p": 64, "g": 1, "n": 128, "chunk": 128},
          "delta": {"b": 1, "l": 128, "h": 2, "dk": 128, "dv": 128, "chunk": 64},
          "conv": {"b": 1, "l": 256, "c": 256, "k": 4},
          # nam-1b's Mamba-2 output norm (one group of 4096) and its R layers' (per head of 128)
          "gnorm": {"rows": 8, "d": 4096, "heads": 16, "dv": 128},
          # nam-1b's experts (f 1408) and a power-of-two FFN width
          "swiglu": {"rows": 8, "widths": (1408, 2048)}}
_TORCH_TO_TRITON = {"torch.float64": "fp64", "torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16",
                    "torch.int32": "i32", "torch.int64": "i64", "torch.bool": "i1", "torch.uint8": "u8"}


# ------------------------------------------------------------------ child: record the launches

def _encode(v):
    import torch
    import triton.language as tl
    if isinstance(v, torch.Tensor):
        return {"ptr": _TORCH_TO_TRITON[str(v.dtype)]}
    if isinstance(v, tl.dtype):
        return {"dtype": str(v)}
    if isinstance(v, bool) or v is None or isinstance(v, (int, float, str)):
        return {"value": v}
    raise TypeError(f"triton_registers: cannot record an argument of type {type(v).__name__}")


def _run_op(op: str, gen) -> None:
    import torch
    s = SHAPES[op]
    f16 = torch.float16
    if op == "ssd":
        from megacpp.ops.ssd.triton_ssd import ssd_triton
        x = torch.randn(s["b"], s["l"], s["h"], s["p"], generator=gen).to(f16).requires_grad_()
        dt = (torch.rand(s["b"], s["l"], s["h"], generator=gen) * 0.1).to(f16).requires_grad_()
        A = (-torch.rand(s["h"], generator=gen)).requires_grad_()
        B = torch.randn(s["b"], s["l"], s["g"], s["n"], generator=gen).to(f16).requires_grad_()
        C = torch.randn(s["b"], s["l"], s["g"], s["n"], generator=gen).to(f16).requires_grad_()
        D = torch.randn(s["h"], generator=gen).requires_grad_()
        y, final = ssd_triton(x, dt, A, B, C, s["chunk"], D=D)
        (y.float().sum() + final.float().sum()).backward()
    elif op == "delta":
        from megacpp.ops.delta_rule.triton_delta_rule import gated_delta_rule_triton
        q = torch.randn(s["b"], s["l"], s["h"], s["dk"], generator=gen)
        k = torch.nn.functional.normalize(torch.randn(s["b"], s["l"], s["h"], s["dk"], generator=gen), dim=-1)
        q, k = q.to(f16).requires_grad_(), k.to(f16).requires_grad_()
        v = torch.randn(s["b"], s["l"], s["h"], s["dv"], generator=gen).to(f16).requires_grad_()
        g = (-torch.rand(s["b"], s["l"], s["h"], generator=gen) * 0.1).requires_grad_()
        beta = torch.rand(s["b"], s["l"], s["h"], generator=gen).requires_grad_()
        o, final = gated_delta_rule_triton(q, k, v, g, beta, chunk_size=s["chunk"])
        (o.float().sum() + final.float().sum()).backward()
    elif op == "gnorm":
        from megacpp.ops.gated_norm.triton_gated_norm import gated_rms_norm_triton
        for shape, group, nbg in (((s["rows"], s["d"]), None, False), ((s["rows"], s["heads"], s["dv"]), None, True)):
            x = torch.randn(*shape, generator=gen).to(f16).requires_grad_()
            z = torch.randn(*shape, generator=gen).to(f16).requires_grad_()
            w = torch.randn(shape[-1], generator=gen).requires_grad_()
            gated_rms_norm_triton(x, z, w, 1e-5, group, nbg).float().sum().backward()
    elif op == "swiglu":
        from megacpp.ops.swiglu.triton_swiglu import swiglu_triton
        for f in s["widths"]:
            h = torch.randn(s["rows"], 2 * f, generator=gen).to(f16).requires_grad_()
            swiglu_triton(h).float().sum().backward()
    else:
        from megacpp.ops.causal_conv.triton_conv import causal_conv1d_triton
        x = torch.randn(s["b"], s["l"], s["c"], generator=gen).to(f16).requires_grad_()
        w = torch.randn(s["c"], 1, s["k"], generator=gen).requires_grad_()
        bias = torch.randn(s["c"], generator=gen).requires_grad_()
        doc = (torch.arange(s["l"]) // 100).int().expand(s["b"], -1).contiguous()
        causal_conv1d_triton(x, w, bias, doc, "silu").float().sum().backward()


def record(op: str, sets: list[str]) -> list[dict]:
    """(child, TRITON_INTERPRET=1) every launch of op's forward and backward."""
    import torch
    import triton.runtime.interpreter as interp

    mod = importlib.import_module(MODULES[op])
    util = importlib.import_module("megacpp.ops._triton_util")
    # the launch tables a GPU would use (the interpreter otherwise takes the defaults alone)
    for m in (mod, util):
        if hasattr(m, "INTERPRET"):
            m.INTERPRET = False
    for s in sets:
        kernel, kv = s.split(":", 1)
        key, value = kv.split("=", 1)
        if kernel == "path":  # the conv's kernel path: path:fwd=tiles, path:bwd=walk
            mod.PATH[key] = value
        else:
            mod.LAUNCH[kernel] = {**mod.LAUNCH[kernel], key: int(value)}
    launches = []
    original = interp.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        launches.append({"kernel": self.fn.__name__, "args": [_encode(a) for a in args],
                         "kwargs": {k: _encode(v) for k, v in kwargs.items()}})
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    interp.InterpretedFunction.run = run
    try:
        _run_op(op, torch.Generator().manual_seed(0))
    finally:
        interp.InterpretedFunction.run = original
    return launches


# ------------------------------------------------------------------ parent: compile and read

def _spec(launch: dict, fn) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) of one recorded launch, as the JIT specialises it."""
    import triton.language as tl
    names = [p.name for p in fn.params]
    given = dict(zip(names, launch["args"]))
    options = {}
    for k, v in launch["kwargs"].items():
        if k in ("num_warps", "num_stages"):
            options[k] = v["value"]
        else:
            given[k] = v
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = given.get(p.name)
        if v is None:
            raise ValueError(f"triton_registers: {fn.__name__}'s {p.name} was not recorded")
        if "dtype" in v:
            sig[p.name], consts[(i,)] = "constexpr", tl.dtype(v["dtype"])
        elif "ptr" in v:
            sig[p.name] = "*" + v["ptr"]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif p.is_constexpr or v["value"] is None or isinstance(v["value"], (bool, str)):
            sig[p.name], consts[(i,)] = "constexpr", v["value"]
        elif isinstance(v["value"], float):
            sig[p.name] = "fp32"
        elif v["value"] == 1:  # the JIT turns integer arguments equal to 1 into constants
            sig[p.name], consts[(i,)] = "constexpr", 1
        else:
            sig[p.name] = "i32" if -2**31 <= v["value"] < 2**31 else "i64"
            if v["value"] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs, options


def resources(op: str, launch: dict, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(MODULES[op]), launch["kernel"])
    sig, consts, attrs, options = _spec(launch, fn)
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if m is None:
        raise RuntimeError(f"triton_registers: no REG/STACK line in cuobjdump's output:\n{out}")
    blocks = {k: v["value"] for k, v in launch["kwargs"].items() if "value" in v and k.isupper() and
              isinstance(v["value"], int) and not isinstance(v["value"], bool)}
    return {"op": op, "kernel": launch["kernel"], "registers": int(m.group(1)), "stack": int(m.group(2)),
            "warps": options.get("num_warps", 4), "stages": options.get("num_stages", 3), "blocks": blocks}


def survey(ops: list[str], arch: int = 90, sets: tuple[str, ...] = ()) -> list[dict]:
    """Registers and stack of every distinct launch of `ops` (child processes record them)."""
    rows = []
    root = Path(__file__).resolve().parents[1]
    for op in ops:
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
            [str(root / "src"), os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, __file__, "--record", op] + [a for s in sets for a in ("--set", s)]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"triton_registers: recording {op} failed:\n{p.stderr[-4000:]}")
        seen = set()
        for launch in json.loads(p.stdout):
            key = json.dumps(launch, sort_keys=True)
            if key not in seen:
                seen.add(key)
                rows.append(resources(op, launch, arch))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ops", nargs="+", default=list(MODULES), choices=list(MODULES))
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--set", action="append", default=[], metavar="KERNEL:KEY=VALUE")
    ap.add_argument("--json")
    ap.add_argument("--record", choices=list(MODULES), help=argparse.SUPPRESS)  # the child's mode
    args = ap.parse_args(argv)
    if args.record:
        print(json.dumps(record(args.record, args.set)))
        return 0
    rows = survey(args.ops, args.arch, tuple(args.set))
    print(f"sm_{args.arch}, fp16 operands, launch tables as on a GPU\n")
    print(f"{'op':6} {'kernel':22} {'warps':>5} {'stages':>6} {'registers':>9} {'stack B':>7}  blocks")
    for r in rows:
        blocks = " ".join(f"{k}={v}" for k, v in sorted(r["blocks"].items()))
        flag = "  <- spills" if r["stack"] else ""
        print(f"{r['op']:6} {r['kernel']:22} {r['warps']:>5} {r['stages']:>6} {r['registers']:>9} "
              f"{r['stack']:>7}  {blocks}{flag}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
