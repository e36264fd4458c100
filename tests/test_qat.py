"""Quantization-aware training: the fake_quant op, the quant plugin's qat=true rewrite, QAT against
post-training quantization, and the qat / eval --plugin commands.

The fake_quant forward is checked against explicit per-element loops (Python's round(), which like
np.rint rounds half to even), not against the quantizers it calls. Its gradient (a
straight-through estimator) is checked in tests/test_ops_grad.py.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from minitx import data, models, modelfile, ops, plugin
from minitx.training import qat
from minitx import training as tr
from minitx.errors import MinitxError, ShapeError
from minitx.executor import Executor
from minitx.model import Model


# ------------------------------------------------------------------------------- fake_quant forward
def _loop_fake_quant(w, bits, group, axis):
    """Symmetric max-abs quantization written out element by element."""
    w = np.asarray(w, np.float64)
    out = np.empty_like(w)
    qmin, qmax, div = (-127, 127, 127.0) if bits == 8 else (-8, 7, 7.5)
    rows, cols = w.shape
    if axis == 0:   # a scale per column (or per `group` rows of a column)
        runs = [[(r, c) for r in range(r0, r0 + (group or rows))] for c in range(cols)
                for r0 in range(0, rows, group or rows)]
    else:           # a scale per row (or per `group` columns of a row)
        runs = [[(r, c) for c in range(c0, c0 + (group or cols))] for r in range(rows)
                for c0 in range(0, cols, group or cols)]
    for run in runs:
        m = max(abs(float(w[i])) for i in run)
        s = np.float32(m / div) if m > 0 else np.float32(1.0)   # scales are float32, as is w / s
        for i in run:
            out[i] = min(max(round(float(np.float32(w[i]) / s)), qmin), qmax) * float(s)
    return out


@pytest.mark.parametrize("bits, group, axis", [(8, 0, 0), (8, 0, 1), (8, 4, 0), (4, 4, 0), (4, 8, 0), (4, 4, 1)])
def test_fake_quant_forward_matches_an_explicit_loop(bits, group, axis):
    w = (np.random.default_rng(bits + group + axis).standard_normal((8, 12)) * 0.3).astype(np.float32)
    w[0, 0] = 0.0
    w[:, 3] = 0.0                                            # an all-zero column: scale 1, values 0
    y = ops.get("fake_quant").forward(w, bits=bits, group=group, axis=axis)
    assert y.dtype == np.float32 and y.shape == w.shape
    np.testing.assert_allclose(y, _loop_fake_quant(w, bits, group, axis), rtol=1e-6, atol=1e-7)
    # the rounding error is at most half a step everywhere (max-abs scales: nothing saturates further)
    levels = 7.5 if bits == 4 else 127
    assert np.abs(y - w).max() <= np.abs(w).max() / levels / 2 * (1 + 1e-5)
    assert not np.array_equal(y, w)


def test_fake_quant_shape_rule_rejects_bad_attributes():
    infer = ops.get("fake_quant").infer
    assert infer([(8, 6)], ["float32"], bits=4, group=4) == [((8, 6), "float32")]
    with pytest.raises(ShapeError, match="fake_quant.*group size 3 does not divide the 8 rows"):
        infer([(8, 6)], ["float32"], bits=8, group=3)
    with pytest.raises(ShapeError, match="fake_quant.*even group"):
        infer([(8, 6)], ["float32"], bits=4, group=0)
    with pytest.raises(ShapeError, match="fake_quant.*bits must be 4 or 8"):
        infer([(8, 6)], ["float32"], bits=2)
    with pytest.raises(ShapeError, match="fake_quant.*must be float"):
        infer([(8, 6)], ["int8"], bits=8)


def test_linear_q8_0_is_a_linear_over_fake_quantized_input_and_weights():
    """What the QAT graph computes for an int8 linear — linear(fake_quant_act(x), fake_quant(W)) —
    is linear_q8_0's forward (to float64 rounding), and its gradient through the two
    straight-through nodes is linear_q8_0's VJP: one function, one estimator. Activation blocks
    rounded by hand here (max-abs / 127, half to even)."""
    from minitx.ops import quant as Q
    rng = np.random.default_rng(4)
    x, W, b = rng.standard_normal((2, 3, 64)), rng.standard_normal((64, 24)) * 0.1, rng.standard_normal(24)
    xb = x.reshape(2, 3, 2, 32)
    sx = np.abs(xb).max(-1, keepdims=True) / 127
    xq = (np.clip(np.round(xb / sx), -127, 127) * sx).reshape(x.shape)
    np.testing.assert_array_equal(ops.get("fake_quant_act").forward(x, group=32), xq)
    Wf = ops.get("fake_quant").forward(W, bits=8, group=32)
    q, s = Q.quantize_blocks(W, 32)
    wq, sq = np.ascontiguousarray(q.T), np.ascontiguousarray(s.T)
    # to float32 rounding: fake_quant's q·s is rounded to the scales' dtype, the packed op's is not
    np.testing.assert_allclose(Q.linear_q8_0(x, wq, sq, b), xq @ Wf + b, rtol=1e-6, atol=1e-7)
    g = rng.standard_normal((2, 3, 24))
    gx, _, _, gb = Q.linear_q8_0_vjp((g,), (x, wq, sq, b), None, block=32)
    (gx_act,) = ops.get("fake_quant_act").vjp((g @ Wf.T,), (x,), (xq,), group=32)
    np.testing.assert_allclose(gx, gx_act, rtol=1e-6, atol=1e-7)
    assert np.abs(gx - g @ W.T).max() > 1e-4                 # the rounded weights, not the float ones
    np.testing.assert_allclose(gb, g.reshape(-1, 24).sum(0))


def test_fake_quant_act_shape_rule():
    infer = ops.get("fake_quant_act").infer
    assert infer([(2, 5, 64)], ["float32"], group=32) == [((2, 5, 64), "float32")]
    with pytest.raises(ShapeError, match="fake_quant_act.*group size 24 does not divide the last axis 64"):
        infer([(2, 64)], ["float32"], group=24)
    with pytest.raises(ShapeError, match="fake_quant_act.*must be float"):
        infer([(2, 64)], ["int8"], group=32)


# ------------------------------------------------------------------------------- the rewrite
@pytest.mark.parametrize("spec, packed_ops", [
    ("quant:int4,group=16", {"linear_q4", "embedding_q4"}),
    ("quant:int4,group=16,embeddings=int8", {"linear_q4", "embedding_q8"}),
    ("quant:int8", {"linear_q8_0", "embedding_q8"}),
    ("quant:int8_block,block=16,embeddings=false", {"linear_q8_0"}),
    ("quant:w8a8", {"linear_q8_0", "embedding_q8"}),
])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_graph_computes_what_the_fake_quant_graph_computed(arch, spec, packed_ops):
    m = Model.from_config(models.preset(arch, "tiny"), seed=2)
    fq = qat.fake_quant_model(m, spec)
    assert set(fq.graph.params) == set(m.graph.params)                   # the float weights, trainable
    n_linear = sum(n.op == "linear" for n in m.graph.nodes)
    n_fq = sum(n.op == "fake_quant" for n in fq.graph.nodes)
    assert n_fq >= n_linear + ("embeddings=false" not in spec)
    packed = plugin.optimize(m, [spec], validate=False)
    assert packed_ops <= {n.op for n in packed.graph.nodes}
    x = np.random.default_rng(0).integers(0, m.vocab_size, (2, 24))
    logits = [Executor(mm.graph, mm.params).run(tr.batch_feeds(mm.graph, x), outputs=["logits"])["logits"]
              for mm in (packed, fq, m)]
    scale = np.abs(logits[0]).max()
    same = np.abs(logits[0] - logits[1]).max(-1) <= 1e-5 * scale     # per position: packed == fake quant
    if "linear_q8_0" in packed_ops:
        # Activations are rounded in both graphs (fake_quant_act / linear_q8_0), from inputs equal
        # to float rounding; one that lies at a rounding boundary may round apart, which changes the
        # positions after it by about one activation step. Rare, but it happens (llama, block 16).
        assert fq.graph.nodes and any(n.op == "fake_quant_act" for n in fq.graph.nodes)
        assert same.mean() >= 0.75, same.mean()
    else:
        assert same.all()
        assert qat.packed_vs_fake_quant(packed, fq) <= 1e-5 * scale
    assert np.abs(logits[0] - logits[2]).max() > 1e-4 * scale           # and both differ from float


@pytest.mark.parametrize("text, match", [
    ("quant:float16,qat=true", "qat=true supports the modes"),
    ("quant:int4,qat=true,kv=int8", "without kv=int8"),
    ("quant:int4,qat=maybe", "bad value 'maybe' for qat"),
])
def test_bad_qat_options_are_one_line_errors(text, match):
    with pytest.raises(MinitxError, match=match) as e:
        plugin.parse_spec(text)
    assert "\n" not in str(e.value)


def test_split_spec():
    assert qat.split_spec("quant:int4,group=16") == ("quant:int4,group=16,qat=true", "quant:int4,group=16")
    assert qat.split_spec("quant:mode=int8,qat=true") == ("quant:mode=int8,qat=true", "quant:mode=int8")
    assert qat.split_spec("quant") == ("quant:qat=true", "quant")
    for bad, match in [("sparsity:weights=magnitude", "needs the quant plugin"), ("quant:float16", "supports the modes"),
                       ("quant:int4,group=7", "even")]:
        with pytest.raises(MinitxError, match=match):
            qat.split_spec(bad)


# ------------------------------------------------------------------ QAT against post-training quant
V = 32


def _markov_ids(n: int, seed: int = 0) -> np.ndarray:
    """A token stream from a fixed random Markov chain (two likely successors per token)."""
    rng = np.random.default_rng(seed)
    P = np.full((V, V), 0.01 / V)
    for i in range(V):
        P[i, rng.choice(V, 2, replace=False)] += rng.dirichlet([0.3, 0.3])
    C = (P / P.sum(1, keepdims=True)).cumsum(1)
    ids, u = np.zeros(n, np.int64), rng.random(n)
    for t in range(1, n):
        ids[t] = min(np.searchsorted(C[ids[t - 1]], u[t]), V - 1)
    return ids


def _settings(**kw) -> tr.TrainSettings:
    base = dict(steps=200, batch_size=16, lr=2e-2, min_lr=2e-3, warmup=10, eval_every=0, val_fraction=0.1, seed=0)
    return tr.TrainSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def trained():
    """A 1-layer GPT-2 (d 32) trained 200 steps on the chain: the float starting point."""
    ids = _markov_ids(12000)
    cfg = models.complete_config({"arch": "gpt2", "vocab_size": V, "n_ctx": 16, "d_model": 32, "n_layers": 1,
                                  "n_heads": 2, "d_ff": 64})
    st = tr.fit(tr.fresh_model(cfg, None, _settings()), ids)
    return st.model, ids


def test_qat_beats_post_training_int4(trained):
    m, ids = trained
    spec = "quant:int4,group=32"                      # one scale per 32 inputs (d_model 32: per channel)
    s = _settings(steps=30, lr=3e-3, min_lr=3e-4, warmup=3)
    val = qat.held_out(ids, s, m.n_ctx)
    before = {k: a.copy() for k, a in m.params.items()}
    res = qat.run(m, ids, spec, s, force=True)
    assert all(np.array_equal(before[k], m.params[k]) for k in before)   # the float model is untouched

    ppl = lambda mm: tr.evaluate(mm, val)["perplexity"]  # noqa: E731
    ptq = plugin.optimize(m, [spec], validate=False)
    # the fair control: the same 30 steps in float (same batches, schedule), then post-training int4
    ctrl = tr.new_state(Model(m.config, {k: a.copy() for k, a in m.params.items()}, m.graph), s)
    tr.fit(ctrl, ids)
    ctrl_ptq = plugin.optimize(ctrl.model, [spec], validate=False)
    p_float, p_ptq, p_qat, p_ctrl = ppl(m), ppl(ptq), ppl(res.packed), ppl(ctrl_ptq)
    print(f"held-out perplexity: float {p_float:.4f}, PTQ {p_ptq:.4f}, float fine-tune + PTQ {p_ctrl:.4f}, "
          f"QAT {p_qat:.4f}")
    assert p_ptq > p_float                          # int4 costs perplexity
    assert p_qat < p_ptq                            # the requirement
    # Against the fine-tuned control int4 is no fair test here: it costs this small model about 0.1%
    # of perplexity, so the extra float steps decide it, and their order of summation (BLAS threads)
    # flips it. Where rounding costs the model something real, QAT must beat the control:
    # tests/test_quant_lowbit.py::test_qat_recovers_ternary_and_binary.
    assert {"linear_q4", "embedding_q4"} <= {n.op for n in res.packed.graph.nodes}
    assert res.packed_vs_fake_quant <= 1e-5
    assert res.packed.meta["qat"]["steps"] == 30 and res.packed.meta["rewrites"][-1]["spec"] == spec


# ---------------------------------------------------------------------------------------- resume
def _tiny():
    cfg = models.complete_config({"arch": "gpt2", "vocab_size": V, "n_ctx": 16, "d_model": 16, "n_layers": 1,
                                  "n_heads": 2, "d_ff": 32})
    return Model.from_config(cfg, seed=1), _markov_ids(1500)


def test_interrupted_qat_resumes_bit_for_bit(tmp_path):
    m, ids = _tiny()
    spec = "quant:int4,group=16"
    def s():
        return _settings(steps=4, batch_size=4, warmup=1, eval_every=2, eval_batches=1, checkpoint_every=2)
    fine, _, straight = qat.finetune(m, ids, spec, s())

    ckpt = str(tmp_path / "q.ckpt.npz")

    def interrupt(rec):
        if rec["step"] == 3:          # after the checkpoint at step 2, before the one at step 4
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        qat.finetune(m, ids, spec, s(), checkpoint=ckpt, progress=interrupt)
    st = qat.resume(ckpt, m, spec + ",min_cosine=0.5")   # a conversion tolerance is not part of training
    assert st.step == 2 and st.kind == "qat" and "fake_quant" in {n.op for n in st.model.graph.nodes}
    fine2, _, resumed = qat.finetune(m, ids, spec, s(), state=st)
    assert resumed.step == 4 and resumed.history == straight.history
    for a, b in [(fine.params, fine2.params), (straight.opt.m, resumed.opt.m), (straight.opt.v, resumed.opt.v)]:
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert not np.array_equal(fine.params["layers.0.mlp.up.weight"], m.params["layers.0.mlp.up.weight"])

    other = Model(m.config, {k: a * np.float32(1.01) for k, a in m.params.items()}, m.graph)
    plug = r"made with --plugin quant:int4,group=16 \(sha256 \w+\), not quant:int8 \("
    for model, text, msg in [(m, "quant:int8", plug),
                             (m, "quant:int4,group=8", "--plugin"),
                             (other, spec, "made with model")]:
        with pytest.raises(MinitxError, match=msg):
            qat.resume(ckpt, model, text)
    with pytest.raises(MinitxError, match="made with --data"):
        qat.finetune(m, ids[:-5], spec, s(), state=qat.resume(ckpt, m, spec))
    with pytest.raises(MinitxError, match="a `minitx qat` checkpoint; resume it with `minitx qat --resume`"):
        tr.load_checkpoint(ckpt)


# ------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A tiny decoder with a tokenizer, saved, and a text to score it on."""
    d = tmp_path_factory.mktemp("qat")
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "house", "red", "big", "small"]
    text = " ".join(words[i % len(words)] for i in _markov_ids(3000, seed=1)) + "\n"
    (d / "text.txt").write_text(text, encoding="utf-8")
    tok = data.train_tokenizer(text, 300)
    cfg = models.complete_config({"arch": "gpt2", "vocab_size": 300, "n_ctx": 32, "d_model": 32, "n_layers": 1,
                                  "n_heads": 2, "d_ff": 64})
    st = tr.fit(tr.fresh_model(cfg, tok, _settings(steps=20, batch_size=8)), data.encode(tok, text))
    modelfile.save(st.model, str(d / "m.npz"))
    return d


