"""policy.precision.residual: the stream between layers in float32 or in the
compute dtype. Recipe field, model dtype, numerics against the float32
stream, the manifest's record and the Megatron flag, on CPU."""
from __future__ import annotations

import pytest
import torch

import megacpp
from megacpp.errors import RecipeError
from megacpp.model.block import Block
from megacpp.model.context import SeqContext
from megacpp.recipe.megatron import translate
from megacpp.train.precision import Precision

CPU = torch.device("cpu")


def _model(residual: str, compute: str = "bf16"):
    recipe = megacpp.load_recipe("nam-tiny", [f"policy.precision.compute={compute}",
                                              f"policy.precision.residual={residual}"])
    torch.manual_seed(0)
    model = megacpp.build_model(recipe.model)
    prec = Precision(recipe.policy.precision, CPU)
    prec.apply(model)
    return recipe, model, prec


def test_residual_is_a_checked_recipe_field():
    assert megacpp.load_recipe("nam-1b").policy.precision.residual == "fp32"
    assert megacpp.load_recipe("nam-125m").policy.precision.residual == "compute"
    assert megacpp.load_recipe("nam-tiny", ["policy.precision.residual=compute"]).policy.precision.residual == "compute"
    with pytest.raises(RecipeError) as e:
        megacpp.load_recipe("nam-tiny", ["policy.precision.residual=bf16"])
    assert e.value.field == "policy.precision.residual"


@pytest.mark.parametrize("residual,compute,want", [("fp32", "bf16", torch.float32),
                                                   ("compute", "bf16", torch.bfloat16),
                                                   ("compute", "fp32", torch.float32)])
def test_every_layer_output_takes_the_stream_dtype(residual, compute, want):
    recipe, model, prec = _model(residual, compute)
    assert prec.describe()["residual"] == str(want).removeprefix("torch.")
    ids = torch.randint(0, recipe.model.vocab_size, (2, 48))
    with prec.autocast():
        out = model(ids, collect_hidden=list(range(len(model.layers))))
    # every E, M, A and R layer's x + f(norm(x)) stays in the stream's dtype
    assert {h.dtype for h in out.collected.values()} == {want}
    assert len(out.collected) == len(model.layers)


def test_compute_stream_tracks_the_float32_stream():
    """Same weights, same batch: the bf16 stream's loss and gradients within
    bf16 rounding of the float32 stream's (one rounding an add, ~3 digits)."""
    recipe, m32, p32 = _model("fp32")
    _, m16, p16 = _model("compute")
    m16.load_state_dict(m32.state_dict())
    ids = torch.randint(0, recipe.model.vocab_size, (2, 65), generator=torch.Generator().manual_seed(1))
    losses, grads = [], []
    for m, p in ((m32, p32), (m16, p16)):
        with p.autocast():
            logits = m(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([q.grad.float().flatten() for q in m.parameters() if q.grad is not None]))
    assert losses[0] == pytest.approx(losses[1], rel=2e-3)
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0).item()
    assert cos > 0.995, cos
    # and it is a different computation, not the same one relabelled
    assert not torch.equal(grads[0], grads[1])


class _Float32Mixer(torch.nn.Module):
    """A sublayer whose output is float32 (as an MoE combine can be)."""

    def forward(self, h, ctx):
        return torch.sin(h.float() * 3.0) * 1e-2, None, None


def test_block_sums_in_the_wider_dtype_then_rounds_once():
    recipe = megacpp.load_recipe("nam-tiny")
    block = Block(recipe.model, "F", 0)
    setattr(block, block.family, _Float32Mixer())
    torch.manual_seed(3)
    x = torch.randn(1, 16, recipe.model.hidden_size).to(torch.bfloat16)
    ctx = SeqContext(1, 16, CPU)
    y, _, _ = block.mixer(block.norm(x), ctx)
    out, _, _ = block(x, ctx)
    assert out.dtype == torch.bfloat16    # a float32 y does not widen a bf16 stream
    want = (x.float() + y).to(torch.bfloat16)
    assert torch.equal(out, want)
    # one rounding, not two: rounding y first gives other numbers somewhere
    assert not torch.equal(out, x + y.to(torch.bfloat16))
    # a float32 stream is unchanged by the cast
    x32 = x.float()
    assert torch.equal(block(x32, ctx)[0], x32 + block.mixer(block.norm(x32), ctx)[0])


def test_megatron_flag_follows_the_stream():
    assert "--fp32-residual-connection" in translate(megacpp.load_recipe("nam-1b")).args
    assert "--fp32-residual-connection" not in translate(megacpp.load_recipe("nam-125m")).args
    r = megacpp.load_recipe("nam-1b", ["policy.precision.residual=compute"])
    assert "--fp32-residual-connection" not in translate(r).args
    r = megacpp.load_recipe("nam-1b", ["policy.precision.compute=fp32"])
    assert "--fp32-residual-connection" not in translate(r).args
