"""The executor: whole-model gradients against finite differences, KV-cache decoding against a
full forward, padding invariance, recompute, and peak-memory accounting."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import as_float64

from minitx import models
from minitx.errors import MinitxError
from minitx.executor import Executor
from minitx.generate import embed, empty_state, generate, step
from minitx.model import Model


def _feeds(model: Model, B: int, T: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, model.vocab_size, (B, T))
    pos = np.broadcast_to(np.arange(T), (B, T)).copy()
    mask = np.ones((B, T), np.int64)
    feeds = {"input_ids": ids, "position_ids": pos, "attention_mask": mask}
    if model.is_decoder:
        feeds.update({k: v for k, v in empty_state(model, B).past.items()})
        feeds["targets"] = rng.integers(0, model.vocab_size, (B, T))
    else:
        feeds["token_type_ids"] = np.zeros((B, T), np.int64)
    return feeds


def _training_graph(model: Model):
    if model.is_decoder:
        return models.with_loss(model.graph), "loss"
    # Encoders: a scalar from the sentence embedding, so every parameter gets a gradient.
    from minitx.ir import Node, Value

    g = model.graph.copy()
    g.inputs.append(Value("probe", ("B", model.config["d_model"]), g.params["tok_emb.weight"].dtype))
    g.nodes.append(Node("probe_dot", "linear", ["embedding", "probe_w"], ["probe_out"]))
    g.params["probe_w"] = Value("probe_w", (model.config["d_model"], 1), g.params["tok_emb.weight"].dtype)
    g.nodes.append(Node("loss", "cross_entropy", ["probe_out", "probe_t"], ["loss"]))
    g.inputs.append(Value("probe_t", ("B",), "int64"))
    g.outputs = ["loss"]
    return g, "loss"


def test_model_gradients_match_finite_differences(tiny):
    m = as_float64(tiny)
    g, loss = _training_graph(m)
    params = dict(m.params)
    B, T = 2, 5
    feeds = _feeds(m, B, T)
    if not m.is_decoder:
        feeds["probe"] = np.zeros((B, m.config["d_model"]))
        feeds["probe_t"] = np.zeros(B, np.int64)
        params["probe_w"] = np.random.default_rng(3).standard_normal((m.config["d_model"], 1))
        feeds["attention_mask"][1, -2:] = 0  # padding in the second sentence
    ex = Executor(g, params)
    res = ex.forward_backward(feeds, loss)
    assert set(res.grads) == set(params)
    rng = np.random.default_rng(7)
    eps = 1e-6
    for name in ["tok_emb.weight", "layers.0.attn.qkv.weight", "layers.1.mlp.down.weight", "layers.0.norm1.weight"]:
        d = rng.standard_normal(params[name].shape)
        plus = dict(params, **{name: params[name] + eps * d})
        minus = dict(params, **{name: params[name] - eps * d})
        fd = (Executor(g, plus).run(feeds)[loss] - Executor(g, minus).run(feeds)[loss]) / (2 * eps)
        analytic = float(np.sum(res.grads[name] * d))
        assert abs(fd - analytic) <= 1e-6 + 1e-5 * abs(fd), (name, fd, analytic)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_kv_cache_decoding_equals_full_forward(arch):
    m = Model.from_config(models.preset(arch, "tiny"), seed=2)
    ids = np.random.default_rng(0).integers(0, m.vocab_size, (3, 12))
    full, _ = step(m, ids, empty_state(m, 3))
    state = empty_state(m, 3)
    parts = []
    for a, b in [(0, 5), (5, 6), (6, 7), (7, 11), (11, 12)]:
        logits, state = step(m, ids[:, a:b], state)
        parts.append(logits)
    inc = np.concatenate(parts, axis=1)
    np.testing.assert_allclose(inc, full, rtol=1e-5, atol=1e-5)
    assert state.length == 12


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_left_padded_batch_matches_each_prompt_alone(arch):
    m = Model.from_config(models.preset(arch, "tiny"), seed=3)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9]]
    together = generate(m, prompts, max_new_tokens=6)
    alone = [generate(m, [p], max_new_tokens=6)[0] for p in prompts]
    assert together == alone


def test_encoder_padding_does_not_change_embeddings():
    m = Model.from_config(models.preset("bert", "tiny"), seed=4)
    seqs = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    both = embed(m, seqs)
    for k, s in enumerate(seqs):
        np.testing.assert_allclose(both[k], embed(m, [s])[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(both, axis=1), 1.0, rtol=1e-5)


def test_inference_matches_training_forward():
    m = Model.from_config(models.preset("gpt2", "tiny"), seed=5)
    g = models.with_loss(m.graph)
    feeds = _feeds(m, 2, 6)
    ex = Executor(g, m.params)
    np.testing.assert_array_equal(ex.run(feeds)["loss"], ex.forward_backward(feeds).outputs["loss"])


def test_recompute_tags_keep_gradients_and_cut_peak_memory():
    cfg = dict(models.preset("gpt2", "tiny"), n_layers=6)
    m = Model.from_config(cfg, seed=6)
    g = models.with_loss(m.graph)
    feeds = _feeds(m, 4, 32)
    base = Executor(g, m.params).forward_backward(feeds)
    g2 = g.copy()
    for n in g2.nodes:
        if "layer" in n.tags and not n.name.endswith(".res2"):
            n.tags["recompute"] = True
    rec = Executor(g2, m.params).forward_backward(feeds)
    assert rec.recomputed_nodes > 0
    for k in base.grads:
        np.testing.assert_allclose(rec.grads[k], base.grads[k], rtol=1e-6, atol=1e-7)
    assert rec.peak_activation_bytes < 0.6 * base.peak_activation_bytes


def test_dropout_only_in_training_and_reproducible():
    cfg = dict(models.preset("gpt2", "tiny"), dropout=0.5)
    m = Model.from_config(cfg, seed=7)
    g = models.with_loss(m.graph)
    feeds = _feeds(m, 2, 8)
    ex = Executor(g, m.params)
    m0 = Model.from_config(models.preset("gpt2", "tiny"), seed=7)
    no_drop = Executor(models.with_loss(m0.graph), m0.params)
    assert ex.run(feeds)["loss"] == no_drop.run(feeds)["loss"]  # inference: identity
    a = ex.forward_backward(feeds, step=1)
    b = ex.forward_backward(feeds, step=1)
    c = ex.forward_backward(feeds, step=2)
    assert a.outputs["loss"] == b.outputs["loss"] != no_drop.run(feeds)["loss"]
    assert c.outputs["loss"] != a.outputs["loss"]


def test_missing_input_and_unknown_backend_are_clear_errors():
    m = Model.from_config(models.preset("gpt2", "tiny"))
    with pytest.raises(MinitxError, match="missing graph input 'position_ids'"):
        m.executor().run({"input_ids": np.zeros((1, 1), np.int64)})
    with pytest.raises(MinitxError, match="unknown backend 'nope'"):
        Executor(m.graph, m.params, ["nope"])


def test_context_overflow_and_bad_ids_are_errors():
    m = Model.from_config(models.preset("gpt2", "tiny"))
    with pytest.raises(MinitxError, match="longer than the model's context"):
        generate(m, [[1] * (m.n_ctx + 1)], 1)
    with pytest.raises(MinitxError, match="outside the vocabulary"):
        step(m, np.array([[m.vocab_size]]), empty_state(m, 1))
    with pytest.raises(MinitxError, match="empty"):
        generate(m, [[]], 1)


def test_backward_plan_is_built_once_and_reused_bit_for_bit():
    """The plan (what gets gradients, what each VJP reads) depends on the graph and the requested
    gradients only: built on the first micro-batch, reused after, with results identical to a
    fresh executor's; another ``wrt`` gets its own plan."""
    m = Model.from_config(models.preset("llama", "tiny"), seed=2)
    g = models.with_loss(m.graph)
    built = []
    ex = Executor(g, m.params)
    orig = ex._backward_plan

    def counting(loss, wrt):
        plan = orig(loss, wrt)
        built.append(id(plan))
        return plan

    ex._backward_plan = counting
    a = ex.forward_backward(_feeds(m, 2, 5, seed=1), step=0)
    b = ex.forward_backward(_feeds(m, 2, 5, seed=2), step=1)
    assert len(set(built)) == 1 and len(built) == 2
    fresh = Executor(g, m.params).forward_backward(_feeds(m, 2, 5, seed=2), step=1)
    for k in fresh.grads:
        np.testing.assert_array_equal(b.grads[k], fresh.grads[k])
    assert b.peak_activation_bytes == fresh.peak_activation_bytes and set(a.grads) == set(m.params)
    only = ex.forward_backward(_feeds(m, 2, 5, seed=2), wrt=["lm_head.weight"] if "lm_head.weight" in m.params
                               else [sorted(m.params)[0]])
    assert len(set(built)) == 2 and len(only.grads) == 1


def test_a_vjp_that_raises_is_one_line_naming_node_op_and_backend():
    from minitx.backend import Backend

    class BadVJP(Backend):
        name = "badvjp"
        dtypes = frozenset({"float32"})

        def __init__(self):
            super().__init__()
            self.kernels = {"relu": lambda x: np.maximum(x, 0), "gelu": _spec_gelu}
            self.vjps = {"gelu": lambda grads, inputs, outputs, **attrs: 1 / 0}

    m = Model.from_config(models.preset("gpt2", "tiny"), seed=5)
    ex = Executor(models.with_loss(m.graph), m.params, [BadVJP()])   # the backward reaches the last layer first
    with pytest.raises(MinitxError, match=r"^node layers\.1\.mlp\.act: the VJP of op gelu on backend badvjp "
                                          r"raised ZeroDivisionError: division by zero$"):
        ex.forward_backward(_feeds(m, 1, 4))


def _spec_gelu(x, **attrs):
    from minitx import ops

    return ops.get("gelu").forward(x, **attrs)
