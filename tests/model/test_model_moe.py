"""MoE: the grouped expert path equals the per-expert loop, forward and gradients."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megacpp.model.moe import (MoE, capacity, gather_slots, grouped_mm, grouped_mm_available, inverse_permutation,
                               sort_keys, split_offsets, top_rows,
                               moe_reference, permute_rows)

from model_testutil import make_spec

CONFIGS = {
    "softmax-top2": {},
    "softmax-top1": {"top_k": 1},
    "sigmoid-bias": {"score": "sigmoid", "bias_balancing": True},
    "null-experts": {"null_experts": 2, "top_k": 3},
    "capacity": {"capacity_factor": 0.5},
    "capacity-sigmoid-null": {"capacity_factor": 0.5, "score": "sigmoid", "null_experts": 1,
                              "bias_balancing": True, "top_k": 3},
    "expert-choice": {"routing": "expert_choice", "capacity_factor": 1.0},
    "expert-choice-sigmoid-null": {"routing": "expert_choice", "capacity_factor": 0.5, "score": "sigmoid",
                                   "null_experts": 2},
    "gelu-no-shared": {"shared_ffn": 0, "top_k": 2},
}
IMPLS = ["bmm", "grouped_mm"]


def make_moe(cfg: dict, activation: str = "swiglu") -> MoE:
    spec = make_spec("E", moe=cfg, activation=activation)
    moe = MoE(spec)
    moe.init_weights(0.2, 0.1)
    if moe.expert_bias is not None:
        with torch.no_grad():
            moe.expert_bias.normal_(0.0, 0.1)
    return moe


def _matches_reference(moe, x0, y_atol=2e-5, y_rtol=1e-5):
    """The layer's output and every gradient (input and parameters) against
    moe_reference's, the per-expert loop; returns the gradients."""
    params = list(moe.parameters())
    x1, x2 = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
    y, _, _ = moe(x1)
    y_ref = moe_reference(moe, x2)
    torch.testing.assert_close(y, y_ref, atol=y_atol, rtol=y_rtol)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x1] + params, g, allow_unused=True)
    grads_ref = torch.autograd.grad(y_ref, [x2] + params, g, allow_unused=True)
    for (n, _), a, b in zip([("x", None)] + list(moe.named_parameters()), grads, grads_ref):
        assert (a is None) == (b is None), n
        if a is not None:
            torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")
    return grads


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_gates_in_the_activation_equal_reference(name, impl, seed):
    """policy.kernels.moe_gate = "activation": each expert row's activation is
    scaled by its gate before the second GEMM instead of the output after it.
    The same function: output and every gradient (the router's through the
    gates) against the per-expert loop, in every routing mode, both paths."""
    from megacpp.train.activation import apply_moe_gate
    x0 = torch.randn(3, 21, 32)
    if impl == "grouped_mm" and not grouped_mm_available(x0.device, x0.dtype, 32, 32, 16):
        pytest.skip("torch._grouped_mm not available here")
    moe = make_moe(CONFIGS[name], activation="gelu" if name.startswith("gelu") else "swiglu")
    moe.impl = impl
    wrapper = torch.nn.Sequential(moe)
    assert apply_moe_gate(wrapper, "activation") == 1 and moe.gate_in_activation
    grads = _matches_reference(moe, x0)
    assert grads[1 + [n for n, _ in moe.named_parameters()].index("router.weight")].abs().sum() > 0
    assert apply_moe_gate(wrapper, "combine") == 0 and not moe.gate_in_activation
    with pytest.raises(ValueError, match="'combine' or 'activation'"):
        apply_moe_gate(wrapper, "before")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_grouped_equals_reference(name, impl, seed):
    x0 = torch.randn(3, 21, 32)
    if impl == "grouped_mm" and not grouped_mm_available(x0.device, x0.dtype, 32, 32, 16):
        pytest.skip("torch._grouped_mm not available here")
    moe = make_moe(CONFIGS[name], activation="gelu" if name.startswith("gelu") else "swiglu")
    moe.impl = impl
    grads = _matches_reference(moe, x0)
    # the router learns through the gates
    assert grads[1 + [n for n, _ in moe.named_parameters()].index("router.weight")].abs().sum() > 0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_router_stats(name, seed):
    cfg = CONFIGS[name]
    moe = make_moe(cfg)
    x = torch.randn(2, 17, 32)
    y, st, _ = moe(x)
    T, E, R = 34, moe.num_experts, moe.rows
    assert st.logits.shape == (T, R) and st.scores.shape == (T, R) and st.probs.shape == (T, R)
    torch.testing.assert_close(st.probs.sum(-1), torch.ones(T))
    torch.testing.assert_close(st.mean_probs, st.probs.mean(0))
    assert st.num_tokens == T and st.num_experts == E
    assert st.logits.requires_grad and st.probs.requires_grad
    assert torch.all(st.kept[E:] == 0)
    # the aux terms the layer computes in its forward, by their definitions
    f = st.load[:E] / st.load.sum()
    torch.testing.assert_close(st.balance, E * (f * st.mean_probs[:E]).sum())
    torch.testing.assert_close(st.z_sq, (torch.logsumexp(st.logits, -1) ** 2).mean())
    assert st.balance.shape == () and st.balance.requires_grad and st.z_sq.requires_grad
    g_b, = torch.autograd.grad(st.balance, st.mean_probs, retain_graph=True)
    g_z, = torch.autograd.grad(st.z_sq, st.logits, retain_graph=True)
    torch.testing.assert_close(g_b[:E], E * f)                         # load is a constant
    torch.testing.assert_close(g_z, 2 * torch.logsumexp(st.logits, -1, keepdim=True)
                               * torch.softmax(st.logits, -1) / T)
    if moe.routing == "expert_choice":
        C = min(T, capacity(T, moe.top_k, E, moe.capacity_factor))
        assert st.topk_idx.shape == (T, 0)
        assert torch.all(st.kept[:E] == C)
        return
    k = moe.top_k
    assert st.topk_idx.shape == (T, k)
    assert st.load.sum() == T * k
    torch.testing.assert_close(st.load, torch.bincount(st.topk_idx.reshape(-1), minlength=R).float())
    assert st.kept[:E].sum() + st.dropped == st.load[:E].sum()
    if moe.capacity_factor > 0:
        C = capacity(T, k, E, moe.capacity_factor)
        assert torch.all(st.kept[:E] <= C)
        assert st.dropped > 0
    else:
        assert st.dropped == 0


