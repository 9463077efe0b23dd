"""Peer: HF transformers Llama of a recipe's width/depth/vocab, bf16 + torch.compile.

Same step as `megacpp bench` (AdamW fused, bf16 autocast, random tokens,
median step time after warm-up). Run in the same call as `megacpp bench` so
both numbers come from one card.

    python benchmarks/hf_llama_peer.py --recipe dense-125m [--batch 16] [--steps 20] [--accum 1] [--layers N] [--json OUT]

--accum N: micro-batches forward and backward per optimizer step, as
`megacpp bench --accum N` (0 = the recipe's global batch / micro batch).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="dense-125m")
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                    help="torch.compile mode of the peer (reduce-overhead: CUDA graphs, as megacpp's \"auto\")")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (0 = the recipe's)")
    ap.add_argument("--layers", type=int, default=0,
                    help="Llama decoder layers (0: one per attention layer of the recipe, the matched peer)")
    ap.add_argument("--json")
    args = ap.parse_args()
    import megacpp
    from transformers import LlamaConfig, LlamaForCausalLM

    r = megacpp.load_recipe(args.recipe)
    m = r.model
    layers = r.layers.counts()
    depth = args.layers or layers["A"] + layers["D"] or m.depth  # one Llama block per attention layer
    cfg = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_size,
                      num_hidden_layers=depth, num_attention_heads=m.attention.num_heads,
                      num_key_value_heads=m.attention.num_kv_heads, max_position_embeddings=r.policy.seq_len,
                      rope_theta=m.attention.rope_theta, tie_word_embeddings=m.tie_embeddings,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).cuda()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = model if args.no_compile else torch.compile(
        model, **({} if args.compile_mode == "default" else {"mode": args.compile_mode}))
    B, T = args.batch or r.policy.micro_batch, r.policy.seq_len
    accum = args.accum or max(1, r.policy.global_batch // B)
    ids = torch.randint(0, m.vocab_size, (B, T), device="cuda")
    torch.cuda.reset_peak_memory_stats()

    def one_step():
        for _ in range(accum):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = fwd(input_ids=ids, labels=ids).loss
            (loss / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    from megacpp.train.gpu_clocks import ClockSampler, clocks_text
    for _ in range(args.warmup):
        one_step()
    times = []
    # the card's clocks while timed, as `megacpp bench` records them
    with ClockSampler(torch.device("cuda", torch.cuda.current_device())) as clocks:
        for _ in range(args.steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            one_step()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
    med = statistics.median(times)
    tps = accum * B * T / (med / 1e3)
    nonemb = params - m.vocab_size * m.hidden_size
    res = {"peer": "hf-llama", "recipe": args.recipe, "layers": depth, "params": params,
           "batch": B, "grad_accumulation": accum, "seq_len": T, "step_ms_median": med, "tokens_per_s": tps,
           "mfu_6n": tps * 6 * params / 989e12, "mfu_6n_nonemb": tps * 6 * nonemb / 989e12,
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
           "compiled": not args.no_compile, "compile_mode": None if args.no_compile else args.compile_mode, "device": torch.cuda.get_device_name(),
           "clocks": clocks.result}
    from megacpp.train.kernel_profile import profile_kernels, profile_text
    prof = profile_kernels(one_step, 2, torch.device("cuda"), top=25)
    res["step_profile"] = prof.to_dict()
    print(f"hf-llama peer of {args.recipe}: {depth} layers, {params / 1e6:.1f}M params, batch {B}x{T}: "
          f"{med:.1f} ms/step, {tps:,.0f} tokens/s, MFU(6N) {res['mfu_6n'] * 100:.1f}%, "
          f"peak {res['peak_memory_gib']:.1f} GiB")
    print("  " + clocks_text(clocks.result))
    print("\n".join(profile_text("hf-llama profiled step", prof)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
