"""The rewrite framework: fixed point, firing log, weight bookkeeping, structural checks."""
import numpy as np
import pytest

from minitx import models, rewrite
from minitx.errors import MinitxError
from minitx.executor import Executor
from minitx.ir import Node
from minitx.model import Model
from minitx.feeds import build


@pytest.fixture(scope="module")
def gpt2():
    return Model.from_config(models.preset("gpt2", "tiny"), seed=0)


def _double_bias(node, ctx):
    """linear(x, W, b) -> linear(x, 2W, b) once (tagged so it does not fire again)."""
    if node.tags.get("doubled") or not ctx.is_param(node.inputs[1]):
        return None
    w = ctx.add_param(node.inputs[1] + ".x2", 2 * ctx.param(node.inputs[1]))
    return rewrite.Replacement([Node(node.name, "linear", [node.inputs[0], w, *node.inputs[2:]], node.outputs,
                                     dict(node.attrs), {**node.tags, "doubled": True})])


def test_fixed_point_log_and_weight_gc(gpt2):
    res = rewrite.apply(gpt2.graph, gpt2.params, [rewrite.Rule("double", "linear", _double_bias)])
    n_linear = sum(n.op == "linear" for n in gpt2.graph.nodes)
    assert len(res.firings) == n_linear and res.counts() == {"double": n_linear}
    assert res.passes == 2  # one sweep that changes, one that confirms the fixed point
    assert all(f.rule == "double" and f.op == "linear" for f in res.firings)
    # the replaced float weights are gone, the new ones declared with their dtype and shape
    assert "layers.0.mlp.up.weight" not in res.params and "layers.0.mlp.up.weight" not in res.graph.params
    assert res.graph.params["layers.0.mlp.up.weight.x2"].shape == gpt2.graph.params["layers.0.mlp.up.weight"].shape
    assert res.graph.node("layers.0.mlp.up").tags["rule"] == "double"
    # the originals are untouched
    assert "layers.0.mlp.up.weight" in gpt2.params and gpt2.graph.node("layers.0.mlp.up").inputs[1].endswith("weight")
    # and the rewrite really changed the computation (doubling weights is not a no-op)
    feeds = build(gpt2.graph, [[1, 2, 3]])
    a = Executor(gpt2.graph, gpt2.params).run(feeds)["logits"]
    b = Executor(res.graph, res.params).run(feeds)["logits"]
    assert not np.allclose(a, b)


def test_rule_matching_its_own_output_is_stopped(gpt2):
    def forever(node, ctx):
        return rewrite.Replacement([Node(node.name, node.op, node.inputs, node.outputs, node.attrs,
                                         {**node.tags, "n": node.tags.get("n", 0) + 1})])
    with pytest.raises(MinitxError, match="no fixed point"):
        rewrite.apply(gpt2.graph, gpt2.params, [rewrite.Rule("loop", "gelu", forever)], max_passes=4)


def test_replacement_must_produce_the_matched_outputs(gpt2):
    def drops(node, ctx):
        return rewrite.Replacement([Node(node.name, "gelu", node.inputs, ["elsewhere"], node.attrs, {})])
    with pytest.raises(MinitxError, match="does not produce"):
        rewrite.apply(gpt2.graph, gpt2.params, [rewrite.Rule("bad", "gelu", drops)])


def test_structural_check_after_each_pass(gpt2):
    def wrong_shape(node, ctx):
        if node.tags.get("done"):
            return None
        w = ctx.add_param("bogus", np.zeros((3, 3), np.float32))
        return rewrite.Replacement([Node(node.name, "linear", [node.inputs[0], w], node.outputs, {},
                                         {"done": True})])
    with pytest.raises(MinitxError, match=r"pass 1.*linear"):
        rewrite.apply(gpt2.graph, gpt2.params, [rewrite.Rule("shape", "linear", wrong_shape)])


def test_no_rule_fires_is_identity(gpt2):
    res = rewrite.apply(gpt2.graph, gpt2.params, [rewrite.Rule("none", "linear", lambda n, c: None)])
    assert res.firings == [] and res.graph.to_json() == gpt2.graph.to_json() and res.params.keys() == gpt2.params.keys()


def test_context_fresh_names_never_collide(gpt2):
    ctx = rewrite.Context(gpt2.graph.copy(), dict(gpt2.params))
    a = ctx.fresh("layers.0.mlp.up")
    b = ctx.fresh("layers.0.mlp.up")
    assert a != "layers.0.mlp.up" and a != b
    assert ctx.layers() == [0, 1]
