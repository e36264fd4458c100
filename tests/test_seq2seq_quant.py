"""kv=int8 on encoder–decoders: every cache int8 — the decoder's self-attention K/V (T5's, beside
its relative position bias, too) and the cross-attention K/V, quantized once where the encoder
part makes them.

Golden outputs are transformers' (tests/fixtures/reference-seq2seq-*.npz, scripts/make_fixtures.py);
the stated bound on the int8 model's teacher-forced logits is 1e-2 of the largest |logit| of the
float model (measured: T5 4.6e-3, BART 1.9e-3, Marian 3.0e-3).
"""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from minitx import models, modelfile, seq2seq
from minitx.cachebytes import cache_bytes
from minitx.cli import main
from minitx.model import Model
from minitx.plugin import optimize

# the families, their converted fixtures and the id-row reader of the float seq2seq tests
from test_seq2seq import ARCHS, _rows, converted  # noqa: E402,F401 — converted: a pytest fixture

BOUND = 1e-2   # int8 caches vs float: max |Δ logit| / max |logit|


def _kv8(m: Model, **opts: str) -> Model:
    extra = "".join(f",{k}={v}" for k, v in opts.items())
    return optimize(m, [f"quant:none,kv=int8{extra}"], warn=lambda s: None)   # validated: raises past tolerance


@pytest.fixture(scope="module")
def models_(converted, tmp_path_factory):
    """Per family: the converted float model (test_seq2seq's fixture), its kv=int8 rewrite, the
    transformers reference and the rewrite's file."""
    d = tmp_path_factory.mktemp("s2skv")
    out = {}
    for arch in ARCHS:
        _, m, ref = converted[arch]
        q = _kv8(m)
        qp = str(d / f"{arch}.kv8.npz")
        modelfile.save(q, qp)
        out[arch] = (m, q, ref, qp)
    return out


def _layers(m: Model) -> int:
    return models.transformer.n_decoder_layers(m.config)


def _check_graph(m: Model, q: Model) -> None:
    """No cross_attention or attention reads a float cache any more; each cache has its scales."""
    L = _layers(q)
    ops = [n.op for n in q.graph.nodes]
    t5 = q.config["arch"] == "t5"
    assert ops.count("cross_attention_kv8") == L * (2 if t5 else 1)
    assert ops.count("attention_kv8") == (0 if t5 else L)
    reads = {i for n in q.graph.nodes if n.op in ("cross_attention", "attention") for i in n.inputs}
    assert not any(i.startswith(("cross.", "present.", "past.")) for i in reads)
    declared = {v.name: v for v in q.graph.inputs}
    for i in range(L):
        for t in "kv":
            assert declared[f"past.{i}.{t}"].dtype == "int8" and f"past.{i}.{t}_scale" in declared
            assert f"present.{i}.{t}_scale" in q.graph.outputs
    # The cross K/V are rounded in the encoder part, once per input: the decoder takes them as int8.
    enc, dec = seq2seq.split(q.graph)
    assert sum(n.op == "quantize_heads" for n in enc.nodes) == 2 * L
    assert all(n.op != "quantize_heads" or t5 for n in dec.nodes)
    cross_in = {v.name: v.dtype for v in dec.inputs if v.name.startswith("cross.")}
    assert cross_in == {f"cross.{i}.{t}{s}": ("int8" if not s else "float32")
                        for i in range(L) for t in "kv" for s in ("", "_scale")}