def test_bias_moves_selection_not_gates(seed):
    moe = make_moe({"score": "sigmoid", "bias_balancing": True, "top_k": 2})
    with torch.no_grad():
        moe.expert_bias.zero_()
        moe.expert_bias[1] = 100.0
    x = torch.randn(40, 32)
    _, scores = moe.router_scores(x)
    rows, gates = moe.select_topk(scores)
    assert torch.all((rows == 1).any(-1))  # every token now picks expert 1
    picked = torch.gather(scores, -1, rows)
    torch.testing.assert_close(gates, picked / picked.sum(-1, keepdim=True))  # gates ignore the bias


def test_update_bias_balances(seed):
    moe = make_moe({"score": "sigmoid", "bias_balancing": True, "null_experts": 1})
    with torch.no_grad():
        moe.expert_bias.zero_()
    load = torch.tensor([10.0, 2.0, 2.0, 2.0, 7.0])  # last row: a null expert
    moe.update_bias(load, 0.01)
    torch.testing.assert_close(moe.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01, 0.0]))


def test_all_null_routes_give_shared_only(seed):
    moe = make_moe({"score": "sigmoid", "bias_balancing": True, "null_experts": 2, "top_k": 2})
    with torch.no_grad():
        moe.expert_bias.zero_()
        moe.expert_bias[moe.num_experts:] = 100.0
    x = torch.randn(2, 9, 32)
    y, st, _ = moe(x)
    torch.testing.assert_close(y, moe.shared(x)[0])
    assert st.kept.sum() == 0 and st.load[moe.num_experts:].sum() == 18 * 2


