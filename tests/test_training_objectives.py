"""Every training feature works for every objective: one fit() loop serves plain cross-entropy
(``train``), distillation (``distill``) and quantization-aware training (``qat``).

Tiny models, a few steps each; the references are the objective's own plain run (features that
must not change the result: recompute, accumulation, resume, another backend) or a property the
feature guarantees (float16: float32 master weights and a loss scale; clipping: a bounded step).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from minitx import models
from minitx import training as tr
from minitx.errors import MinitxError
from minitx.model import Model
from minitx.training import distill as dl
from minitx.training import qat

CFG = models.complete_config({"arch": "gpt2", "vocab_size": 12, "n_ctx": 16, "d_model": 16, "n_layers": 2,
                              "n_heads": 2, "d_ff": 32})
STUDENT = models.complete_config({**CFG, "d_model": 8, "d_ff": 16})
IDS = (np.arange(600) % 10).astype(np.int64)
OBJECTIVES = ["ce", "distill", "qat"]


@pytest.fixture(scope="module")
def teacher() -> Model:
    return Model.from_config(CFG, seed=5)


def _settings(**kw) -> tr.TrainSettings:
    base = dict(steps=4, batch_size=2, seq_len=8, lr=1e-2, min_lr=1e-3, warmup=1, eval_every=2, eval_batches=1,
                checkpoint_every=2, val_fraction=0.1, seed=0)
    return tr.TrainSettings(**{**base, **kw})


def _start(kind: str, teacher: Model, **kw) -> tuple[tr.TrainState, tr.Objective]:
    """A fresh run of objective ``kind`` and the objective itself."""
    s = _settings(**kw)
    if kind == "ce":
        return tr.fresh_model(CFG, None, s), tr.CrossEntropy()
    if kind == "distill":
        ds = dl.DistillSettings({"response": 1.0, "ce": 0.5, "feature": 0.5})
        return dl.new_student(STUDENT, teacher, s), dl.Distillation(teacher, ds)
    return qat.new_state(teacher, "quant:int8", s), tr.CrossEntropy(kind="qat")


def _fit(kind, teacher, backends=("numpy",), **kw):
    st, obj = _start(kind, teacher, **kw)
    recs: list[dict] = []
    tr.fit(st, IDS, obj, backends=backends, progress=recs.append)
    return st, recs


def _trained(st: tr.TrainState) -> dict[str, np.ndarray]:
    return {**st.model.params, **st.aux}


def _assert_same(a: dict, b: dict, **tol) -> None:
    assert set(a) == set(b)
    for k in a:
        if tol:
            np.testing.assert_allclose(a[k], b[k], err_msg=k, **tol)
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("kind", OBJECTIVES)
def test_float16_computes_with_a_loss_scale_and_keeps_float32_weights(kind, teacher):
    st, recs = _fit(kind, teacher, precision="float16")
    _, ref = _fit(kind, teacher)
    assert all(r["loss_scale"] > 1 for r in recs) and st.scaler is not None
    assert all(a.dtype == np.float32 for a in _trained(st).values())
    assert all(m.dtype == np.float32 for m in st.opt.m.values())
    # float16 compute, same batches: the first step's loss agrees with float32 to float16 rounding
    assert recs[0]["loss"] == pytest.approx(ref[0]["loss"], rel=2e-3)


@pytest.mark.parametrize("kind", OBJECTIVES)
def test_recompute_trains_the_same_weights_in_less_memory(kind, teacher):
    plain, p_recs = _fit(kind, teacher)
    re, r_recs = _fit(kind, teacher, plugins=("recompute:every",))
    _assert_same(_trained(plain), _trained(re))
    assert max(r["peak_activation_bytes"] for r in r_recs) < max(r["peak_activation_bytes"] for r in p_recs)


@pytest.mark.parametrize("kind", OBJECTIVES)
def test_accumulating_two_micro_batches_equals_one_batch_twice_as_large(kind, teacher):
    big, b_recs = _fit(kind, teacher, batch_size=4)
    acc, a_recs = _fit(kind, teacher, batch_size=2, grad_accum=2)
    # the same windows, the gradient averaged over them (its norm, before clipping, is recorded)
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in a_recs] == pytest.approx([r[key] for r in b_recs], rel=1e-4), key
    _assert_same(_trained(big), _trained(acc), rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", OBJECTIVES)
def test_clipping_bounds_the_update(kind, teacher):
    # With AdamW's eps large, an update is about lr * g / eps: clipping g to 1e-6 all but freezes
    # every trainable (the model's and an objective's own), which an unclipped run does not.
    kw = dict(steps=2, eps=1.0, weight_decay=0.0, warmup=0, val_fraction=0.1)
    before = {k: a.copy() for k, a in _trained(_fit_prepared(kind, teacher, **kw)).items()}
    clipped, recs = _fit(kind, teacher, clip=1e-6, **kw)
    free, _ = _fit(kind, teacher, clip=0.0, **kw)
    moved = lambda st: max(float(np.abs(st_a - before[k]).max()) for k, st_a in _trained(st).items())  # noqa: E731
    assert recs[0]["grad_norm"] > 1e-3
    assert moved(clipped) < 1e-7 < 1e-4 < moved(free)


def _fit_prepared(kind, teacher, **kw) -> tr.TrainState:
    """The state as fit() starts it (trainables created, no step taken): the initial weights."""
    st, obj = _start(kind, teacher, **kw)
    obj.prepare(st, ("numpy",))
    return st


@pytest.mark.parametrize("kind", OBJECTIVES)
def test_interrupted_run_resumes_bit_for_bit(kind, teacher, tmp_path):
    straight, _ = _fit(kind, teacher)
    ckpt = str(tmp_path / "c.npz")

    def interrupt(rec):
        if rec["step"] == 3:           # after the checkpoint at step 2
            raise KeyboardInterrupt

    st, obj = _start(kind, teacher)
    with pytest.raises(KeyboardInterrupt):
        tr.fit(st, IDS, obj, checkpoint=ckpt, progress=interrupt)
    resumed = (qat.resume(ckpt, teacher, "quant:int8") if kind == "qat"
               else tr.load_checkpoint(ckpt, kind="distill" if kind == "distill" else "train"))
    assert resumed.step == 2
    tr.fit(resumed, IDS, _start(kind, teacher)[1])
    _assert_same(_trained(straight), _trained(resumed))
    _assert_same(straight.opt.v, resumed.opt.v)
    assert resumed.history == straight.history


@pytest.mark.parametrize("kind", OBJECTIVES)
def test_another_backend_trains_alike(kind, teacher):
    from minitx.backend import get_backend

    try:
        get_backend("numba")
    except MinitxError as e:
        pytest.skip(f"numba backend unavailable: {e}")
    _, ref = _fit(kind, teacher, steps=2, eval_every=0)
    _, got = _fit(kind, teacher, backends=("numba",), steps=2, eval_every=0)
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in ref], rtol=1e-4)


def test_an_objective_cannot_resume_another_kind_of_run(teacher, tmp_path):
    st, _ = _fit("ce", teacher, steps=2)
    with pytest.raises(MinitxError, match="a `minitx train` run cannot be resumed by `minitx distill`"):
        tr.fit(st, IDS, dl.Distillation(teacher, dl.DistillSettings()))
    assert dataclasses.asdict(st.settings)["steps"] == 2
