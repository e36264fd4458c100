"""The per-token (pre-pooling) embedding-distillation losses ``tokens`` and ``layers``
(minitx/training/embedding.py): their values equal 1 − cosine per real token computed
independently in NumPy (padding excluded, each sentence weighted once), their gradients agree
with float64 finite differences, and training with them raises the held-out cosine."""
from __future__ import annotations

import numpy as np
import pytest

from minitx import data
from minitx.errors import MinitxError
from minitx.executor import Executor
from minitx.model import Model
from minitx.training import TrainSettings, fit, new_state
from minitx.training import embedding as emb

# the same tiny BERT teacher/students and tokenizer fixture as the sentence-level losses' tests
from test_encoder_training import TEXT, bert, central_difference, tok  # noqa: E402,F401 — tok: a pytest fixture


def per_token_loss(s: np.ndarray, t: np.ndarray, mask: np.ndarray) -> float:
    """Mean over sentences of the mean over real tokens of 1 − cos(s_bt, t_bt), in plain NumPy."""
    per_sentence = []
    for b in range(s.shape[0]):
        real = mask[b].astype(bool)
        a, c = s[b][real], t[b][real]
        cos = (a * c).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(c, axis=1))
        per_sentence.append(np.mean(1 - cos))
    return float(np.mean(per_sentence))


@pytest.mark.parametrize("n_student_layers", [2, 1])
def test_per_token_losses_are_one_minus_cosine_over_real_tokens_with_checked_gradients(tok, n_student_layers):
    teacher = bert(tok, 0, n_layers=3)
    student = bert(tok, 1, n_layers=n_student_layers)
    sents = [s[:n] for s, n in zip(emb.sentences(teacher, data.read_text(TEXT), 12), (12, 5, 9, 3))]
    assert len({len(s) for s in sents}) > 1, "sentences of different lengths, so padding is exercised"
    p64 = {k: v.astype(np.float64) for k, v in student.params.items()}
    t64 = Model(teacher.config, {k: v.astype(np.float64) for k, v in teacher.params.items()}, teacher.graph,
                teacher.tokenizer_json)
    obj = emb.EmbeddingDistillation(t64, sents, {"cosine": 1.0, "tokens": 0.5, "layers": 2.0})
    pairs = emb.layer_pairs(student.graph, teacher.graph)
    # Student block k faces the teacher's spread evenly, last to last.
    assert [t for _, t in pairs] == (["layers.1.norm2", "hidden"] if n_student_layers == 2 else ["hidden"])
    obj._emb = emb.teacher_embeddings(t64, sents)
    obj._teacher_layers = [t for _, t in pairs]
    g = obj.loss_graph(student.graph)
    inputs = obj.extra_feeds(np.arange(len(sents))[:, None])
    mask = inputs["attention_mask"]
    assert (mask == 0).any()
    res = Executor(g, p64).forward_backward(inputs)
    # Independent: NumPy's per-token cosines of the two models' own hidden states.
    s_vals = Executor(student.graph, p64).run(dict(inputs), outputs=["hidden"], keep=[v for v, _ in pairs])
    t_vals = Executor(t64.graph, t64.params).run(dict(inputs), outputs=["hidden"], keep=[t for _, t in pairs])
    want_tokens = per_token_loss(s_vals["hidden"], t_vals["hidden"], mask)
    want_layers = float(np.mean([per_token_loss(s_vals[v], t_vals[t], mask) for v, t in pairs]))
    assert float(res.outputs["loss.tokens"]) == pytest.approx(want_tokens, rel=1e-9)
    assert float(res.outputs["loss.layers"]) == pytest.approx(want_layers, rel=1e-9)
    assert float(res.outputs["loss"]) == pytest.approx(
        float(res.outputs["loss.cosine"]) + 0.5 * want_tokens + 2.0 * want_layers, rel=1e-9)
    ex = Executor(g, p64)
    rng = np.random.default_rng(0)
    for name in ("layers.0.mlp.down.weight", "layers.0.attn.qkv.weight", "emb_norm.weight", "tok_emb.weight"):
        w = p64[name]
        rows = sorted({int(i) for s in sents for i in s}) if name == "tok_emb.weight" else None
        for _ in range(3):
            idx = tuple(int(rng.choice(rows)) if (k == 0 and rows) else int(rng.integers(0, n))
                        for k, n in enumerate(w.shape))
            fd = central_difference(ex, inputs, w, idx)
            assert res.grads[name][idx] == pytest.approx(fd, rel=1e-4, abs=1e-9), (name, idx)


def test_layers_loss_refuses_a_deeper_student(tok):
    with pytest.raises(MinitxError, match="more than the teacher"):
        emb.layer_pairs(bert(tok, 1, n_layers=3).graph, bert(tok, 0, n_layers=2).graph)


def test_parse_losses_knows_the_per_token_terms():
    assert emb.parse_losses(["cosine", "layers=0.5", "tokens"]) == {"cosine": 1.0, "layers": 0.5, "tokens": 1.0}
    with pytest.raises(MinitxError, match="unknown loss 'layer'"):
        emb.parse_losses(["layer"])


def test_training_on_the_layers_loss_alone_raises_the_held_out_cosine(tok):
    teacher, student = bert(tok, 0), bert(tok, 1)
    sents = emb.sentences(teacher, data.read_text(TEXT), 16)
    s = TrainSettings(steps=30, batch_size=8, lr=3e-3, warmup=2, eval_every=30, val_fraction=0.2, seed=0)
    st = new_state(student, s, kind="distill")
    obj = emb.EmbeddingDistillation(teacher, sents, {"layers": 1.0})
    fit(st, emb.stream(sents), obj)
    val = data.split(emb.stream(sents), 0.2, 1)[1]
    ref = emb.teacher_embeddings(teacher, [sents[i] for i in val])
    before = emb.mean_cosine(bert(tok, 1), [sents[i] for i in val], ref)
    after = st.history[-1]["val_cosine"]
    assert after > before + 0.05, (before, after)


def test_cli_distill_of_a_layer_dropped_student_on_the_layers_loss(tok, tmp_path):
    """The kept block (its name keeps its old index) faces the teacher's last block."""
    import json

    from click.testing import CliRunner

    from minitx import modelfile
    from minitx.cli import main

    modelfile.save(bert(tok, 0), str(tmp_path / "teacher.npz"))
    r = CliRunner().invoke(main, ["optimize", str(tmp_path / "teacher.npz"), "--plugin", "layers:keep=1,by=alternate",
                                  "-o", str(tmp_path / "student.npz")])
    assert r.exit_code == 0, r.output
    student = modelfile.load(str(tmp_path / "student.npz"))
    assert emb.layer_pairs(student.graph, modelfile.load(str(tmp_path / "teacher.npz")).graph)[0][1] == "hidden"
    r = CliRunner().invoke(main, ["distill", str(tmp_path / "teacher.npz"), "--student", str(tmp_path / "student.npz"),
                                  "--data", TEXT, "-o", str(tmp_path / "out.npz"), "--steps", "10", "--batch", "8",
                                  "--seq", "24", "--eval-every", "10", "--val-fraction", "0.2", "--lr", "3e-3",
                                  "--loss", "cosine", "--loss", "layers=0.5", "--json", "-q"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["losses"] == {"cosine": 1.0, "layers": 0.5}
    assert rep["steps"] == 10 and np.isfinite(rep["heldout_cosine"])
