"""Recipe loading, validation errors, TOML round trip, hashing, presets."""
import dataclasses
import re

import pytest
from hypothesis import given, settings, strategies as st

from megacpp import load_recipe
from megacpp.errors import RecipeError
from megacpp.recipe import io, loads_recipe
from megacpp.recipe.count import summarize
from megacpp.recipe.presets import PRESETS
from megacpp.recipe.shapes import model_shapes, numel

PRESET_NAMES = list(PRESETS)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_toml_round_trip_and_hash(name, tmp_path):
    r = load_recipe(name)
    text = r.to_toml()
    path = tmp_path / "r.toml"
    path.write_text(text)
    again = load_recipe(str(path))
    assert again.model == r.model and again.policy == r.policy
    assert again.hash == r.hash
    assert again.to_toml() == text          # exact round trip
    assert load_recipe(name).hash == r.hash  # stable across loads


def test_preset_hashes_differ():
    hashes = {load_recipe(n).hash for n in PRESET_NAMES}
    assert len(hashes) == len(PRESET_NAMES)


def test_nam_1b_fp8_is_nam_1b_with_fp8_policy_only():
    # the FP8 preset must not fork the model: only its run policy (precision, micro batch) differs
    base, fp8 = load_recipe("nam-1b"), load_recipe("nam-1b-fp8")
    assert fp8.model == base.model
    assert fp8.policy.precision.low_precision == "fp8_tensorwise"
    assert fp8.policy.precision.expert_low_precision == "fp8_rowwise"
    assert (fp8.policy.micro_batch, base.policy.micro_batch) == (32, 16)
    same = dataclasses.replace(fp8.policy, precision=base.policy.precision, micro_batch=base.policy.micro_batch)
    assert same == base.policy


def test_equal_recipes_written_differently_hash_equal(tmp_path):
    a = tmp_path / "a.toml"
    a.write_text('base = "nam-tiny"\n[model]\nhidden_size = 256\n[policy.optimizer]\nlr = 1\n')
    b = tmp_path / "b.toml"
    # same values: dotted keys, int vs float, other key order, a value equal to the base's
    b.write_text('base = "nam-tiny"\npolicy.optimizer.lr = 1.0\nmodel.depth = 12\n'
                 'model.hidden_size = 256\n')
    ra, rb = load_recipe(str(a)), load_recipe(str(b))
    assert ra.hash == rb.hash
    rc = load_recipe("nam-tiny", ["model.hidden_size=256", "policy.optimizer.lr=1"])
    assert rc.hash == ra.hash
    assert load_recipe("nam-tiny").hash != ra.hash


def test_set_overrides_types():
    r = load_recipe("nam-tiny", ["policy.steps=7", "model.pattern=AMF", "model.overrides.3=R",
                                 "policy.aux.stp.layers=1,2", "policy.precision.compute=bf16"])
    assert r.policy.steps == 7 and r.model.pattern == "AMF"
    assert r.model.overrides == {3: "R"} and r.layers.letters[3] == "R"
    assert r.policy.aux.stp.layers == "1,2"


def test_base_file_chain(tmp_path):
    (tmp_path / "one.toml").write_text('base = "nam-tiny"\n[policy]\nsteps = 11\n')
    (tmp_path / "two.toml").write_text('base = "one.toml"\n[model]\ndepth = 24\n')
    r = load_recipe(str(tmp_path / "two.toml"))
    assert r.policy.steps == 11 and r.model.depth == 24 and r.model.name == "nam-tiny"
    (tmp_path / "loop.toml").write_text('base = "loop.toml"\n')
    with pytest.raises(RecipeError, match="circular"):
        load_recipe(str(tmp_path / "loop.toml"))


def _err(tmp_path, body):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(RecipeError) as e:
        load_recipe(str(path))
    return e.value, str(path)


