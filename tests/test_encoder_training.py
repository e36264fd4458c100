"""Encoders train: the embedding-distillation objective (minitx/training/embedding.py) on a tiny
random BERT — the loss is 1 − cosine computed independently, its gradients agree with finite
differences, training raises the held-out cosine, and distill/qat run it from the command line."""
from __future__ import annotations

import os

import numpy as np
import pytest
from click.testing import CliRunner

from minitx import data, feeds, modelfile, models
from minitx.cli import main
from minitx.executor import Executor
from minitx.model import Model
from minitx.training import TrainSettings, fit, new_state
from minitx.training import embedding as emb

TEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "minitx", "data", "heldout.txt")


@pytest.fixture(scope="module")
def tok() -> str:
    return data.train_tokenizer(data.read_text(TEXT), 512)


def bert(tok: str, seed: int, **cfg) -> Model:
    m = Model.from_config(models.complete_config({**models.preset("bert", "tiny"), **cfg}), seed=seed,
                          tokenizer_json=tok)
    # Random weights at init scale give nearly one embedding for every input; larger token
    # embeddings make the teacher's embeddings differ from sentence to sentence.
    m.params["tok_emb.weight"] *= 20
    return m


def central_difference(ex: Executor, inputs: dict, w: np.ndarray, idx: tuple, h: float = 1e-6) -> float:
    """d loss / d w[idx] by central differences (float64 weights read in place by ``ex``);
    w[idx] is restored afterwards."""
    old = w[idx]
    w[idx] = old + h
    up = float(ex.run(inputs, outputs=["loss"])["loss"])
    w[idx] = old - h
    down = float(ex.run(inputs, outputs=["loss"])["loss"])
    w[idx] = old
    return (up - down) / (2 * h)


def test_cosine_loss_is_one_minus_cosine_and_gradients_match_finite_differences(tok):
    student, teacher = bert(tok, 1), bert(tok, 0)
    sents = emb.sentences(teacher, data.read_text(TEXT), 12)[:3]
    target = emb.teacher_embeddings(teacher, sents)
    g = emb.loss_graph(student.graph, {"cosine": 1.0, "hidden": 0.5}, 64)
    fed = feeds.for_sequences(student.graph, sents, decoder=False)
    t_hidden = Executor(teacher.graph, teacher.params).run(dict(fed), outputs=["hidden"])["hidden"]
    p64 = {k: v.astype(np.float64) for k, v in student.params.items()}
    inputs = {**fed, "teacher.embedding": target.astype(np.float64), "teacher.hidden": t_hidden.astype(np.float64)}
    res = Executor(g, p64).forward_backward(inputs)
    # Independent: numpy's cosine of the student's own embeddings and the teacher's.
    out = Executor(student.graph, p64).run(dict(fed), outputs=["embedding", "hidden"])
    e = out["embedding"] / np.linalg.norm(out["embedding"], axis=1, keepdims=True)
    want_cos = float(np.mean(1 - (e * target).sum(axis=1) / np.linalg.norm(target, axis=1)))
    want_hid = float(np.mean((out["hidden"] - t_hidden) ** 2))
    assert float(res.outputs["loss.cosine"]) == pytest.approx(want_cos, rel=1e-6)
    assert float(res.outputs["loss"]) == pytest.approx(want_cos + 0.5 * want_hid, rel=1e-6)
    ex = Executor(g, p64)
    rng = np.random.default_rng(0)
    for name in ("layers.1.mlp.down.weight", "layers.0.attn.qkv.weight", "emb_norm.bias"):
        w = p64[name]
        for idx in [tuple(rng.integers(0, s) for s in w.shape) for _ in range(3)]:
            fd = central_difference(ex, inputs, w, idx)
            assert res.grads[name][idx] == pytest.approx(fd, rel=1e-4, abs=1e-9), (name, idx)


def test_training_raises_the_held_out_cosine(tok):
    teacher, student = bert(tok, 0), bert(tok, 1, n_layers=1)
    sents = emb.sentences(teacher, data.read_text(TEXT), 24)
    st = new_state(student, TrainSettings(steps=40, batch_size=8, lr=3e-3, warmup=5, eval_every=10,
                                          val_fraction=0.2, checkpoint_every=0))
    obj = emb.EmbeddingDistillation(teacher, sents)
    obj.prepare(st, ("numpy",))
    val = [sents[i] for i in data.split(emb.stream(sents), 0.2, 1)[1]]
    before = emb.mean_cosine(student, val, emb.teacher_embeddings(teacher, val))
    fit(st, emb.stream(sents), obj)
    after = st.history[-1]["val_cosine"]
    assert before < 0.9 and after > before + 0.05, (before, after)
    assert st.history[0]["loss"] > st.history[-1]["loss"] or st.history[-1]["val_cosine"] > st.history[0]["val_cosine"]


def test_fit_still_refuses_an_encoder_with_next_token_cross_entropy(tok):
    st = new_state(bert(tok, 0), TrainSettings(steps=1))
    with pytest.raises(Exception, match="training needs a decoder"):
        fit(st, np.arange(100), None)


