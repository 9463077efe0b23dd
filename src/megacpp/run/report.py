"""`megacpp report RUN_DIR`: PNG plots of the losses and throughput, and a summary."""
from __future__ import annotations

from pathlib import Path

from ..train.metrics import read_metrics
from .manifest import read_manifest


def make_report(run_dir, out_dir=None) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    m = read_manifest(run_dir)
    recs = read_metrics(run_dir)
    train = [r for r in recs if r.get("kind") == "train"]
    val = [r for r in recs if r.get("kind") == "val"]
    files = {}

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax[0].plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, label="train LM loss")
    if val:
        ax[0].plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="val loss")
        ax[1].plot([r["step"] for r in val], [r["bpb"] for r in val], "o-", color="C2")
    ax[0].set_xlabel("step"); ax[0].set_ylabel("nats / token"); ax[0].legend(); ax[0].grid(alpha=0.3)
    ax[1].set_xlabel("step"); ax[1].set_ylabel("val bits per byte"); ax[1].grid(alpha=0.3)
    fig.suptitle(f"{m['spec']['recipe_name']} ({m['spec']['recipe_hash'][:12]})")
    fig.tight_layout()
    files["loss"] = str(out / "loss.png")
    fig.savefig(files["loss"], dpi=110)
    plt.close(fig)

    aux_keys = [k for k in ("stp", "moe_balance", "moe_z", "mtp", "dsa_indexer") if any(k in r for r in train)]
    if aux_keys:
        fig, axes = plt.subplots(1, len(aux_keys), figsize=(4 * len(aux_keys), 3.5), squeeze=False)
        for a, k in zip(axes[0], aux_keys):
            pts = [(r["step"], r[k]) for r in train if k in r]
            a.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.8)
            a.set_title(k); a.set_xlabel("step"); a.grid(alpha=0.3)
        fig.tight_layout()
        files["aux"] = str(out / "aux_losses.png")
        fig.savefig(files["aux"], dpi=110)
        plt.close(fig)

    if train:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in train], [r.get("tokens_per_s", 0) for r in train], lw=0.8)
        ax.set_xlabel("step"); ax.set_ylabel("tokens / s"); ax.grid(alpha=0.3)
        fig.tight_layout()
        files["throughput"] = str(out / "throughput.png")
        fig.savefig(files["throughput"], dpi=110)
        plt.close(fig)

    o = m["outcome"]
    b = m["backend"]
    toks = sorted(r.get("tokens_per_s", 0) for r in train)
    lines = [f"# Run report: {m['spec']['recipe_name']}", "",
             f"- recipe hash `{m['spec']['recipe_hash']}`, pattern `{m['pattern']['resolved']}`",
             f"- parameters {m['pattern']['total_params']:,} total, {m['pattern']['active_params']:,} active",
             f"- device {b.get('name')} ({b.get('device')}), torch {b.get('torch')}, precision "
             f"{b['precision']['compute']}, compile {b['compile'].get('mode')}",
             f"- data snapshot `{b['data']['snapshot_id'][:16]}`",
             f"- patches: " + (", ".join(f"{p['name']}={p['backend'] if p['installed'] else 'off'}"
                                         for p in m["patches"]) or "none"),
             f"- aux losses: " + ", ".join(f"{k} (start {v['start_step']}, first active "
                                            f"{v['first_active_step']})" for k, v in m["aux_losses"].items()
                                            if v.get("enabled")),
             f"- steps {o['steps']}, tokens {o['tokens']:,}, wall {o['wall_seconds']} s, end: {o['end_reason']}",
             f"- val bpb {o.get('first_val_bpb')} -> {o.get('final_val_bpb')}; final val loss {o.get('final_val_loss')}",
             f"- median tokens/s {toks[len(toks) // 2]:.0f}" if toks else "- no train steps",
             ""] + [f"![{k}]({Path(v).name})" for k, v in files.items()]
    files["summary"] = str(out / "summary.md")
    Path(files["summary"]).write_text("\n".join(lines) + "\n")
    return files
