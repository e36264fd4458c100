"""Knowledge distillation (minitx/training/distill.py, `minitx distill`).

The fixed setting: the teacher is the bundled 1.07M-parameter GPT-2 (fitted to Jane Austen); the
text is 24 passages sampled from it (seed 0, temperature 1), so the teacher's next-token
distribution is the truth the data was drawn from; the student is a 1-layer, 32-wide GPT-2
(75k parameters, mostly its embedding) trained for a few dozen steps on the first 75% of the
tokens. Held-out loss is always measured on the true next tokens of the last 25%.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from minitx import data, modelfile
from minitx.training import distill as dl
from minitx import training as tr
from minitx.bundled import DEFAULT_MODEL
from minitx.errors import MinitxError
from minitx.generate import Sampling, generate

pytestmark = pytest.mark.skipif(not os.path.exists(DEFAULT_MODEL), reason="the bundled model is not installed")

STUDENT = {"n_layers": 1, "d_model": 32, "n_heads": 2, "d_ff": 64, "n_ctx": 32}
SEQ = 32


@pytest.fixture(scope="module")
def teacher():
    return modelfile.load(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def ids(teacher):
    starts = np.random.default_rng(0).integers(0, teacher.vocab_size, 24)
    rows = generate(teacher, [[int(s)] for s in starts], 127, Sampling(temperature=1.0, seed=0))
    return np.array([t for r in rows for t in r], dtype=np.int64)


@pytest.fixture(scope="module")
def text_file(teacher, ids, tmp_path_factory):
    path = tmp_path_factory.mktemp("distill") / "text.txt"
    path.write_text(teacher.tokenizer.decode(ids[:1200].tolist()), encoding="utf-8")
    return str(path)


def settings(steps, **kw):
    base = dict(steps=steps, batch_size=8, seq_len=SEQ, eval_every=0, warmup=5, lr=1e-2, min_lr=1e-3,
                val_fraction=0.25, seed=0)
    return tr.TrainSettings(**{**base, **kw})


def student(teacher, s, **cfg):
    return dl.new_student(dl.student_config(teacher, {**STUDENT, **cfg}), teacher, s)


# ------------------------------------------------------------------------- the claim
def test_distilled_student_beats_the_same_student_trained_without_teacher(teacher, ids):
    _, val = data.split(ids, 0.25, SEQ)
    plain = student(teacher, settings(30))
    tr.fit(plain, ids)
    taught = student(teacher, settings(30))
    dl.distill(taught, teacher, ids, dl.DistillSettings({"response": 1.0}, temperature=2.0))
    # Same initial weights, same batches, same steps: only the objective differs.
    assert taught.step == plain.step == 30
    base = dl.heldout(plain.model, val, SEQ)["loss"]
    kd = dl.heldout(taught.model, val, SEQ)["loss"]
    top = dl.heldout(teacher, val, SEQ)["loss"]
    assert top < kd < base - 0.15, (top, kd, base)


def test_ce_alone_is_exactly_plain_training(teacher, ids):
    """With only the hard-label loss, distill() is `minitx train`, bit for bit (shared loop pieces)."""
    a = student(teacher, settings(4))
    tr.fit(a, ids)
    b = student(teacher, settings(4))
    run = dl.distill(b, teacher, ids, dl.DistillSettings({"ce": 1.0}))
    assert run.aux == {} and run.kind == "distill"
    for k in a.model.params:
        np.testing.assert_array_equal(a.model.params[k], b.model.params[k], err_msg=k)


@pytest.mark.parametrize("loss, steps", [("response", 12), ("ce", 12), ("feature", 12), ("attention", 25)])
def test_each_loss_alone_lowers_its_own_objective(teacher, ids, loss, steps):
    ds = dl.DistillSettings({loss: 1.0}, temperature=2.0)
    st = student(teacher, settings(steps, batch_size=4), n_layers=2)
    # A fixed held-out batch, scored before and after with the same projection initialisation.
    _, val = data.split(ids, 0.25, SEQ)
    x = np.stack([val[i: i + SEQ] for i in (0, 100, 200, 300)])
    y = np.stack([val[i + 1: i + SEQ + 1] for i in (0, 100, 200, 300)])
    p0 = dl.init_projections(dl.plan(teacher, st.model, ds), 0, np.float32)
    before = dl.objectives(teacher, st.model, p0, ds, x, y)
    recs = []
    run = dl.distill(st, teacher, ids, ds, progress=recs.append)
    after = dl.objectives(teacher, st.model, run.aux, ds, x, y)
    assert set(before) == {"loss", f"loss.{loss}"}
    assert after[f"loss.{loss}"] < 0.95 * before[f"loss.{loss}"], (before, after)
    assert np.isfinite([r["loss"] for r in recs]).all()


def test_combined_losses_weights_and_projection_not_saved(teacher, ids, tmp_path):
    ds = dl.DistillSettings({"response": 1.0, "ce": 0.5, "feature": 0.25, "attention": 0.1}, 2.0, [(0, 1), (1, 3)])
    st = student(teacher, settings(2, batch_size=2, seq_len=16), n_layers=2, n_heads=1)
    p = dl.plan(teacher, st.model, ds)
    assert p.n_maps == 1   # 4 teacher heads vs 1 student head: head-averaged maps
    assert set(p.proj_shapes) == {"distill.proj.0.weight", "distill.proj.0.bias",
                                  "distill.proj.1.weight", "distill.proj.1.bias"}
    x, y = ids[None, :16], ids[None, 1:17]
    o = dl.objectives(teacher, st.model, dl.init_projections(p, 0, np.float32), ds, x, y)
    expect = o["loss.response"] + 0.5 * o["loss.ce"] + 0.25 * o["loss.feature"] + 0.1 * o["loss.attention"]
    assert o["loss"] == pytest.approx(expect, rel=1e-5)
    out = str(tmp_path / "s.npz")
    rep = dl.run_report(teacher, DEFAULT_MODEL, st, ids, ds, out, decode_tokens=2)
    m = modelfile.load(out)   # loads strictly: an extra key would be an error
    assert not any(k.startswith("distill.") for k in m.params)
    assert m.meta["layer_map"] == [[0, 1], [1, 3]] and rep["layer_map"] == [[0, 1], [1, 3]]
    assert m.tokenizer_json == teacher.tokenizer_json


def test_llama_student_with_grouped_query_attention_learns_from_gpt2_teacher(teacher, ids):
    cfg = dl.student_config(teacher, {"arch": "llama", "n_layers": 1, "d_model": 32, "n_heads": 2,
                                      "n_kv_heads": 1, "d_ff": 64})
    assert cfg["vocab_size"] == teacher.vocab_size and cfg["n_ctx"] == teacher.n_ctx
    st = dl.new_student(cfg, teacher, settings(2, batch_size=2, seq_len=16))
    ds = dl.DistillSettings({"response": 1.0, "ce": 1.0, "feature": 1.0, "attention": 1.0})
    assert dl.plan(teacher, st.model, ds).n_maps == 2   # gcd(2, 4): teacher heads 0-1 and 2-3 averaged
    recs = []
    dl.distill(st, teacher, ids, ds, progress=recs.append)
    assert {"loss.response", "loss.ce", "loss.feature", "loss.attention"} <= set(recs[-1])
    assert all(np.isfinite(v) for k, v in recs[-1].items() if k.startswith("loss"))


def test_default_layer_map_spreads_student_layers_over_teacher_layers():
    assert dl.default_layer_map(2, 4) == [(0, 1), (1, 3)]
    assert dl.default_layer_map(1, 4) == [(0, 3)]
    assert dl.default_layer_map(3, 4) == [(0, 0), (1, 2), (2, 3)]
    assert dl.default_layer_map(4, 4) == [(i, i) for i in range(4)]
    assert dl.default_layer_map(4, 2) == [(0, 0), (1, 0), (2, 1), (3, 1)]


def test_parsing_and_validation_errors(teacher):
    assert dl.parse_losses([]) == {"response": 1.0}
    assert dl.parse_losses(["response=1", "feature=0.5", "attention"]) == {"response": 1.0, "feature": 0.5,
                                                                            "attention": 1.0}
    assert dl.parse_layer_map("0:1, 1:3") == [(0, 1), (1, 3)]
    for bad, msg in [(["soft=1"], "unknown loss 'soft'"), (["response=x"], "not a number"),
                     (["response=-1"], "positive"), (["ce", "ce=2"], "twice")]:
        with pytest.raises(MinitxError, match=msg):
            dl.parse_losses(bad)
    for bad in ["0-1", "a:1", "0:", ""]:
        with pytest.raises(MinitxError, match="layer-map"):
            dl.parse_layer_map(bad)
    with pytest.raises(MinitxError, match="vocab_size 100 differs from the teacher's 2048"):
        dl.student_config(teacher, {"vocab_size": 100})
    st = student(teacher, settings(1))
    with pytest.raises(MinitxError, match="teacher layer 4 is out of range"):
        dl.plan(teacher, st.model, dl.DistillSettings({"feature": 1.0}, 2.0, [(0, 4)]))
    with pytest.raises(MinitxError, match="student layer 1 is out of range"):
        dl.plan(teacher, st.model, dl.DistillSettings({"attention": 1.0}, 2.0, [(1, 0)]))
    with pytest.raises(MinitxError, match="select one of them"):
        dl.plan(teacher, st.model, dl.DistillSettings({"response": 1.0}, 2.0, [(0, 0)]))
    with pytest.raises(MinitxError, match="temperature"):
        dl.DistillSettings({"response": 1.0}, 0.0).check()


# --------------------------------------------------------------------------------------- resume
def _interrupt_at(step):
    def progress(rec):
        if rec["step"] == step:
            raise KeyboardInterrupt
    return progress


def test_interrupted_distillation_resumes_bit_for_bit(teacher, ids, tmp_path):
    """Student, feature projections, both optimizers and the data stream continue exactly."""
    ds = dl.DistillSettings({"response": 1.0, "feature": 0.5})
    kw = dict(batch_size=2, seq_len=16, eval_every=2, eval_batches=1, checkpoint_every=2)
    straight = dl.distill(student(teacher, settings(4, **kw)), teacher, ids, ds)

    ckpt = str(tmp_path / "c.npz")
    with pytest.raises(KeyboardInterrupt):   # after the checkpoint at step 2, before the one at step 4
        dl.distill(student(teacher, settings(4, **kw)), teacher, ids, ds, checkpoint=ckpt, progress=_interrupt_at(3))
    st = tr.load_checkpoint(ckpt, kind="distill")
    assert st.step == 2 and set(st.aux) == set(straight.aux) and st.aux_opt.t == 2
    recs = []
    resumed = dl.distill(st, teacher, ids, ds, checkpoint=ckpt, progress=recs.append)
    assert [r["step"] for r in recs] == [3, 4]
    for a, b in [(straight.model.params, st.model.params), (straight.aux, resumed.aux),
                 (straight.opt.v, st.opt.v), (straight.aux_opt.m, st.aux_opt.m)]:
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert st.history == straight.history and len(st.history) == 2
    assert tr.load_checkpoint(ckpt, kind="distill").step == 4


def test_resume_refuses_another_teacher_loss_or_text(teacher, ids, tmp_path):
    ds = dl.DistillSettings({"response": 1.0, "feature": 0.5})
    ckpt = str(tmp_path / "c.npz")
    dl.distill(student(teacher, settings(1, batch_size=1, seq_len=8)), teacher, ids, ds, checkpoint=ckpt)
    other = modelfile.Model(teacher.config, {k: a + np.float32(1e-3) for k, a in teacher.params.items()},
                            teacher.graph, teacher.tokenizer_json)
    for args, msg in [((other, ids, ds), "made with teacher"),
                      ((teacher, ids, dl.DistillSettings({"response": 1.0, "feature": 0.25})),
                       "made with --loss response=1.0,feature=0.5, not response=1.0,feature=0.25"),
                      ((teacher, ids, dl.DistillSettings({"response": 1.0, "feature": 0.5}, 3.0)), "--temperature"),
                      ((teacher, ids[:-1], ds), "made with --data")]:
        with pytest.raises(MinitxError, match=msg):
            dl.distill(tr.load_checkpoint(ckpt, kind="distill"), *args)
    with pytest.raises(MinitxError, match="a `minitx distill` checkpoint; resume it with `minitx distill"):
        tr.load_checkpoint(ckpt)


def test_cli_distill_interrupt_resume_matches_straight_run(text_file, tmp_path, monkeypatch, interrupt_at):
    common = ["distill", DEFAULT_MODEL, "--student-config", json.dumps(STUDENT), "--data", text_file,
              "--steps", "3", "--batch", "1", "--seq", "8", "--warmup", "1", "--val-fraction", "0.2",
              "--loss", "response=1", "--loss", "feature=0.5", "--checkpoint-every", "1", "--max-new-tokens", "0",
              "--json", "-q"]
    assert _cli([*common, "-o", str(tmp_path / "a.npz")]).exit_code == 0
    interrupt_at(2)
    ckpt = str(tmp_path / "b.ckpt.npz")
    r = _cli([c for c in common if c != "-q"] + ["-o", str(tmp_path / "b.npz")])
    assert r.exit_code == 130 and not (tmp_path / "b.npz").exists()
    monkeypatch.undo()
    r = _cli([*common, "-o", str(tmp_path / "b.npz"), "--resume", ckpt])
    assert r.exit_code == 0, r.output
    a, b = modelfile.load(str(tmp_path / "a.npz")), modelfile.load(str(tmp_path / "b.npz"))
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)
    # A resume that changes the run is one line naming what differs.
    for extra, msg in [(["--loss", "ce=1"], "made with --loss response=1.0,feature=0.5, not response=1.0,ce=1.0,"),
                       (["--lr", "0.1"], "made with --lr 0.003, not 0.1"),
                       (["--student-config", json.dumps({**STUDENT, "d_model": 16})],
                        "differs from --student-config in d_model")]:
        r = _cli([*common, "-o", str(tmp_path / "c.npz"), "--resume", ckpt, *extra])
        assert r.exit_code == 2 and r.output.count("\n") == 1 and msg in r.output, r.output
    assert not (tmp_path / "c.npz").exists()


# ------------------------------------------------------------------------------------------ CLI
def _cli(args):
    from minitx.cli import main

    return CliRunner().invoke(main, args)


def test_cli_happy_path_json_report_with_baseline(text_file, tmp_path):
    out = tmp_path / "student.npz"
    r = _cli(["distill", DEFAULT_MODEL, "--student-config", json.dumps(STUDENT), "--data", text_file,
              "-o", str(out), "--steps", "3", "--batch", "2", "--seq", "16", "--warmup", "1",
              "--val-fraction", "0.2", "--loss", "response=1", "--loss", "ce=0.5", "--temperature", "2",
              "--max-new-tokens", "4", "--baseline", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output.strip().splitlines()[-1])
    names = [m["model"] for m in rep["models"]]
    assert names == ["teacher", "student (distilled)", "student (no teacher)"]
    t, s, b = rep["models"]
    m = modelfile.load(str(out))
    assert s["params"] == b["params"] == m.n_params() < t["params"] == 1071872
    assert s["file_bytes"] == os.path.getsize(out) and t["file_bytes"] == os.path.getsize(DEFAULT_MODEL)
    for row in rep["models"]:
        assert row["heldout_tokens"] == t["heldout_tokens"] > 0   # the same held-out tokens for all
        assert np.isfinite(row["heldout_perplexity"]) and row["decode_tokens_per_s"] > 0
    assert rep["losses"] == {"response": 1.0, "ce": 0.5} and rep["steps"] == 3
    assert m.meta["source"] == "minitx distill"


def test_cli_table(text_file, tmp_path):
    out = tmp_path / "s.npz"
    r = _cli(["distill", "--student-config", json.dumps(STUDENT), "--data", text_file, "-o", str(out),
              "--steps", "1", "--batch", "1", "--seq", "8", "--max-new-tokens", "2", "--quiet",
              "--loss", "feature=1", "--loss", "attention=0.5", "--layer-map", "0:2"])
    assert r.exit_code == 0, r.output
    assert "teacher" in r.output and "student (distilled)" in r.output and "decode tok/s" in r.output


@pytest.mark.parametrize("extra, msg", [
    (["--loss", "soft=1"], "unknown loss 'soft'"),
    (["--loss", "feature=1", "--layer-map", "0:7"], "teacher layer 7 is out of range"),
    (["--loss", "attention=1", "--layer-map", "3:0"], "student layer 3 is out of range"),
    (["--layer-map", "0:1"], "select one of them"),
    (["--temperature", "0"], "temperature must be > 0"),
    (["--student-config", '{"vocab_size": 512, "n_layers": 1}'], "differs from the teacher's 2048"),
    (["--student-config", '{"n_layers": 1'], "not valid JSON"),
    (["--student-config", "no_such.json"], "no such file"),
])
def test_cli_bad_flags_one_line_error_exit_2(text_file, tmp_path, extra, msg):
    out = tmp_path / "s.npz"
    args = ["distill", DEFAULT_MODEL, "--student-config", json.dumps(STUDENT), "--data", text_file,
            "-o", str(out), "--steps", "1", "--quiet", *extra]
    r = _cli(args)
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], r.output
    assert not out.exists()