def test_empty_experts_and_autocast(seed):
    """Experts that get no token, and a bf16 autocast forward, both work."""
    moe = make_moe({"top_k": 1})
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 5.0  # everyone prefers expert 0... unless x . w < 0
    x = torch.randn(2, 8, 32).abs()
    y, st, _ = moe(x)
    assert st.kept[1:].sum() == 0
    torch.testing.assert_close(y, moe_reference(moe, x), atol=2e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb, _, _ = moe(x)
    assert torch.isfinite(yb).all()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gather_slots_equals_plain_gather(k, seed):
    """The permutation gather with its gather-and-sum backward equals x[order // k]
    (whose backward accumulates), forward and gradient, on a random permutation."""
    T, d = 37, 24
    x = torch.randn(T, d, dtype=torch.float64)
    order = torch.randperm(T * k)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = gather_slots(a, order, k), b[order // k]
    assert torch.equal(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="T\\*k"):
        gather_slots(x, order[:-1], k)


def test_dropless_moe_gathers_through_the_permutation(seed, monkeypatch):
    """Dropless token choice takes gather_slots, and its backward has no
    accumulating index_put; the model-level parity above checks the result."""
    import megacpp.model.moe as moe_mod

    moe = make_moe({})
    assert moe._dropless()
    seen = []
    monkeypatch.setattr(moe_mod, "gather_slots", lambda *a: seen.append(a[2]) or gather_slots(*a))
    x = torch.randn(2, 9, 32, requires_grad=True)
    y = moe(x)[0]
    assert seen == [moe.top_k]
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # the gather's own backward: a gather and a sum, no index_put (accumulating or not)
    order = torch.randperm(18)
    xs = torch.randn(9, 4, requires_grad=True)
    rows = gather_slots(xs, order, 2)
    with _RecordOps() as bwd:
        rows.backward(torch.randn_like(rows))
    assert not [str(c[0]) for c in bwd.calls if "index_put" in str(c[0])]


class _RecordOutputs(TorchDispatchMode):
    """(op, shape, dtype) of every tensor an aten op produces."""

    def __init__(self):
        super().__init__()
        self.out = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        res = func(*args, **(kwargs or {}))
        for t in (res if isinstance(res, (tuple, list)) else (res,)):
            if isinstance(t, torch.Tensor):
                self.out.append((str(func), tuple(t.shape), t.dtype))
        return res


def test_dropless_moe_moves_expert_rows_in_the_compute_dtype(seed):
    """Under bf16 autocast with a float32 residual stream (the model's case),
    the T*k expert rows and their weighted slots exist only in bf16: no
    float32 (T*k, d) tensor is made forward or backward (each would be a
    float32 copy of every routed row, twice the bytes)."""
    moe = make_moe({"shared_ffn": 0})
    assert moe._dropless()
    x = torch.randn(2, 9, 32, requires_grad=True)
    T, d, k = 18, 32, moe.top_k
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with _RecordOutputs() as fwd:
            y, _, _ = moe(x)
    with _RecordOutputs() as bwd:
        y.square().sum().backward()
    f32_rows = [o for o in fwd.out + bwd.out if o[1][:1] == (T * k,) and o[1][-1] == d
                and o[2] == torch.float32 and len(o[1]) in (2, 3)]
    assert f32_rows == []
    assert any(o[1] == (T * k, d) and o[2] == torch.bfloat16 for o in fwd.out)
    assert y.dtype == torch.float32 and x.grad is not None
    torch.testing.assert_close(y, moe_reference(moe, x), atol=5e-2, rtol=5e-2)


class _RecordOps(TorchDispatchMode):
    """Every aten op dispatched (forward and autograd's backward), with its arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _accumulating(calls) -> list[str]:
    """The ops that add into repeated rows: index_put(accumulate=True), index_add."""
    aten = torch.ops.aten
    bad = []
    for func, args, kwargs in calls:
        if func in (aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default):
            if (args[3] if len(args) > 3 else kwargs.get("accumulate", False)):
                bad.append(str(func))
        elif func.overloadpacket in (aten.index_add, aten.index_add_):
            bad.append(str(func))
    return bad


@pytest.mark.parametrize("cfg", [{}, {"shared_ffn": 0}, {"score": "sigmoid", "bias_balancing": True}])
def test_dropless_moe_has_no_accumulating_index_op(cfg, seed):
    """No op of a dropless MoE's forward or backward adds into repeated rows:
    on CUDA those are sort-based or atomic kernels. The gathers of the expert
    rows and of the gates are scatters to unique rows, and the load counts a
    one-hot sum (inductor handed count_per_row's int64 index_add to aten's
    sort-based accumulate: 12% of a compiled nam-125m step on an H200)."""
    moe = make_moe(cfg)
    assert moe._dropless()
    x = torch.randn(2, 9, 32, requires_grad=True)
    with _RecordOps() as fwd:
        y, stats, _ = moe(x)
    with _RecordOps() as bwd:
        (y.square().sum() + stats.probs.sum()).backward()
    assert _accumulating(fwd.calls) == []
    assert _accumulating(bwd.calls) == []


def test_permute_rows_equals_indexing(seed):
    v = torch.randn(40, 3, dtype=torch.float64)
    order = torch.randperm(40)
    a, b = v.clone().requires_grad_(True), v.clone().requires_grad_(True)
    pa, pb = permute_rows(a, order), b[order]
    assert torch.equal(pa, pb)
    g = torch.randn_like(pa)
    pa.backward(g)
    pb.backward(g)
    assert torch.equal(a.grad, b.grad)


def test_split_offsets_cut_each_group_in_order(seed):
    counts = torch.tensor([0, 1, 7, 2, 30], dtype=torch.int32)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    for splits in (1, 2, 3, 4):
        cut = split_offsets(offs, splits).view(-1, splits)
        assert torch.equal(cut[:, -1], offs)                       # each group still ends where it did
        starts = torch.cat([offs.new_zeros(1), offs[:-1]])
        sizes = torch.diff(torch.cat([starts[:, None], cut], 1), dim=1)
        assert (sizes >= 0).all() and torch.equal(sizes.sum(1), counts)
        assert (sizes.max(1).values - sizes.min(1).values <= 1).all()  # nearly equal parts


def _grouped_case(dtype, counts):
    """Five experts' rows (counts, one empty) of width 16 -> 32 on the CPU, or a skip."""
    if not grouped_mm_available(torch.device("cpu"), dtype, 16, 32):
        pytest.skip("torch._grouped_mm not available here")
    counts = torch.tensor(counts, dtype=torch.int32)
    rows = int(counts.sum())
    return (counts, torch.cumsum(counts, 0).to(torch.int32), torch.randn(rows, 16).to(dtype),
            torch.randn(len(counts), 16, 32).to(dtype), torch.randn(rows, 32).to(dtype))


def _grouped_grads(x0, w0, offs, g, splits):
    """(y, dx, dw) of grouped_mm on fresh leaves."""
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    y = grouped_mm(x, w, offs, splits)
    y.backward(g)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [2, 3])
def test_split_wgrad_equals_torch_grouped_mm(dtype, splits, seed):
    """The split-K weight gradient equals autograd's of torch._grouped_mm (to
    the rounding of its partial sums in bf16); the input gradient exactly."""
    counts, offs, x0, w0, g = _grouped_case(dtype, [5, 0, 19, 1, 40])
    (y1, dx1, dw1), (y2, dx2, dw2) = [_grouped_grads(x0, w0, offs, g, s) for s in (1, splits)]
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2)
    ref = torch.zeros(5, 16, 32)
    start = 0
    for e, c in enumerate(counts.tolist()):
        ref[e] = x0[start:start + c].float().t() @ g[start:start + c].float()
        start += c
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert dw2.dtype == dtype
    assert (dw2.float() - ref).abs().max() <= tol * ref.abs().max()
    assert (dw1.float() - ref).abs().max() <= tol * ref.abs().max()