def _check_bytes(q: Model, srcs, backends=("numpy",)) -> None:
    """The caches handed between steps really are int8 (1 byte a value) plus a float32 scale per
    token and head, and cachebytes (show, bench) counts exactly them."""
    cross, mask = seq2seq.encode(q, srcs, backends, True)
    lg, past = seq2seq.decode_step(q, np.zeros((len(srcs), 1), np.int64), {}, cross, mask, backends, True)
    _, past = seq2seq.decode_step(q, lg[:, -1].argmax(-1)[:, None], past, cross, mask, backends, True)
    H = q.config["n_heads"]
    for state, S in ((cross, mask.shape[1]), (past, 2)):
        for k, a in state.items():
            if k.endswith("_scale"):
                assert a.dtype == np.float32 and a.shape == (len(srcs), S, H)
            else:
                assert a.dtype == np.int8 and a.nbytes == a.size and state[f"{k}_scale"].shape[1] == S
    want = cache_bytes(q.graph, len(srcs), 2, mask.shape[1])
    assert want == {"self": sum(a.nbytes for a in past.values()), "cross": sum(a.nbytes for a in cross.values())}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_cache_is_int8(models_, arch):
    m, q, g, _ = models_[arch]
    _check_graph(m, q)
    _check_bytes(q, _rows(g["sources"]))
    fl, qb = cache_bytes(m.graph, 1, 64, 64), cache_bytes(q.graph, 1, 64, 64)
    # int8 values (a quarter of float32) plus one 4-byte scale per head of D values
    D = m.graph.params["layers.0.cross.q.weight"].shape[1] // m.config["n_heads"]
    for part in ("self", "cross"):
        assert qb[part] == fl[part] // 4 + fl[part] // D


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_stay_within_the_bound_and_outputs_equal_transformers(models_, arch):
    m, q, g, _ = models_[arch]
    srcs = _rows(g["sources"])
    ref = seq2seq.logits(m, srcs, g["targets"])
    got = seq2seq.logits(q, srcs, g["targets"])
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert 0 < err <= BOUND   # rounded (not a no-op), within the bound
    # Greedy and beam search on the int8 caches still give transformers' float outputs here.
    assert seq2seq.generate(q, srcs, 12) == _rows(g["greedy"])
    assert seq2seq.generate(q, srcs, 12, beams=3) == _rows(g["beam3"])


@pytest.mark.parametrize("arch", ARCHS)
def test_numba_runs_every_int8_node_as_the_spec_does(models_, arch):
    pytest.importorskip("numba")
    _, q, g, _ = models_[arch]
    srcs, nb = _rows(g["sources"]), ("numba",)
    spec = seq2seq.logits(q, srcs, g["targets"])
    got = seq2seq.logits(q, srcs, g["targets"], backends=nb, strict=True)
    assert np.abs(got - spec).max() / np.abs(spec).max() <= 1e-5
    assert seq2seq.generate(q, srcs, 12, beams=3, backends=nb, strict=True) == seq2seq.generate(q, srcs, 12, beams=3)
    _check_bytes(q, srcs, nb)


def test_t5_int8_cached_decoding_equals_teacher_forcing(models_):
    """Each token's K/V is rounded with its own scales whether it arrives in a step or in a whole
    teacher-forced sequence, so the int8 cache decodes step by step to the full forward's logits."""
    _, q, g, _ = models_["t5"]
    srcs, tgt = _rows(g["sources"]), g["targets"]
    full = seq2seq.logits(q, srcs, tgt)
    for backends in (("numpy",), ("numba",)):
        cross, mask = seq2seq.encode(q, srcs, backends)
        past, steps = {}, []
        for t in range(tgt.shape[1]):
            lg, past = seq2seq.decode_step(q, tgt[:, t:t + 1], past, cross, mask, backends)
            steps.append(lg[:, 0])
        np.testing.assert_allclose(np.stack(steps, 1), full, rtol=0, atol=1e-5 * np.abs(full).max())


@pytest.mark.parametrize("prenorm", [False, True])
def test_plain_transformer_family(prenorm):
    m = Model.from_config({**models.preset("transformer", "tiny"), "prenorm": prenorm, "n_ctx": 32}, seed=0)
    q = _kv8(m)
    _check_graph(m, q)
    rng = np.random.default_rng(0)
    srcs = [rng.integers(2, 500, n).tolist() for n in (7, 4, 9)]
    tgt = rng.integers(2, 500, (3, 6))
    ref, got = seq2seq.logits(m, srcs, tgt), seq2seq.logits(q, srcs, tgt)
    assert 0 < np.abs(got - ref).max() / np.abs(ref).max() <= BOUND
    _check_bytes(q, srcs)
    out = seq2seq.generate(q, srcs, 6, beams=2)
    assert out == seq2seq.generate(q, srcs, 6, beams=2, backends=("numba",), strict=True)
    assert all(1 <= len(r) <= 6 for r in out)


