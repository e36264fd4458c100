"""Mixed precision per layer in one quant plugin (layers=, sensitive=/high=) and quantization
composed after low rank (lowrank_linear's factors packed) and after pruning (CSR and 2:4 values
to int8, structured pruning's smaller matrices packed)."""
import numpy as np
import pytest

from minitx import models, plugin
from minitx.errors import MinitxError
from minitx.executor import Executor
from minitx.model import Model
from minitx.training import qat
from minitx.validate import Calibration

CAL = Calibration.random(2, 16)


def _logits(m, x):
    from minitx import feeds
    return Executor(m.graph, m.params).run(feeds.build(m.graph, x.tolist()), outputs=["logits"])["logits"]


def _cos(a, b):
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


@pytest.fixture(scope="module")
def gpt2():
    return Model.from_config(models.preset("gpt2", "tiny"), seed=0)


def _modes(m):
    return {n.name: n.op for n in m.graph.nodes if n.name.startswith("layers.")
            and n.op in ("linear", "linear_q4", "linear_q8_0", "linear_q8")}


def test_layers_glob_sets_each_layers_mode(gpt2):
    new = plugin.optimize(gpt2, ["quant:int4,layers=*.mlp.down:int8|layers.0.attn.*:none"], calib=CAL)
    ops = _modes(new)
    assert ops["layers.0.mlp.down"] == ops["layers.1.mlp.down"] == "linear_q8_0"
    assert ops["layers.0.attn.qkv"] == ops["layers.0.attn.out"] == "linear"        # left float
    assert ops["layers.1.attn.qkv"] == ops["layers.0.mlp.up"] == "linear_q4"
    assert new.meta["rewrites"][-1]["validation"]["passed"]


def test_sensitive_layers_are_the_measured_worst_and_get_high(gpt2):
    """A layer given a few huge weights (outliers stretch its group scales, so int4 rounds its other
    weights to zero) is the one sensitivity promotes; mixing lands between all-int4 and all-int8."""
    params = {k: np.array(a, copy=True) for k, a in gpt2.params.items()}
    w = params["layers.1.mlp.up.weight"]
    w[::16, :] *= 40.0   # one outlier row per 16-row group
    m = Model(dict(gpt2.config), params, gpt2.graph, gpt2.tokenizer_json, dict(gpt2.meta))
    mixed = plugin.optimize(m, ["quant:int4,group=16,sensitive=0.125,high=int8"], calib=CAL, force=True)
    ops = _modes(mixed)
    assert [k for k, v in ops.items() if v == "linear_q8_0"] == ["layers.1.mlp.up"]
    tagged = {n.name: n.tags for n in mixed.graph.nodes if "sensitivity" in n.tags}
    assert len(tagged) == 8 and max(tagged, key=lambda k: tagged[k]["sensitivity"]) == "layers.1.mlp.up"
    assert tagged["layers.1.mlp.up"]["quant"] == "int8"
    x = np.random.default_rng(1).integers(0, m.vocab_size, (2, 20))
    ref = _logits(m, x)
    c4 = _cos(ref, _logits(plugin.optimize(m, ["quant:int4,group=16"], calib=CAL, force=True), x))
    c8 = _cos(ref, _logits(plugin.optimize(m, ["quant:int8"], calib=CAL, force=True), x))
    cm = _cos(ref, _logits(mixed, x))
    assert c4 < cm <= c8 + 1e-6, (c4, cm, c8)
    other = plugin.optimize(m, ["quant:int4,group=16,layers=layers.0.mlp.up:int8"], calib=CAL, force=True)
    assert cm > _cos(ref, _logits(other, x))   # the measured choice beats promoting another layer