def test_eval_with_plugin_prints_both_perplexities_and_the_delta(model_file):
    d = model_file
    r = CliRunner().invoke(main, ["eval", str(d / "m.npz"), "--data", str(d / "text.txt"), "--plugin", "quant:int4,group=16"])
    assert r.exit_code == 0, r.output
    assert "with quant:int4,group=16" in r.output and "delta" in r.output
    r = CliRunner().invoke(main, ["eval", str(d / "m.npz"), "--data", str(d / "text.txt"), "--plugin", "quant:int8",
                                  "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    base = tr.evaluate(modelfile.load(str(d / "m.npz")), data.encode(modelfile.load(str(d / "m.npz")).tokenizer_json,
                                                                       (d / "text.txt").read_text()))
    assert math.isclose(res["perplexity"], base["perplexity"], rel_tol=1e-9)
    assert res["rewritten"]["perplexity"] != res["perplexity"]
    assert math.isclose(res["delta_perplexity"], res["rewritten"]["perplexity"] - res["perplexity"], rel_tol=1e-9)


def test_qat_command_converts_and_compares(model_file, tmp_path):
    d = model_file
    out = tmp_path / "q.npz"
    r = CliRunner().invoke(main, ["qat", str(d / "m.npz"), "--data", str(d / "text.txt"), "--plugin",
                                  "quant:int4,group=16", "--steps", "4", "--batch", "4", "--val-fraction", "0.2",
                                  "--validate", "ids:5,6,7,8,9,10", "-o", str(out), "--json", "--force"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output.strip().splitlines()[-1])
    assert rep["plugin"] == "quant:int4,group=16" and rep["steps"] == 4
    assert rep["validation"]["calibration"] == "--validate ids; disjoint from the calibration input"
    assert rep["validation"]["n_sequences"] == 1
    assert {"float_perplexity", "ptq_perplexity", "qat_perplexity"} <= set(rep)
    assert rep["packed_vs_fake_quant_max_abs"] <= 1e-4
    q = modelfile.load(str(out))
    assert "linear_q4" in {n.op for n in q.graph.nodes} and "fake_quant" not in {n.op for n in q.graph.nodes}
    assert q.meta["qat"]["steps"] == 4


def test_cli_qat_interrupt_resume_matches_straight_run(model_file, tmp_path, monkeypatch, interrupt_at):
    d = model_file
    common = ["qat", str(d / "m.npz"), "--data", str(d / "text.txt"), "--plugin", "quant:int8", "--steps", "3",
              "--batch", "2", "--seq", "8", "--checkpoint-every", "1", "--no-compare", "--force"]
    assert CliRunner().invoke(main, [*common, "-q", "-o", str(tmp_path / "a.npz")]).exit_code == 0
    interrupt_at(2)
    r = CliRunner().invoke(main, [*common, "-o", str(tmp_path / "b.npz")])
    assert r.exit_code == 130 and not (tmp_path / "b.npz").exists()
    monkeypatch.undo()
    ckpt = str(tmp_path / "b.ckpt.npz")
    r = CliRunner().invoke(main, [*common, "-q", "-o", str(tmp_path / "b.npz"), "--resume", ckpt])
    assert r.exit_code == 0, r.output
    a, b = modelfile.load(str(tmp_path / "a.npz")), modelfile.load(str(tmp_path / "b.npz"))
    assert b.meta["qat"]["steps"] == 3 and "linear_q8" in {n.op for n in b.graph.nodes}
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)
    for plug, extra, msg in [("quant:int4", [], "made with --plugin quant:int8 (sha256"),
                             ("quant:int8", ["--seed", "5"], "made with --seed 0, not 5")]:
        args = [plug if a == "quant:int8" else a for a in common]
        r = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "c.npz"), "--resume", ckpt, *extra])
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and msg in lines[0], r.output
    assert not (tmp_path / "c.npz").exists()


