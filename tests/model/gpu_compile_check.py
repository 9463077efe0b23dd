"""Manual check, not collected by pytest: every block family under torch.compile
(inductor) on CUDA, float32 and bf16 autocast, forward + backward against
float32 eager. Max errors include discrete effects (MoE / DSA top-k choices
that flip under bf16); the mean error is the one to read.

    PYTHONPATH=src:tests/model python3 tests/model/gpu_compile_check.py
"""
from __future__ import annotations

import sys
import time

import torch

import megacpp
from model_testutil import make_spec


def main() -> int:
    torch.manual_seed(0)
    spec = make_spec("ADMREF", hidden_size=128, init_std=0.02, mamba={"version": 3, "chunk_size": 64},
                     recurrent={"num_heads": 4, "key_dim": 32, "value_dim": 32, "chunk_size": 64},
                     moe={"expert_ffn": 128, "num_experts": 8, "score": "sigmoid", "bias_balancing": True},
                     attention={"kind": "mla", "num_heads": 4, "index_topk": 64, "kv_lora_rank": 32,
                                "qk_head_dim": 32, "qk_rope_dim": 16, "v_head_dim": 32})
    failures = 0
    letters = sys.argv[1] if len(sys.argv) > 1 else "ADMREF"
    ids = torch.randint(0, spec.vocab_size, (4, 512), device="cuda")
    doc = (torch.arange(512, device="cuda") >= 200).long().expand(4, 512)

    def run(m, dtype):
        m.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            h = m(ids, doc_ids=doc, return_hidden_only=True).hidden
        h.float().square().mean().backward()
        torch.cuda.synchronize()
        return h.float().detach(), [p.grad for p in m.parameters()], time.perf_counter() - t0

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()

    def mean_rel(a, b):
        return ((a - b).abs().mean() / b.abs().mean().clamp_min(1e-12)).item()

    for letter in letters:
        with torch.device("cuda"):
            eager = megacpp.build_model(spec)
            comp = megacpp.build_model(spec)
        comp.load_state_dict(eager.state_dict())
        for layer in comp.layers:
            if layer.letter == letter:
                layer.compile()
        try:
            ref, gref, _ = run(eager, torch.float32)
            for dtype in (torch.float32, torch.bfloat16):
                he, ge, te = run(eager, dtype)
                hc, gc, tc = run(comp, dtype)
                gerr = max(rel(b, a) for a, b in zip(gref, gc) if a is not None)
                print(f"{letter} {str(dtype)[6:]}: hidden vs fp32 eager (max, mean rel): "
                      f"eager {rel(he, ref):.1e}, {mean_rel(he, ref):.1e}; "
                      f"compiled {rel(hc, ref):.1e}, {mean_rel(hc, ref):.1e}; compiled vs eager "
                      f"{mean_rel(hc, he):.1e}; worst param grad {gerr:.1e}; "
                      f"eager {te:.2f}s, compile+run {tc:.2f}s")
        except Exception as exc:  # report and go on to the next family
            failures += 1
            print(f"{letter}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