def test_moe_with_split_wgrad_equals_reference(seed):
    """The whole layer (grouped experts) with policy.kernels.moe_wgrad_splits=3,
    applied as a run applies it, against the per-expert loop."""
    from megacpp.train.activation import apply_moe_wgrad_splits
    x0 = torch.randn(3, 21, 32)
    if not grouped_mm_available(x0.device, x0.dtype, 32, 32, 16):
        pytest.skip("torch._grouped_mm not available here")
    moe = make_moe({"top_k": 2})
    moe.impl = "grouped_mm"
    assert apply_moe_wgrad_splits(moe, 3) == 1 and moe.experts.wgrad_splits == 3
    _matches_reference(moe, x0, y_atol=5e-5, y_rtol=1e-4)
    for bad in (0, 17, True, "4"):
        with pytest.raises(ValueError, match="policy.kernels.moe_wgrad_splits"):
            apply_moe_wgrad_splits(moe, bad)


def test_split_wgrad_traces_under_compile(seed, monkeypatch):
    """The split-K backward traces (dynamo + AOT autograd, bf16 as on the GPU)
    with no graph break."""
    from torch._dynamo.utils import counters
    if not grouped_mm_available(torch.device("cpu"), torch.bfloat16, 16, 32):
        pytest.skip("torch._grouped_mm not available here")
    counts = torch.tensor([6, 0, 10, 16], dtype=torch.int32)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    x0 = torch.randn(32, 16).bfloat16()
    w0 = torch.randn(4, 16, 32).bfloat16()
    g = torch.randn(32, 32).bfloat16()
    out = []
    torch._dynamo.reset()
    counters["graph_break"].clear()
    for fn in (lambda x, w: grouped_mm(x, w, offs, 2),
               torch.compile(lambda x, w: grouped_mm(x, w, offs, 2), backend="aot_eager", fullgraph=True)):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        fn(x, w).backward(g)
        out.append((x.grad, w.grad))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    assert not counters["graph_break"]