# Each named validation error: (TOML body, field named, text in the message, line)
CASES = [
    ('base = "nam-tiny"\n[model]\nhiden_size = 3\n', "model.hiden_size", "unknown key", 3),
    ('base = "nam-tiny"\n[policy]\nsteps = "ten"\n', "policy.steps", "must be an integer", 3),
    ('base = "nam-tiny"\n[policy]\nsteps = true\n', "policy.steps", "must be an integer", 3),
    ('base = "nam-tiny"\n[model]\nhidden_size = -128\n', "model.hidden_size", "must be positive", 3),
    ('base = "nam-tiny"\n[model]\nvocab_size = 100000000000\n', "model.vocab_size", "beyond", 3),
    ('base = "nam-tiny"\n[model.attention]\nnum_heads = 5\n', "model.attention.num_heads",
     "do not divide hidden_size", 3),
    ('base = "nam-125m"\n[model.attention]\nnum_kv_heads = 5\n', "model.attention.num_kv_heads",
     "GQA groups", 3),
    ('base = "nam-tiny"\n[model.moe]\ntop_k = 9\n', "model.moe.top_k", "above the number of experts", 3),
    ('base = "nam-tiny"\n[model]\npattern = "AQM"\n', "model.pattern", "unknown layer letter", 3),
    ('base = "nam-tiny"\n[model]\npattern = ""\n', "model.pattern", "no layer letters", 3),
    ('base = "nam-tiny"\n[model]\npattern = "ADMEF"\n[model.attention]\nindex_topk = 512\n',
     "model.attention.index_topk", "above the sequence length", 5),
    ('base = "nam-tiny"\n[policy]\nglobal_batch = 12\n', "policy.global_batch", "not a multiple", 3),
    ('base = "nam-tiny"\n[model.mamba]\nhead_dim = 48\n', "model.mamba.head_dim", "does not divide", 3),
    ('base = "nam-tiny"\n[model.norm.seams]\nM = "none"\n', "model.norm.seams.M", "Mamba-3", 3),
    ('base = "nam-tiny"\n[policy.parallel]\ntensor = 2\n', "policy.parallel.tensor", "not implemented", 3),
    ('base = "nam-tiny"\n[model.mamba]\nmimo_rank = 4\n', "model.mamba.mimo_rank", "not implemented", 3),
    ('base = "mamba2-130m"\n[policy]\nglobal_batch = 16\n[policy.parallel]\ndata = 2\nsharding = "fsdp2"\n',
     "policy.compile.mode",
     "one device only", None),
    ('base = "nam-tiny"\n[policy.patches]\nfancy = "required"\n', "policy.patches.fancy", "unknown patch", 3),
    ('base = "nam-tiny"\n[policy.aux.stp]\nlayers = "1,x"\n', "policy.aux.stp.layers", "layer indices", 3),
    # "²" passes str.isdigit() but not int(): one error naming the field (a fuzzed case, 2026-11-29)
    ('base = "nam-tiny"\n[policy.aux.stp]\nlayers = "²"\n', "policy.aux.stp.layers", "layer indices", 3),
    ('base = "nam-tiny"\n[policy.aux.stp]\nlayers = "40"\n', "policy.aux.stp.layers", "outside the model", 3),
    ('base = "nam-tiny"\n[policy.optimizer]\nname = "sgd"\n', "policy.optimizer.name", "must be one of", 3),
    ('base = "nam-tiny"\nfoo = 1\n', "foo", "unknown top-level key", 2),
    ('base = "nam-tiny"\n[policy.precision]\nparams = "bf16"\n', "policy.precision.params", "need compute", 3),
    ('base = "nam-tiny"\n[policy.precision]\nlow_precision = "fp8_rowwise"\n', "policy.precision.low_precision",
     "bf16 autocast", 3),
    ('base = "no-such-preset"\n', "base", "neither a preset", 1),
    ('base = "nam-tiny"\n[model]\noverrides = { 99 = "R" }\n', "model.overrides.99", "layer index", 3),
    ('base = "nam-125m"\n[model]\nname = "x"\n[model.attention]\nrotary_fraction = 1.5\n',
     "model.attention.rotary_fraction", "(0, 1]", 5),
]


@pytest.mark.parametrize("body,field,needle,line", CASES)
def test_validation_errors_name_file_field_line(tmp_path, body, field, needle, line):
    err, path = _err(tmp_path, body)
    assert err.field == field
    assert err.file == path
    msg = str(err)
    assert path in msg and field in msg
    if needle:
        assert needle in msg
    if line is not None:
        assert err.line == line and f"{path}:{line}:" in msg


def test_malformed_toml(tmp_path):
    err, path = _err(tmp_path, '[model\nx = 1\n')
    assert "malformed TOML" in str(err) and err.file == path and err.line == 1


def test_set_error_names_set():
    with pytest.raises(RecipeError) as e:
        load_recipe("nam-tiny", ["model.attention.num_heads=5"])
    assert e.value.file == "--set" and e.value.field == "model.attention.num_heads"
    with pytest.raises(RecipeError) as e:
        load_recipe("nam-tiny", ["model.hidden_size=big"])
    assert e.value.file == "--set"
    with pytest.raises(RecipeError):
        load_recipe("nam-tiny", ["steps=3"])


def test_unknown_recipe_name():
    with pytest.raises(RecipeError, match="no preset or file"):
        load_recipe("nam-huge")