@pytest.fixture(scope="module")
def files(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("enc")
    modelfile.save(bert(tok, 0), str(d / "teacher.npz"))
    return d


def test_cli_distill_from_a_layer_dropped_student(files):
    d = files
    r = CliRunner().invoke(main, ["optimize", str(d / "teacher.npz"), "--plugin", "layers:keep=1,by=alternate",
                                  "-o", str(d / "student.npz")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["distill", str(d / "teacher.npz"), "--student", str(d / "student.npz"),
                                  "--data", TEXT, "-o", str(d / "out.npz"), "--steps", "20", "--batch", "8",
                                  "--seq", "24", "--eval-every", "10", "--val-fraction", "0.2", "--lr", "3e-3",
                                  "--json", "-q"])
    assert r.exit_code == 0, r.output
    import json

    rep = json.loads(r.output)
    assert rep["heldout_cosine_before"] is not None and rep["heldout_cosine"] > 0.99
    assert [h["step"] for h in rep["history"]] == [10, 20]
    out = modelfile.load(str(d / "out.npz"))
    assert out.n_params() == modelfile.load(str(d / "student.npz")).n_params() < modelfile.load(
        str(d / "teacher.npz")).n_params()
    from minitx.generate import embed

    assert embed(out, [[5, 6, 7]]).shape == (1, 64)


def test_cli_qat_on_an_encoder(files):
    d = files
    r = CliRunner().invoke(main, ["qat", str(d / "teacher.npz"), "--plugin", "quant:int4", "--data", TEXT,
                                  "-o", str(d / "q4.npz"), "--steps", "6", "--batch", "4", "--seq", "16",
                                  "--val-fraction", "0.2", "-q"])
    assert r.exit_code == 0, r.output
    assert "held-out mean cosine to the float model" in r.output and "QAT quant:int4" in r.output


@pytest.mark.parametrize("args, message", [
    (["--loss", "response=1"], "unknown loss 'response' for an encoder"),
    (["--loss", "cosine=-1"], "positive number"),
    (["--layer-map", "0:0"], "--layer-map is for decoder teachers"),
    ([], "give one of --student-config"),
])
def test_cli_distill_encoder_bad_options_are_one_line_exit_2(files, args, message):
    d = files
    student = [] if not args else ["--student-config", '{"n_layers": 1}']
    r = CliRunner().invoke(main, ["distill", str(d / "teacher.npz"), *student, "--data", TEXT,
                                  "-o", str(d / "bad.npz"), "--steps", "1", *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1
    assert not os.path.exists(d / "bad.npz")


def test_resume_of_a_layer_dropped_student_is_bit_for_bit(tok, tmp_path):
    from minitx import plugin
    from minitx.training import load_checkpoint
    from minitx.validate import Calibration

    teacher = bert(tok, 0, n_layers=3)
    sents = emb.sentences(teacher, data.read_text(TEXT), 16)

    def state():
        student = plugin.optimize(teacher, ["layers:keep=2"], calib=Calibration.parse(["random:2x8"]), validate=False)
        return new_state(student, TrainSettings(steps=4, batch_size=4, lr=1e-3, warmup=1, eval_every=0,
                                                checkpoint_every=2, val_fraction=0.2))

    import shutil

    ck, mid = str(tmp_path / "c.npz"), str(tmp_path / "mid.npz")

    def keep_step_2(rec):   # called before step 3's checkpoint: the file still holds step 2's
        if rec["step"] == 3:
            shutil.copy(ck, mid)

    before = {k: a.copy() for k, a in teacher.params.items()}
    whole = fit(state(), emb.stream(sents), emb.EmbeddingDistillation(teacher, sents), checkpoint=ck,
                progress=keep_step_2)
    for k, a in teacher.params.items():   # the student trained its own copies of the weights it kept
        np.testing.assert_array_equal(a, before[k], err_msg=k)
    back = load_checkpoint(mid, kind="distill")
    assert back.step == 2
    assert back.model.graph.to_json() == whole.model.graph.to_json()
    fit(back, emb.stream(sents), emb.EmbeddingDistillation(teacher, sents))
    for k, a in whole.model.params.items():
        np.testing.assert_array_equal(back.model.params[k], a, err_msg=k)


def test_held_out_cosine_scores_the_trained_weights_of_a_rewritten_student(tok):
    """A student rewritten from its teacher shares weights with it until training copies them: the
    held-out score must read the copies being trained, not an executor cached over the originals."""
    from minitx import plugin
    from minitx.validate import Calibration

    teacher = bert(tok, 0, n_layers=3)
    sents = emb.sentences(teacher, data.read_text(TEXT), 16)
    student = plugin.optimize(teacher, ["layers:keep=1"], calib=Calibration.parse(["random:2x8"]), validate=False)
    val = [sents[i] for i in data.split(emb.stream(sents), 0.2, 1)[1]]
    before = emb.mean_cosine(student, val, emb.teacher_embeddings(teacher, val))   # caches an executor
    st = new_state(student, TrainSettings(steps=10, batch_size=4, lr=3e-3, warmup=1, eval_every=0,
                                          checkpoint_every=0, val_fraction=0.2))
    fit(st, emb.stream(sents), emb.EmbeddingDistillation(teacher, sents))
    fresh = Model(st.model.config, st.model.params, st.model.graph, tok)
    again = emb.mean_cosine(fresh, val, emb.teacher_embeddings(teacher, val))
    assert st.history[-1]["val_cosine"] == pytest.approx(again, abs=1e-6) and again != pytest.approx(before, abs=1e-4)
