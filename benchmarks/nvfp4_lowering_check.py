"""Where inductor's lowering of the emulated NVFP4 linear departs from eager (issue 10).

The CUDA test (tests/precision/test_nvfp4_compiled.py) found the compiled
linear's input gradient all zero on an H200 while its output matched. This
runs the same linear eagerly, through AOTAutograd without inductor
(aot_eager) and through inductor, and prints, for y, dx and dw, the relative
error against eager and the fraction of exact zeros; with
TORCH_LOGS=output_code in the environment, inductor's generated kernels go
to stderr.

    TORCH_LOGS=output_code python benchmarks/nvfp4_lowering_check.py --json out.json 2> code.log
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from megacpp.train.lowp.nvfp4 import nvfp4_linear, nvfp4_quantize  # noqa: E402


def run(fn, x, w, device):
    xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = fn(xi, wi)
    gy = torch.randn(y.shape, generator=torch.Generator(device="cpu").manual_seed(1)).to(device)
    (y.float() * gy).sum().backward()
    return {"y": y.float(), "dx": xi.grad.float(), "dw": wi.grad.float()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    dev = args.device
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(2, 256, 768, generator=g) * (1 + 20 * (torch.rand(768, generator=g) < 0.01))).to(dev)
    w = (torch.randn(384, 768, generator=g) * 0.02).to(dev)
    ref = run(nvfp4_linear, x, w, dev)
    rows = {}
    for name, fn in (("aot_eager", torch.compile(nvfp4_linear, backend="aot_eager", dynamic=False)),
                     ("inductor", torch.compile(nvfp4_linear, dynamic=False))):
        torch._dynamo.reset()
        out = run(fn, x, w, dev)
        rows[name] = {k: {"rel_err": float((out[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30)),
                          "zero_frac": float((out[k] == 0).float().mean()),
                          "ref_zero_frac": float((ref[k] == 0).float().mean())} for k in ref}
    # the quantizer alone, compiled, on the weight-shaped input (the test checked x)
    torch._dynamo.reset()
    qc = torch.compile(lambda t: (lambda q: (q.q, q.scale.float(), q.global_scale))(nvfp4_quantize(t)),
                       dynamic=False)(w)
    qe = nvfp4_quantize(w)
    rows["quantize_w"] = {"q_equal_frac": float((qc[0] == qe.q).float().mean()),
                          "scale_equal_frac": float((qc[1] == qe.scale.float()).float().mean()),
                          "global_equal": bool(torch.equal(qc[2], qe.global_scale))}
    info = {"device": torch.cuda.get_device_name() if dev == "cuda" else dev,
            "torch": torch.__version__, "rows": rows}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    print(json.dumps(info, indent=1))
    if args.json:
        args.json.write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