def test_nam56r_counts_and_independent_param_count():
    r = load_recipe("nam56r")
    c = r.layers.counts()
    assert (c["A"], c["E"], c["M"], c["R"]) == (13, 22, 13, 4) and r.model.depth == 52
    # independent count from the public constants (FACTS §1), written out by hand
    h, V = 3584, 65536
    mla = (h * 64 + 64 + 64 * 56 * 128            # q down, q norm, q up (nope 64 + rope 64)
           + h * (64 + 64) + 64 + 64 * 56 * 128    # kv down (+rope), kv norm, kv up (k nope + v)
           + 56 * 64 * h)                          # out
    moe = h * 16 + 16 * 3 * h * 896 + 3 * h * 1024
    di, nh, G, N = 2 * h, 112, 8, 64
    mamba3 = h * (2 * di + 2 * G * N + 2 * nh + N // 2) + 2 * N + 2 * nh * N + 3 * nh + di + di * h
    rh, dk = 28, 128
    rec = 4 * h * rh * dk + 3 * rh * dk * 4 + 2 * h * rh + 2 * rh + dk + rh * dk * h
    independent = 2 * V * h + h + 52 * h + 13 * mla + 22 * moe + 13 * mamba3 + 4 * rec
    total = summarize(r).total_params
    assert abs(total - independent) / independent < 0.01
    assert total == sum(numel(s) for s in model_shapes(r.model).values())


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_random_toml_gives_recipe_or_own_error(text):
    try:
        loads_recipe(text)
    except RecipeError:
        pass


def _mutations():
    base = load_recipe("nam-tiny").to_dict()
    leaves = []

    def walk(prefix, v):
        if isinstance(v, dict) and v:
            for k, x in v.items():
                walk(prefix + [k], x)
        else:
            leaves.append(prefix)
    walk([], base)
    return base, leaves


_BASE, _LEAVES = _mutations()
weird_values = st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                         st.booleans(), st.text(max_size=8), st.lists(st.integers(), max_size=3),
                         st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_LEAVES), weird_values, st.booleans())
def test_mutated_recipe_gives_recipe_or_own_error(path, value, add_key):
    tree = io.set_dotted(_BASE, ".".join(path), value)
    if add_key:
        tree = io.set_dotted(tree, ".".join(path[:-1] + ["zz_extra"]), 1)
    text = io.dumps_toml({k: v for k, v in tree.items()}) if _toml_ok(tree) else None
    if text is None:
        return
    try:
        r = loads_recipe(text)
    except RecipeError:
        return
    assert len(r.hash) == 64


def _toml_ok(tree):
    try:
        io.dumps_toml(tree)
        return True
    except Exception:
        return False


def test_frozen():
    r = load_recipe("nam-tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.model.hidden_size = 3  # type: ignore[misc]


def test_describe_counts_match_shapes_for_all_presets():
    for name in PRESET_NAMES:
        r = load_recipe(name)
        s = summarize(r)
        assert s.total_params == sum(numel(x) for x in model_shapes(r.model).values())
        assert 0 < s.active_params <= s.total_params
        # every active weight but the embedding lookup is a matmul: >= 6 FLOPs/token each
        matmul_params = s.active_params - r.model.vocab_size * r.model.hidden_size
        assert s.flops_per_token >= 6 * matmul_params * 0.99


def test_key_lines_regex_sanity():
    lines = io.key_lines('a = 1\n[model.attention]\nnum_heads = 3\n"x" = 2\n')
    assert lines["a"] == 1 and lines["model.attention.num_heads"] == 3
    assert re.match(r"\w+", "x")


def test_device_memory_follows_sharding_and_checkpointing():
    from megacpp.recipe.count import summarize

    full = [f"policy.activation_checkpointing.{f}=full" for f in "AMREF"]
    one = summarize(load_recipe("nam56r", ["policy.parallel.data=1", "policy.parallel.sharding=none",
                                           "policy.global_batch=4"])).memory
    four = summarize(load_recipe("nam56r", ["policy.parallel.data=4", "policy.global_batch=16"])).memory
    four_ac = summarize(load_recipe("nam56r", ["policy.parallel.data=4", "policy.global_batch=16"] + full)).memory
    states = one["weights"] + one["gradients"] + one["optimizer"]
    assert one["device_states"] == states and one["device_gather"] == 0
    assert one["device_estimate"] == one["total_estimate"]  # nothing sharded, nothing checkpointed
    assert four["device_states"] == states / 4 and four["device_gather"] > 0
    # checkpointing every family keeps one hidden vector per layer and token, plus one layer rebuilt
    assert four_ac["device_activations"] == one["activations_checkpointed"]
    assert four_ac["device_estimate"] < 80 * 2**30 < one["device_estimate"]  # fits an 80 GB card only so


def test_bf16_gradient_reduce_needs_bf16_compute_and_translates():
    """policy.parallel.reduce = "compute" reduces gradients in bf16: refused
    under fp32/fp16 compute (naming the field), and Megatron's flag otherwise."""
    from megacpp.recipe.megatron import translate

    with pytest.raises(RecipeError) as e:
        load_recipe("nam-tiny", ["policy.parallel.reduce=compute"])  # nam-tiny computes in fp32
    assert e.value.field == "policy.parallel.reduce" and "bf16" in str(e.value)
    with pytest.raises(RecipeError) as e:
        load_recipe("nam-tiny", ["policy.parallel.reduce=bf16"])
    assert e.value.field == "policy.parallel.reduce"
    r = load_recipe("nam-125m", ["policy.parallel.reduce=compute"])
    assert "--grad-reduce-in-bf16" in translate(r).args
    assert "--grad-reduce-in-bf16" not in translate(load_recipe("nam-125m")).args