@pytest.mark.parametrize("args, match", [
    (["qat", "--plugin", "quant:bfloat16"], "supports the modes"),
    (["qat", "--plugin", "lowrank:rank=4"], "needs the quant plugin"),
    (["qat", "--plugin", "quant:int4,bogus=1"], "unknown option 'bogus'"),
    (["qat", "--plugin", "quant:int8", "--validate", "file:nope.txt"], "--validate 'file:nope.txt': no such file"),
    (["qat", "--plugin", "quant:int8", "--rounding", "gptq"], "--rounding gptq rounds every linear for int4"),
    (["qat", "--plugin", "quant:int4,skip=lm_head", "--rounding", "gptq"], "needs --plugin quant:int4"),
    (["eval", "--plugin", "quant:int3"], "bad value 'int3'"),
    (["eval", "--plugin", "quant:kv8"], "changes the model's inputs"),
])
def test_bad_options_are_one_line_errors(model_file, tmp_path, args, match):
    d = model_file
    extra = ["-o", str(tmp_path / "x.npz")] if args[0] == "qat" else []
    r = CliRunner().invoke(main, [args[0], str(d / "m.npz"), "--data", str(d / "text.txt"), *args[1:], *extra])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], r.output
    assert not (tmp_path / "x.npz").exists()


