"""`minitx distill --pairs`: an encoder–decoder student learns a teacher's distributions on
source<TAB>target pairs (training/pairs.py PairDistillation), padded target slots left out."""
import json

import numpy as np
import pytest

from minitx import seq2seq
from minitx.errors import MinitxError
from minitx.model import Model
from minitx.training import TrainSettings, fit, new_state
from minitx.training import pairs as pt

CFG = {"arch": "transformer", "vocab_size": 13, "n_ctx": 16, "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64}


CFG_START = Model.from_config(CFG, seed=0).config["decoder_start_token_id"]


def _digits(rng):
    return rng.integers(3, 13, rng.integers(2, 7)).tolist()   # ids 3…12; 0 pad/start, 1 EOS


def _accuracy(m, test):
    out = seq2seq.generate(m, test, 8)
    return float(np.mean([o == s[::-1] + [1] for o, s in zip(out, test)]))


@pytest.fixture(scope="module")
def task():
    rng = np.random.default_rng(0)
    pairs = [(s, s[::-1]) for s in (_digits(rng) for _ in range(2000))]
    test = [_digits(rng) for _ in range(100)]
    teacher = Model.from_config(CFG, seed=0)
    settings = TrainSettings(steps=400, batch_size=32, lr=3e-3, min_lr=3e-4, warmup=20, weight_decay=0.0,
                             eval_every=0, val_fraction=0.05)
    fit(new_state(teacher, settings), pt.stream(pairs), pt.PairCrossEntropy(pairs))
    assert _accuracy(teacher, test) >= 0.9
    return teacher, pairs, test


def _kl_by_hand(student, teacher, pairs, T):
    """T² · mean over real target slots of KL(teacher ‖ student), from each model's logits on each
    pair alone (no padding anywhere)."""
    total, n = 0.0, 0
    for src, t in pairs:
        dec = [[int(CFG_START)] + list(t)]   # decoder inputs: start, then the targets (their last predicts EOS)
        ls, lt = seq2seq.logits(student, [src], dec)[0], seq2seq.logits(teacher, [src], dec)[0]
        for j in range(len(t) + 1):
            a = lt[j].astype(np.float64) / T
            b = ls[j].astype(np.float64) / T
            pa = np.exp(a - a.max()) / np.exp(a - a.max()).sum()
            la, lb = np.log(pa), b - b.max() - np.log(np.exp(b - b.max()).sum())
            total += float((pa * (la - lb)).sum())
            n += 1
    return T * T * total / n


def test_response_loss_is_the_kl_over_real_target_slots(task):
    teacher, pairs, _ = task
    student = Model.from_config({**CFG, "d_model": 16, "d_ff": 32}, seed=1)
    chosen = [pairs[i] for i in (0, 5, 9, 17)]   # different lengths: padded slots in the batch
    assert len({len(p[1]) for p in chosen}) > 1
    obj = pt.PairDistillation(chosen, teacher=teacher, losses={"response": 1.0}, temperature=2.0)
    st = new_state(student, TrainSettings(steps=1, batch_size=4))
    obj.prepare(st, ("numpy",))
    from minitx.executor import Executor

    g = obj.loss_graph(student.graph)
    got = Executor(g, student.params).run(obj.extra_feeds(np.arange(4)[:, None]))["loss"]
    assert float(got) == pytest.approx(_kl_by_hand(student, teacher, chosen, 2.0), rel=1e-4)


def test_a_student_learns_the_task_from_the_teacher_alone(task):
    """Only the response loss (no labels): a smaller student reverses unseen strings."""
    teacher, pairs, test = task
    student = Model.from_config(CFG, seed=1)
    assert _accuracy(student, test) == 0
    settings = TrainSettings(steps=400, batch_size=32, lr=1e-2, min_lr=1e-3, warmup=20, weight_decay=0.0,
                             eval_every=0, val_fraction=0.05)
    recs = []
    obj = pt.PairDistillation(pairs, teacher=teacher, losses={"response": 1.0}, temperature=1.0)
    fit(new_state(student, settings), pt.stream(pairs), obj, progress=recs.append)
    assert np.mean([r["loss"] for r in recs[-20:]]) < 0.2 * np.mean([r["loss"] for r in recs[:20]])
    assert _accuracy(student, test) >= 0.9


@pytest.mark.parametrize("change,match", [({"arch": "gpt2"}, "must be an encoder–decoder"),
                                          ({"eos_token_id": 2}, "eos_token_id"),
                                          ({"vocab_size": 14}, "vocab_size")])
def test_mismatched_teachers_are_refused(task, change, match):
    teacher, pairs, _ = task
    other = Model.from_config({**CFG, **change, **({"n_ctx": 16} if change.get("arch") == "gpt2" else {})}, seed=0)
    student = Model.from_config(CFG, seed=1)
    with pytest.raises(MinitxError, match=match):
        pt.PairDistillation(pairs, teacher=other).prepare(new_state(student, TrainSettings(steps=1)), ("numpy",))


def _cli(*args):
    from click.testing import CliRunner
    from minitx.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_distill_pairs_writes_the_student_and_reports_both(task, tmp_path):
    from minitx import modelfile

    teacher, pairs, _ = task
    tfile, pfile, out = tmp_path / "t.npz", tmp_path / "pairs.tsv", tmp_path / "s.npz"
    modelfile.save(teacher, str(tfile))
    pfile.write_text("".join(f"{' '.join(map(str, s))}\t{' '.join(map(str, t))}\n" for s, t in pairs[:400]))
    r = _cli("distill", tfile, "--pairs", pfile, "--student-config", '{"d_model": 16, "d_ff": 32}', "--steps", 20,
             "--batch", 16, "--loss", "response", "--loss", "ce=0.5", "-o", out, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output.strip().splitlines()[-1])
    student = modelfile.load(str(out))
    assert student.config["d_model"] == 16 and rep["student_params"] == student.n_params() < rep["teacher_params"]
    assert rep["held_out_pairs"] == 20 and 0.0 <= rep["greedy_agreement"] <= 1.0
    assert rep["teacher_val_loss"] < rep["val_loss"]   # 20 steps: the student is still behind its teacher
    for args, msg in ((["--data", pfile], "distilled on --pairs"),
                      (["--pairs", pfile, "--data", pfile], "give one of --data"),
                      (["--pairs", pfile, "--loss", "feature"], "unknown loss 'feature' for an encoder–decoder"),
                      (["--pairs", pfile, "--baseline"], "--baseline is for decoder teachers")):
        r = _cli("distill", tfile, *args, "--student-config", "{}", "-o", tmp_path / "x.npz", "--quiet")
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, (args, r.output)
    assert not (tmp_path / "x.npz").exists()