def test_output_errors_match_an_independent_int4_rounding(gpt2):
    """The sensitivity of one weight: the model's output error with that weight alone rounded to
    int4 — here rounded by the test's own code and run through the executor."""
    from plugins.quant import output_errors
    seqs = [[1, 5, 9, 2, 7, 3], [4, 4, 8, 1]]
    name = "layers.0.mlp.down.weight"
    W = gpt2.params[name].astype(np.float32)                             # rounded in float32, as packed
    g = W.reshape(W.shape[0] // 16, 16, -1)
    s = np.abs(g).max(1, keepdims=True) / np.float32(7.5)
    Wq = (np.clip(np.round(g / s), -8, 7) * s).reshape(W.shape)
    num = den = 0.0
    for ids in seqs:
        x = np.array([ids])
        ref = _logits(gpt2, x).astype(np.float64)
        q = _logits(Model(gpt2.config, {**gpt2.params, name: Wq}, gpt2.graph), x).astype(np.float64)
        num, den = num + np.sum((q - ref) ** 2), den + np.sum(ref ** 2)
    got = output_errors(gpt2.graph, gpt2.params, {name: {"bits": 4, "group": 16}}, seqs)[name]
    assert got == pytest.approx(np.sqrt(num / den), rel=1e-4) and got > 0


def test_qat_follows_the_per_layer_modes(gpt2):
    spec = "quant:int4,group=16,layers=*.mlp.*:int8"
    fq = qat.fake_quant_model(gpt2, spec)
    attrs = {n.name: n.attrs for n in fq.graph.nodes if n.op == "fake_quant"}
    assert attrs["layers.0.mlp.up.fake_quant"]["bits"] == 8 and attrs["layers.0.attn.qkv.fake_quant"]["bits"] == 4
    # int8 packs to linear_q8_0, which rounds its input per block of 32: the int8 layers alone do too
    acts = {n.name: n.attrs for n in fq.graph.nodes if n.op == "fake_quant_act"}
    assert acts and all(k.split(".")[2] == "mlp" and a == {"group": 32} for k, a in acts.items()), acts
    packed = plugin.optimize(gpt2, [spec], validate=False)
    x = np.random.default_rng(0).integers(0, gpt2.vocab_size, (2, 24))
    a, b = _logits(packed, x), _logits(fq, x)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


@pytest.mark.parametrize("spec, match", [
    ("quant:int4,layers=*.mlp.*", "not GLOB:MODE"),
    ("quant:int4,layers=*.mlp.*:int3", "not GLOB:MODE"),
    ("quant:int4,sensitive=1.5", "bad value '1.5' for sensitive"),
    ("quant:int4,high=int3", "bad value 'int3' for high"),
    ("quant:int4,sensitive=0.2,qat=true", "pass the measured choice as layers="),
    ("quant:int4,layers=*:float16,qat=true", "not float16"),
    ("quant:kv8,sensitive=0.2", "has none"),
])
def test_bad_mixed_options_are_one_line_errors(spec, match):
    with pytest.raises(MinitxError, match=match):
        plugin.parse_spec(spec)


def test_sensitive_needs_calibration(gpt2):
    with pytest.raises(MinitxError, match="calibration sequences"):
        plugin.get_plugin("quant").apply(gpt2.graph, gpt2.params, plugin.parse_spec("quant:int4,sensitive=0.5").options)


@pytest.mark.parametrize("quant, ops", [("quant:int8", {"linear_q8_0", "linear_q8"}), ("quant:int4,group=16", {"linear_q4"})])
def test_quant_after_lowrank_packs_the_factors(gpt2, quant, ops):
    lr = plugin.optimize(gpt2, ["lowrank:rank=16,min_cosine=0"], calib=CAL)
    both = plugin.optimize(lr, [quant], calib=CAL)
    kinds = {n.op for n in both.graph.nodes}
    assert "lowrank_linear" not in kinds and "linear" not in kinds and ops <= kinds
    assert not any(k.endswith(".lowrank.u") or k.endswith(".lowrank.v") for k in both.params)
    rep = both.meta["rewrites"][-1]
    assert rep["validation"]["passed"] and rep["bytes_after"] < 0.35 * rep["bytes_before"]
    x = np.random.default_rng(2).integers(0, gpt2.vocab_size, (2, 16))
    assert _cos(_logits(lr, x), _logits(both, x)) > (0.999 if "int8" in quant else 0.97)


@pytest.mark.parametrize("prune, op", [("sparsity:weights=magnitude,sparsity=0.6", "sparse_linear"),
                                       ("sparsity:weights=nm", "nm_linear")])
@pytest.mark.parametrize("quant", ["quant:int8", "quant:int4,group=16"])
def test_quant_after_pruning_packs_the_kept_values(gpt2, prune, op, quant):
    """Every pruned linear keeps its op and indices, its values become int8 with a scale per
    output that reproduces them to half a step; the composed model passes validation."""
    pruned = plugin.optimize(gpt2, [prune], calib=CAL, force=True)
    both = plugin.optimize(pruned, [quant], calib=CAL)
    nodes = [n for n in both.graph.nodes if n.op == op]
    assert len(nodes) == 8 and all(n.tags.get("quant") == "int8" for n in nodes)
    for n in nodes:
        vals, scale = both.params[n.inputs[1]], both.params[n.inputs[-1]]
        before = pruned.params[n.inputs[1][:-len(".q")]]
        assert vals.dtype == np.int8 and np.abs(vals).max() == 127
        per_out = scale[np.repeat(np.arange(len(scale)), np.diff(both.params[n.inputs[3]]))] if op == "sparse_linear" \
            else scale[None, :]
        assert np.abs(vals * per_out - before).max() <= 0.5 * per_out.max() + 1e-7
        assert np.array_equal(both.params[n.inputs[2]], pruned.params[n.inputs[2]])    # indices untouched
    rep = both.meta["rewrites"][-1]
    assert rep["validation"]["passed"]
    x = np.random.default_rng(3).integers(0, gpt2.vocab_size, (2, 16))
    assert _cos(_logits(pruned, x), _logits(both, x)) > (0.999 if "int8" in quant else 0.97)   # int4: tables too


def test_quant_after_structured_pruning_packs_the_smaller_matrices(gpt2):
    pruned = plugin.optimize(gpt2, ["sparsity:weights=ffn,sparsity=0.5"], calib=CAL, force=True)
    both = plugin.optimize(pruned, ["quant:int8"], calib=CAL)
    ups = [n for n in both.graph.nodes if ".mlp.up" in n.name]
    assert len(ups) == 2 and all(n.op.startswith("linear_q8") for n in ups)
    C, F = gpt2.config["d_model"], gpt2.config["d_ff"]
    assert all(both.params[n.inputs[1]].size == C * F // 2 and both.params[n.inputs[1]].dtype == np.int8 for n in ups)
    assert both.meta["rewrites"][-1]["validation"]["passed"]