def test_narrow_sort_keys_give_the_same_stable_order(seed):
    expert = torch.randint(0, 8, (5000,))
    keys = sort_keys(expert, 8)
    assert keys.dtype == torch.uint8
    assert torch.equal(torch.sort(keys, stable=True).indices, torch.sort(expert, stable=True).indices)
    assert sort_keys(expert, 300).dtype == torch.int64  # ids past 255 keep their width


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_top_rows_equals_topk_and_breaks_ties_low(k, seed):
    """top_rows picks what torch.topk picks, in its order, on rows without
    ties (fresh random scores, float32 and bf16); with ties, the lower index
    first (k <= ARGMAX_TOPK; above it torch.topk itself runs)."""
    for dtype in (torch.float32, torch.bfloat16):
        # each row a random order of eight distinct values (exact in bf16: no ties)
        sel = (torch.argsort(torch.rand(257, 8), dim=-1).float() / 8 + torch.rand(257, 1)).to(dtype)
        assert (sel.sort(-1).values.diff(dim=-1) > 0).all()
        torch.testing.assert_close(top_rows(sel, k), torch.topk(sel, k, dim=-1).indices, atol=0, rtol=0)
    if k <= 4:
        tied = torch.tensor([[0.5, 0.9, 0.9, 0.1, 0.9, 0.2, 0.3, 0.9]])
        assert top_rows(tied, k).tolist() == [[1, 2, 4, 7][:k]]
        # inductor (as the GPU runs it) for the presets' k, dynamo + AOT for the others
        compiled = torch.compile(lambda v: top_rows(v, k), backend="inductor" if k == 2 else "aot_eager",
                                 fullgraph=True)
        assert torch.equal(compiled(tied), top_rows(tied, k))
        torch.testing.assert_close(compiled(sel.float()), torch.topk(sel.float(), k, dim=-1).indices,
                                   atol=0, rtol=0)