def test_qat_refuses_an_already_quantized_model(model_file, tmp_path):
    d = model_file
    q8 = plugin.optimize(modelfile.load(str(d / "m.npz")), ["quant:int8"], validate=False)
    modelfile.save(q8, str(tmp_path / "q8.npz"))
    r = CliRunner().invoke(main, ["qat", str(tmp_path / "q8.npz"), "--data", str(d / "text.txt"), "--plugin",
                                  "quant:int4", "-o", str(tmp_path / "y.npz")])
    assert r.exit_code == 2 and "already rewritten" in r.output


# ------------------------------------------------------------------------- GPTQ-rounded start
def test_gptq_start_rounds_every_linear_on_training_windows_only(model_file):
    from minitx.training import rounding

    m = modelfile.load(str(model_file / "m.npz"))
    ids = data.encode(m.tokenizer_json, (model_file / "text.txt").read_text())
    s = _settings(seq_len=16, val_fraction=0.2)
    start = rounding.gptq_start(m, ids, "quant:int4,group=16", s)
    lin = [n.inputs[1] for n in start.graph.nodes if n.op == "linear"]
    assert lin and all(rounding.check_repacks(start.params[k], 16) == 0.0 for k in lin)   # on int4's grid
    assert any(not np.array_equal(start.params[k], m.params[k]) for k in lin)
    assert start.meta["rounding"]["method"] == "gptq" and start.meta["rounding"]["sequences"] > 1
    # the held-out tail (scored after QAT) is never measured: another tail, the same start
    other = ids.copy()
    n_val = len(ids) - len(data.split(ids, 0.2, 16)[0])
    other[-n_val:] = np.random.default_rng(0).integers(0, m.vocab_size, n_val)
    again = rounding.gptq_start(m, other, "quant:int4,group=16", s)
    assert all(np.array_equal(again.params[k], start.params[k]) for k in lin)
    other[:16] = (other[:16] + 1) % m.vocab_size          # while the training windows count
    moved = rounding.gptq_start(m, other, "quant:int4,group=16", s)
    assert any(not np.array_equal(moved.params[k], start.params[k]) for k in lin)