def test_skip_keeps_a_cache_and_its_readers_float(models_):
    """skip= on one layer's cross-attention leaves that layer's cross K/V float (the cache and its
    reader change together or not at all); the other layer's still become int8."""
    m, _, g, _ = models_["bart"]
    q = _kv8(m, skip="layers.0.cross.sdpa")
    enc, _ = seq2seq.split(q.graph)
    cross, _ = seq2seq.encode(q, _rows(g["sources"]))
    assert cross["cross.0.k"].dtype == np.float32 and "cross.0.k_scale" not in cross
    assert cross["cross.1.k"].dtype == np.int8 and "cross.1.k_scale" in cross
    assert seq2seq.generate(q, _rows(g["sources"]), 12) == _rows(g["greedy"])


def test_show_and_bench_report_the_cache_bytes(models_):
    from minitx import bench

    m, q, _, qp = models_["t5"]
    res = CliRunner().invoke(main, ["show", qp, "--seq", "8", "--past", "4"])
    assert res.exit_code == 0, res.output
    # 12 decoder tokens of 8-token sources, batch 1, 2 layers × (K, V), width 24 in 4 heads:
    # self 2·2·12·(24 + 4·4) bytes = 1920 = 1.9 KiB; cross 2·2·8·(24 + 16) = 1280 = 1.2 KiB
    assert "caches after 12 decoder tokens of 8-token sources, batch 1: self-attention 1.9 KiB, " \
           "cross-attention 1.2 KiB" in res.output
    out = bench.run("t5.npz", ["numpy"], plugin_sets=[[], ["quant:none,kv=int8"]], model=m,
                    settings=bench.Settings(repeat=1, warmup=0, batch=2, prompt_len=5, new_tokens=3))
    flt, kv8 = out["rows"]
    assert flt["status"] == kv8["status"] == "ok"
    # batch 1 after 3 decoder tokens of 5-token sources: float32 values, or int8 + a float32 per head
    assert flt["cache_bytes"] == {"self": 2 * 2 * 3 * 24 * 4, "cross": 2 * 2 * 5 * 24 * 4}
    assert kv8["cache_bytes"] == {"self": 2 * 2 * 3 * 40, "cross": 2 * 2 * 5 * 40}
    assert "cache KiB b=1" in bench.table(out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_quantize_heads_rounds_exactly_as_the_spec(dtype):
    """Bit for bit, on values whose quotient x / s lands on .5 (NumPy rounds those to even; numba's
    scalar rint away from zero) and on random ones, in both the parallel and the serial build."""
    pytest.importorskip("numba")
    from backends.numba_cpu.cross_attention import _QUANTIZE
    from minitx.ops.quant import quantize_heads

    ties = np.arange(-127, 128, 0.5)[None, None, :508] / 7              # 4 heads of 127: x / s = k / 2
    rng = np.random.default_rng(0)
    for x in (ties.repeat(3, 1), rng.standard_normal((3, 5, 32)), rng.standard_normal((2, 3, 16)) * 1e-40,
              np.zeros((1, 2, 8))):
        x = x.astype(dtype)
        H = 4
        want_q, want_s = quantize_heads(x, H)
        for f in _QUANTIZE:
            q = np.empty((x.shape[0] * x.shape[1], H, x.shape[2] // H), np.int8)
            s = np.empty((x.shape[0] * x.shape[1], H), dtype)
            f(np.ascontiguousarray(x).reshape(q.shape), q, s)
            np.testing.assert_array_equal(q.reshape(x.shape), want_q)
            np.testing.assert_array_equal(s.reshape(want_s.shape), want_s)
