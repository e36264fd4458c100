"""Mixed-precision training: float16/bfloat16 compute with float32 master weights and dynamic loss
scaling — the loss falls as in float32, overflowing steps are skipped, the scale moves, the
executor really computes in the low precision, and resume stays bit for bit."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from minitx import models
from minitx import training as tr
from minitx.backend import Backend, spec_backend
from minitx.errors import MinitxError
from minitx.executor import Executor
from minitx.model import Model
from minitx.precision import LossScaler, Precision, round_to_bfloat16

TINY = {"arch": "gpt2", "vocab_size": 12, "n_ctx": 16, "d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32}
LLAMA = {"arch": "llama", "vocab_size": 12, "n_ctx": 16, "d_model": 16, "n_layers": 1, "n_heads": 2,
         "n_kv_heads": 1, "d_ff": 24}


def _ids(n: int = 2000) -> np.ndarray:
    return (np.arange(n) % 10).astype(np.int64)


def _settings(**kw) -> tr.TrainSettings:
    base = dict(steps=6, batch_size=4, seq_len=12, lr=1e-2, min_lr=1e-3, warmup=2, eval_every=3, eval_batches=1,
                checkpoint_every=3, val_fraction=0.1, seed=3)
    return tr.TrainSettings(**{**base, **kw})


def _is_bfloat16(a: np.ndarray) -> bool:
    return a.dtype == np.float32 and not (a.view(np.uint32) & np.uint32(0xFFFF)).any()


class _Spy(Backend):
    """The spec, recording the dtype of every float array each forward kernel receives."""

    name = "spy"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, np.ndarray]] = []
        spec = spec_backend()
        self.vjps = dict(spec.vjps)
        for op, f in spec.kernels.items():
            self.kernels[op] = self._spied(op, f)

    def _spied(self, op, f):
        def run(*args, **attrs):
            self.seen += [(op, a) for a in args if isinstance(a, np.ndarray) and a.dtype.kind == "f"]
            return f(*args, **attrs)

        return run


# ------------------------------------------------------------------------- learning
@pytest.mark.parametrize("cfg", [TINY, LLAMA], ids=["gpt2", "llama"])
@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_loss_falls_and_ends_close_to_float32(cfg, precision):
    runs = {}
    for p in ("float32", precision):
        st = tr.fresh_model(models.complete_config(cfg), None,
                          _settings(steps=40, eval_every=40, lr=2e-2, warmup=4, precision=p))
        losses: list[float] = []
        tr.fit(st, _ids(), progress=lambda r: losses.append(r["loss"]))
        runs[p] = (losses, st)
    l32, st32 = runs["float32"]
    lo, st = runs[precision]
    assert lo[0] > 2.0 and np.mean(lo[-5:]) < 0.2 * lo[0]          # it learns
    assert abs(np.mean(lo[-5:]) - np.mean(l32[-5:])) < 0.02          # about as well as float32
    assert st.history[-1]["val_loss"] == pytest.approx(st32.history[-1]["val_loss"], abs=0.02)
    assert st.scaler is not None and st.scaler.skipped == 0
    # The runs really differ (so the precision was not ignored), but only by rounding.
    w32, w = st32.model.params["layers.0.attn.out.weight"], st.model.params["layers.0.attn.out.weight"]
    assert not np.array_equal(w32, w) and np.abs(w32 - w).max() < 0.05


def test_master_weights_and_optimizer_state_stay_float32(tmp_path):
    st = tr.fresh_model(models.complete_config(TINY), None, _settings(steps=3, precision="float16"))
    ck = tmp_path / "c.npz"
    tr.fit(st, _ids(), checkpoint=str(ck))
    assert {a.dtype for a in st.model.params.values()} == {np.dtype(np.float32)}
    assert {a.dtype for a in [*st.opt.m.values(), *st.opt.v.values()]} == {np.dtype(np.float32)}
    with np.load(ck, allow_pickle=False) as z:
        assert {z[k].dtype for k in z.files if k.startswith(("param.", "opt."))} == {np.dtype(np.float32)}


# ---------------------------------------------------------------- what the executor ran
def test_float16_training_computes_in_float16():
    spy = _Spy()
    st = tr.fresh_model(models.complete_config(LLAMA), None, _settings(steps=1, precision="float16"))
    st.settings.val_fraction = 0.0   # no held-out pass (which reads the float32 masters)
    tr.fit(st, _ids(), backends=[spy])
    assert len(spy.seen) > 20
    assert {str(a.dtype) for _, a in spy.seen} == {"float16"}, sorted({(op, str(a.dtype)) for op, a in spy.seen})


def test_bfloat16_training_rounds_every_value_to_bfloat16():
    spy = _Spy()
    st = tr.fresh_model(models.complete_config(TINY), None, _settings(steps=1, precision="bfloat16"))
    st.settings.val_fraction = 0.0
    tr.fit(st, _ids(), backends=[spy])
    assert len(spy.seen) > 20
    bad = sorted({op for op, a in spy.seen if not _is_bfloat16(a)})
    assert bad == [], bad
    # The spy itself, without the emulation, sees values that are not bfloat16.
    spy.seen = []
    m = Model.from_config(models.complete_config(TINY), seed=0)
    Executor(m.graph, m.params, [spy]).run(tr.batch_feeds(m.graph, _ids(12)[None]))
    assert not all(_is_bfloat16(a) for _, a in spy.seen)


def test_bfloat16_on_numba_wraps_its_kernels():
    pytest.importorskip("numba")
    prec = Precision("bfloat16")
    run_on = prec.backends(["numba"])
    assert [b.name for b in run_on] == ["numba+bf16", "numpy+bf16"]
    m = Model.from_config(models.complete_config(LLAMA), seed=0)
    ex = Executor(prec.graph(models.with_loss(m.graph)), prec.params(m.params), run_on)
    where = {op: b for _, op, b in ex.explain()}
    assert where["linear"] == "numba+bf16" and where["cross_entropy"] in ("numba+bf16", "numpy+bf16")
    x = _ids(12)[None]
    feeds = tr.batch_feeds(ex.graph, x, (x + 1) % 10, cache_dtype=prec.dtype)
    res = ex.forward_backward(feeds, loss_grad=4.0)
    # numba has no VJP for attention or rms_norm: the spec's ran on the host, rounded all the same.
    for k, g in res.grads.items():
        assert g.dtype == np.float32 and np.isfinite(g).all(), k
    assert _is_bfloat16(res.grads["layers.0.attn.qkv.weight"])
    ref = Executor(prec.graph(models.with_loss(m.graph)), prec.params(m.params), prec.backends(["numpy"]))
    want = ref.forward_backward(feeds, loss_grad=4.0)
    assert float(res.outputs["loss"]) == pytest.approx(float(want.outputs["loss"]), rel=1e-2)
    for k, g in want.grads.items():
        np.testing.assert_allclose(res.grads[k], g, rtol=0.05, atol=0.05 * float(np.abs(g).max()), err_msg=k)


def test_float16_activations_via_run_keep():
    m = Model.from_config(models.complete_config(TINY), seed=0)
    prec = Precision("float16")
    ex = Executor(prec.graph(models.with_loss(m.graph)), prec.params(m.params), prec.backends(["numpy"]))
    x = _ids(12)[None]
    acts = [n.outputs[0] for n in ex.graph.nodes if n.op in ("layer_norm", "attention", "gelu")]
    out = ex.run(tr.batch_feeds(ex.graph, x, (x + 1) % 10, cache_dtype=prec.dtype), outputs=["loss", "logits"], keep=acts)
    assert ex.dtype == "float16" and len(acts) >= 3 and set(out) == {"loss", "logits", *acts}
    assert {k: str(a.dtype) for k, a in out.items()} == {k: "float16" for k in out}
    assert np.isfinite(out["loss"]) and abs(float(out["loss"]) - np.log(12)) < 0.1   # ≈ ln V at init


def _model_ops() -> list[str]:
    """The ops of the training graphs (decoders with dropout, plus the loss)."""
    return sorted({n.op for c in (TINY, LLAMA)
                   for n in models.with_loss(models.build_graph(models.complete_config(dict(c, dropout=0.1)))).nodes})


@pytest.mark.parametrize("op", _model_ops())
def test_model_ops_keep_float16(op):
    """Every op a model graph uses returns float16 from float16 inputs, forward and VJP (no silent
    upcast that would make a float16 graph compute in float32 after all)."""
    from minitx import conformance, ops

    spec = ops.get(op)
    cases = conformance.CASES.get(op) or []
    if op == "dropout":   # no conformance case (it is random): one by hand
        cases = [conformance.Case("p=0.5", lambda r, d: ((r.standard_normal((3, 8)).astype(d),), {"p": 0.5}))]
    assert cases, f"no float16 case for {op}"
    rng = np.random.default_rng(0)
    for case in cases:
        ins, attrs = case.make(rng, "float16")
        if spec.mode_dependent:
            attrs = {**attrs, "training": True, "step": 1}
        out = spec.forward(*ins, **attrs)
        outs = out if isinstance(out, tuple) else (out,)
        for o in outs:
            assert o.dtype.kind != "f" or o.dtype == np.float16, (op, case.name, "forward", o.dtype)
        gins = spec.vjp(tuple(np.ones_like(o) for o in outs), tuple(ins), outs, **attrs)
        for x, g in zip(ins, gins):
            if g is not None and getattr(x, "dtype", None) == np.float16:
                assert g.dtype == np.float16, (op, case.name, "vjp", g.dtype)


def test_bfloat16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(20000).astype(np.float32) * np.float32(1e3),
                        np.float32([0.0, -0.0, np.inf, -np.inf, 3.4e38, 1e-40, 1.00390625, 1.01171875])])
    want = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(round_to_bfloat16(x), want)
    assert round_to_bfloat16(np.arange(3)).dtype == np.int64        # non-float32 passes through


# -------------------------------------------------------------------------- loss scaling
@pytest.mark.parametrize("precision,scale", [("float16", 2.0 ** 17), ("bfloat16", 2.0 ** 129)])
def test_overflow_skips_the_step_and_lowers_the_scale(precision, scale):
    st = tr.fresh_model(models.complete_config(TINY), None, _settings(steps=2, grad_accum=2, precision=precision))
    st.scaler = LossScaler(scale=scale, max_scale=scale, backoff=0.25)   # beyond what the dtype holds
    before = {k: a.copy() for k, a in st.model.params.items()}
    recs: list[dict] = []
    tr.fit(st, _ids(), progress=recs.append)
    assert [r["skipped"] for r in recs] == [True, False]   # the first step overflowed, the second did not
    assert recs[0]["loss_scale"] == scale and recs[1]["loss_scale"] == scale / 4
    assert st.scaler.skipped == 1 and st.scaler.scale == scale / 4
    assert st.opt.t == 1                                   # only one AdamW update happened
    assert "skipped 1" in _progress_text(recs[-1])
    # The skipped step left the weights alone: replay only it.
    st1 = tr.fresh_model(models.complete_config(TINY), None, _settings(steps=1, grad_accum=2, precision=precision))
    st1.scaler = LossScaler(scale=scale, max_scale=scale)
    tr.fit(st1, _ids())
    for k, a in before.items():
        np.testing.assert_array_equal(st1.model.params[k], a, err_msg=k)
    assert st1.opt.t == 0 and all(not m.any() for m in st1.opt.m.values())


def test_scale_grows_after_the_interval():
    st = tr.fresh_model(models.complete_config(TINY), None,
                      _settings(steps=7, precision="float16", loss_scale=1024.0, loss_scale_growth_interval=3))
    recs: list[dict] = []
    tr.fit(st, _ids(), progress=recs.append)
    assert [r["loss_scale"] for r in recs] == [1024] * 3 + [2048] * 3 + [4096]
    assert st.scaler.scale == 4096 and st.scaler.good_steps == 1 and st.scaler.skipped == 0
    assert st.history[-1]["loss_scale"] == 4096


def test_scaler_rules():
    s = LossScaler(scale=2.0 ** 14, growth_interval=2, backoff=0.5, max_scale=2.0 ** 15)
    for overflow, want in [(False, 2 ** 14), (False, 2 ** 15), (False, 2 ** 15), (False, 2 ** 15),
                           (True, 2 ** 14), (False, 2 ** 14), (True, 2 ** 13)]:
        s.update(overflow)
        assert s.scale == want
    assert s.skipped == 2 and s.good_steps == 0
    assert LossScaler(scale=2.0 ** 40, max_scale=2.0 ** 15).scale == 2.0 ** 15
    assert Precision("float16").max_scale() == 2.0 ** 15
    g = LossScaler(scale=8.0).unscale({"w": np.full(3, 8.0, np.float16)})["w"]
    assert g.dtype == np.float32 and (g == 1.0).all()
    assert not LossScaler.finite({"a": np.ones(2), "b": np.array([1.0, np.nan])})


def _progress_text(rec: dict) -> str:
    import io

    buf = io.StringIO()
    tr.ProgressLine(int(rec["step"]), stream=buf)(rec)
    return buf.getvalue()


# ------------------------------------------------------------------------------- resume
def test_float16_resume_equals_straight_run_bit_for_bit(tmp_path):
    cfg = models.complete_config(dict(TINY, dropout=0.1))
    kw = dict(grad_accum=2, precision="float16", loss_scale=2.0 ** 13, loss_scale_growth_interval=2)
    straight = tr.fit(tr.fresh_model(cfg, None, _settings(**kw)), _ids())
    ckpt = str(tmp_path / "c.npz")

    def interrupt(rec):
        if rec["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tr.fit(tr.fresh_model(cfg, None, _settings(**kw)), _ids(), checkpoint=ckpt, progress=interrupt)
    with np.load(ckpt, allow_pickle=False) as z:
        meta = json.loads(z["__train__"].tobytes())
    assert meta["step"] == 3 and meta["scaler"]["good_steps"] == 1 and meta["scaler"]["scale"] == 2.0 ** 14
    resumed = tr.load_checkpoint(ckpt)
    assert resumed.settings.precision == "float16"
    tr.fit(resumed, _ids())
    assert resumed.step == straight.step == 6
    for k, a in straight.model.params.items():
        np.testing.assert_array_equal(resumed.model.params[k], a, err_msg=k)
    for k, a in straight.opt.v.items():
        np.testing.assert_array_equal(resumed.opt.v[k], a, err_msg=k)
    assert resumed.scaler == straight.scaler and straight.scaler.scale == 2.0 ** 15
    assert resumed.history == straight.history


def test_malformed_scaler_state_is_a_clean_error(tmp_path):
    st = tr.fresh_model(models.complete_config(TINY), None, _settings(precision="float16"))
    st.scaler = LossScaler()
    path = tmp_path / "c.npz"
    tr.save_checkpoint(path, st)
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["__train__"].tobytes())
    del meta["scaler"]["scale"]
    arrays["__train__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(path, **arrays)
    with pytest.raises(MinitxError, match="loss scaler"):
        tr.load_checkpoint(path)


@pytest.mark.parametrize("kw,msg", [({"precision": "float8"}, "--precision must be one of"),
                                    ({"loss_scale": 0.0}, "--loss-scale must be"),
                                    ({"loss_scale_backoff": 1.0}, "--loss-scale-backoff"),
                                    ({"loss_scale_growth_interval": 0}, "--loss-scale-growth-interval")])
def test_bad_settings(kw, msg):
    with pytest.raises(MinitxError, match=msg):
        tr.fresh_model(models.complete_config(TINY), None, _settings(**kw))


# ------------------------------------------------------------------------------- eval
@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_eval_in_low_precision_computes_in_it_and_stays_close(precision):
    st = tr.fresh_model(models.complete_config(LLAMA), None, _settings(steps=8, eval_every=8, lr=2e-2))
    tr.fit(st, _ids())
    ids = (np.arange(300) * 7 % 11).astype(np.int64)   # not the training cycle: a perplexity well above 1
    r32 = tr.evaluate(st.model, ids)
    spy = _Spy()
    low = tr.evaluate(st.model, ids, backends=[spy], precision=precision)
    assert low["precision"] == precision and r32["precision"] == "float32" and low["tokens"] == r32["tokens"]
    assert r32["perplexity"] > 3
    assert low["perplexity"] != r32["perplexity"]                     # the precision was not ignored...
    assert low["perplexity"] == pytest.approx(r32["perplexity"], rel=0.01)   # ...and only rounding differs
    assert len(spy.seen) > 20
    if precision == "float16":
        assert {str(a.dtype) for _, a in spy.seen} == {"float16"}
    else:
        assert sorted({op for op, a in spy.seen if not _is_bfloat16(a)}) == []
    assert {a.dtype for a in st.model.params.values()} == {np.dtype(np.float32)}   # the model is untouched


# ----------------------------------------------------------------------------------- CLI
def _cli_files(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. the dog sat on the log. " * 40)
    cfgf = tmp_path / "cfg.json"
    cfgf.write_text(json.dumps({"arch": "llama", "n_ctx": 16, "d_model": 16, "n_layers": 1, "n_heads": 2,
                                "d_ff": 32}))
    return ["--config", str(cfgf), "--data", str(text), "--vocab-size", "280", "--batch", "2",
            "--steps", "3", "--eval-every", "3", "--eval-batches", "1", "--warmup", "1"]


def test_cli_precision_float16(tmp_path):
    out = tmp_path / "m.npz"
    r = CliRunner().invoke(main, ["train", *_cli_files(tmp_path), "--precision", "float16",
                                  "--loss-scale-growth-interval", "2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "float16 compute" in r.output
    assert "scale 32768 skipped 0" in r.output          # the progress line carries the scaler
    with np.load(out, allow_pickle=False) as z:
        assert {z[k].dtype for k in z.files if not k.startswith("__")} == {np.dtype(np.float32)}
    meta = json.loads(np.load(str(out)[:-4] + ".ckpt.npz", allow_pickle=False)["__train__"].tobytes())
    assert meta["settings"]["precision"] == "float16" and meta["scaler"]["skipped"] == 0
    # eval in the precision the model was trained in, and says so
    ev = {p: CliRunner().invoke(main, ["eval", str(out), "--data", str(tmp_path / "t.txt"), "--precision", p, *j])
          for p, j in [("float32", ["--json"]), ("float16", ["--json"]), ("bfloat16", [])]}
    assert all(r.exit_code == 0 for r in ev.values()), [r.output for r in ev.values()]
    r32, r16 = (json.loads(ev[p].output) for p in ("float32", "float16"))
    assert r16["precision"] == "float16" and r16["perplexity"] == pytest.approx(r32["perplexity"], rel=0.01)
    assert r16["perplexity"] != r32["perplexity"]
    assert "(bfloat16 compute): loss" in ev["bfloat16"].output


def test_cli_bad_precision_is_one_line(tmp_path):
    r = CliRunner().invoke(main, ["train", *_cli_files(tmp_path), "--precision", "fp8", "-o",
                                  str(tmp_path / "m.npz")])
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == ["error: --precision must be one of float32, float16, bfloat16, "
                                             "got 'fp8'"]
    assert not (tmp_path / "m.npz").exists()


def test_bfloat16_emulation_owns_what_its_backend_owns() -> None:
    """Device arrays fed back to a bfloat16-emulating executor (a decode cache) stay on the device:
    the wrapper answers ``owns`` for the backend it wraps, so the executor does not copy them."""
    from minitx.precision import Bfloat16Emulation

    class Marker:
        pass

    class Device(Backend):
        name, device, version = "dev", "dev", "0"
        dtypes = frozenset({"float32"})

        def owns(self, a) -> bool:
            return isinstance(a, Marker)

    wrapped = Bfloat16Emulation(Device())
    assert wrapped.owns(Marker()) and not wrapped.owns(np.zeros(2))