def test_qat_command_from_a_gptq_start_reports_it_and_resumes_only_with_it(model_file, tmp_path):
    d = model_file
    common = ["qat", str(d / "m.npz"), "--data", str(d / "text.txt"), "--plugin", "quant:int4,group=16",
              "--steps", "2", "--batch", "4", "--seq", "16", "--val-fraction", "0.2", "--checkpoint-every", "1"]
    r = CliRunner().invoke(main, [*common, "--rounding", "gptq", "-o", str(tmp_path / "g.npz"), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output.strip().splitlines()[-1])
    assert rep["rounding"] == "gptq" and rep["validation"]["passed"]
    assert {"float_perplexity", "ptq_perplexity", "gptq_perplexity", "qat_perplexity"} <= set(rep)
    assert rep["gptq_perplexity"] != rep["ptq_perplexity"]
    q = modelfile.load(str(tmp_path / "g.npz"))
    assert q.meta["qat"]["rounding"]["method"] == "gptq" and "linear_q4" in {n.op for n in q.graph.nodes}
    r = CliRunner().invoke(main, [*common, "-o", str(tmp_path / "n.npz"), "--resume", str(tmp_path / "g.ckpt.npz")])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "made with --rounding gptq, not nearest" in lines[0], r.output
    assert not (tmp_path / "n.npz").exists()
