"""Training: the loop learns, resumes bit for bit, checkpoints atomically; eval; the optimizer
against torch.optim.AdamW; bad inputs give one-line errors."""
from __future__ import annotations

import glob
import json
import math
import os

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from minitx import data, models
from minitx import training as tr
from minitx.errors import MinitxError
from minitx.executor import Executor
from minitx.model import Model
from minitx.optim import AdamW, clip_global_norm, decays, lr_at

TINY = {"arch": "gpt2", "vocab_size": 12, "n_ctx": 16, "d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32}


def _pattern_ids(n: int = 2000) -> np.ndarray:
    """A deterministic sequence a 1-layer model can learn: a repeating 0..9 cycle."""
    return (np.arange(n) % 10).astype(np.int64)


def _settings(**kw) -> tr.TrainSettings:
    base = dict(steps=6, batch_size=4, seq_len=12, lr=1e-2, min_lr=1e-3, warmup=2, eval_every=3, eval_batches=1,
                checkpoint_every=3, val_fraction=0.1, seed=3)
    return tr.TrainSettings(**{**base, **kw})


def test_loss_falls_on_a_learnable_sequence():
    st = tr.fresh_model(models.complete_config(TINY), None, _settings(steps=40, eval_every=40, lr=2e-2, warmup=4))
    losses = []
    tr.fit(st, _pattern_ids(), progress=lambda r: losses.append(r["loss"]))
    assert len(losses) == 40
    assert losses[0] > 2.0                       # ≈ ln 12 at the start
    assert np.mean(losses[-5:]) < 0.5 * losses[0]
    assert st.history[-1]["val_loss"] < 0.5 * losses[0]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_resume_equals_straight_run_bit_for_bit(tmp_path, arch):
    cfg = dict(TINY, dropout=0.1) if arch == "gpt2" else {
        "arch": "llama", "vocab_size": 12, "n_ctx": 16, "d_model": 16, "n_layers": 1, "n_heads": 2,
        "n_kv_heads": 1, "d_ff": 24, "dropout": 0.1}
    cfg = models.complete_config(cfg)
    ids = _pattern_ids()
    straight = tr.fit(tr.fresh_model(cfg, None, _settings(grad_accum=2)), ids)

    ckpt = str(tmp_path / "c.npz")

    def interrupt(rec):
        if rec["step"] == 5:          # after the checkpoint at step 3, before the one at step 6
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tr.fit(tr.fresh_model(cfg, None, _settings(grad_accum=2)), ids, checkpoint=ckpt, progress=interrupt)
    with np.load(ckpt, allow_pickle=False) as z:
        assert json.loads(z["__train__"].tobytes())["step"] == 3
    resumed = tr.load_checkpoint(ckpt)
    assert resumed.step == 3
    tr.fit(resumed, ids)
    assert resumed.step == straight.step == 6
    for k, a in straight.model.params.items():
        np.testing.assert_array_equal(resumed.model.params[k], a, err_msg=k)
    for k, a in straight.opt.m.items():
        np.testing.assert_array_equal(resumed.opt.m[k], a, err_msg=k)
    assert resumed.history == straight.history


def test_cli_train_interrupt_resume_matches_straight_run(tmp_path, monkeypatch, interrupt_at):
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. the dog sat on the log. " * 60)
    cfgf = tmp_path / "cfg.json"
    cfgf.write_text(json.dumps({"arch": "gpt2", "n_ctx": 16, "d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32}))
    common = ["--config", str(cfgf), "--data", str(text), "--vocab-size", "280", "--batch", "2", "--steps", "4",
              "--eval-every", "2", "--eval-batches", "1", "--warmup", "1", "--seed", "1", "--checkpoint-every", "2"]
    r = CliRunner().invoke(main, ["train", *common, "-q", "-o", str(tmp_path / "a.npz")])
    assert r.exit_code == 0, r.output
    assert "held-out loss" in r.output

    interrupt_at(3)
    ckpt = str(tmp_path / "b.ckpt.npz")
    r = CliRunner().invoke(main, ["train", *common, "-o", str(tmp_path / "b.npz"), "--checkpoint", ckpt])
    assert r.exit_code == 130 and not os.path.exists(tmp_path / "b.npz")
    monkeypatch.undo()
    assert tr.load_checkpoint(ckpt).step == 2            # the interrupt lost only step 3
    r = CliRunner().invoke(main, ["train", *common, "-q", "-o", str(tmp_path / "b.npz"), "--resume", ckpt])
    assert r.exit_code == 0, r.output
    a = np.load(tmp_path / "a.npz", allow_pickle=False)
    b = np.load(tmp_path / "b.npz", allow_pickle=False)
    params = [k for k in a.files if not k.startswith("__")]
    assert params and sorted(params) == sorted(k for k in b.files if not k.startswith("__"))
    for k in params:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # The output is an ordinary model file: eval reads it.
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "a.npz"), "--data", str(text), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]))
    assert 1.0 < res["perplexity"] < 280


def test_resume_must_repeat_the_run(tmp_path):
    """Another text, or a training flag given with another value than the checkpoint's, is a one-line
    error naming it (a resumed run keeps its settings); --steps may change."""
    ckpt = str(tmp_path / "c.npz")
    tr.fit(tr.fresh_model(models.complete_config(TINY), None, _settings(steps=2)), _pattern_ids(), checkpoint=ckpt)
    with pytest.raises(MinitxError, match=r"made with --data 2,000 tokens \(sha256 \w+\), not 1,999 tokens"):
        tr.fit(tr.load_checkpoint(ckpt), _pattern_ids(1999))
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 80)
    common = ["train", "--arch", "gpt2", "--data", str(text), "--vocab-size", "270", "--batch", "2",
              "--steps", "1", "-q", "-o", str(tmp_path / "m.npz")]
    assert CliRunner().invoke(main, common).exit_code == 0
    resume = [*common, "--resume", str(tmp_path / "m.ckpt.npz")]
    r = CliRunner().invoke(main, [*resume, "--lr", "0.1"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "made with --lr 0.003, not 0.1" in r.output, r.output
    r = CliRunner().invoke(main, [*resume, "--steps", "2", "--batch", "2"])    # unchanged flags are fine
    assert r.exit_code == 0 and "after 2 steps" in r.output, r.output


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    cfg = models.complete_config(TINY)
    st = tr.fresh_model(cfg, None, _settings())
    path = str(tmp_path / "ck.npz")
    tr.save_checkpoint(path, st)
    before = open(path, "rb").read()
    st.step = 99

    def broken_savez(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        tr.save_checkpoint(path, st)
    monkeypatch.undo()
    assert open(path, "rb").read() == before            # the old checkpoint is untouched
    assert glob.glob(str(tmp_path / ".*tmp")) == []      # and no temporary file is left behind
    assert tr.load_checkpoint(path).step == 0


def test_checkpoint_loads_without_pickle(tmp_path):
    st = tr.fresh_model(models.complete_config(TINY), None, _settings())
    path = tmp_path / "ck.npz"
    tr.save_checkpoint(path, st)
    with np.load(path, allow_pickle=False) as z:
        for k in z.files:
            assert z[k].dtype != object


def test_eval_of_uniform_model_has_perplexity_equal_to_vocab_size():
    cfg = models.complete_config({"arch": "llama", "vocab_size": 37, "n_ctx": 8, "d_model": 8, "n_layers": 1,
                                  "n_heads": 2, "n_kv_heads": 2, "d_ff": 16})
    m = Model.from_config(cfg, seed=0)
    m.params["lm_head.weight"][...] = 0.0                 # every logit 0: a uniform prediction
    ids = np.random.default_rng(0).integers(0, 37, 50)
    res = tr.evaluate(m, ids, stride=5)
    assert res["tokens"] == 49                            # every token after the first, once
    assert res["perplexity"] == pytest.approx(37.0, rel=1e-5)
    assert res["loss"] == pytest.approx(math.log(37.0), rel=1e-6)


def test_eval_windows_score_every_target_once_with_context():
    ids = np.arange(100)
    for n_ctx, stride in [(16, 16), (16, 5), (16, 1), (200, None)]:
        seen = []
        for x, y in data.eval_windows(ids, n_ctx, stride):
            assert len(x) == len(y) <= n_ctx
            np.testing.assert_array_equal(y[y != -100], x[y != -100] + 1)   # next-token targets
            seen.extend(y[y != -100].tolist())
        assert seen == list(range(1, 100)), (n_ctx, stride)


def test_sliding_window_eval_is_the_sum_over_windows():
    cfg = models.complete_config(TINY)
    m = Model.from_config(cfg, seed=2)
    ids = _pattern_ids(40)
    full = tr.evaluate(m, ids[:17])                       # one window: no sliding at all
    ex = Executor(m.graph, m.params)
    logits = ex.run(tr.batch_feeds(m.graph, ids[None, :16]), outputs=["logits"])["logits"][0]
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    direct = -np.mean(logp[np.arange(16), ids[1:17]])
    assert full["loss"] == pytest.approx(float(direct), rel=1e-5)


# ---------------------------------------------------------------------------------- optimizer
def test_adamw_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    params = {"layers.0.mlp.up.weight": rng.normal(size=(4, 3)).astype(np.float32),
              "layers.0.mlp.up.bias": rng.normal(size=3).astype(np.float32),
              "tok_emb.weight": rng.normal(size=(5, 3)).astype(np.float32)}
    tparams = {k: torch.nn.Parameter(torch.tensor(a)) for k, a in params.items()}
    decay = [tparams[k] for k in params if decays(k, params[k].shape)]
    no_decay = [tparams[k] for k in params if not decays(k, params[k].shape)]
    assert len(decay) == 1 and len(no_decay) == 2
    topt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    opt = AdamW(params, (0.9, 0.95), 1e-8, 0.1)
    for step in range(5):
        grads = {k: rng.normal(size=a.shape).astype(np.float32) for k, a in params.items()}
        lr = lr_at(step, 1e-2, 2, 5, 1e-3)
        for g in topt.param_groups:
            g["lr"] = lr
        for k, g in grads.items():
            tparams[k].grad = torch.tensor(g)
        topt.step()
        opt.step(params, grads, lr)
    for k, a in params.items():
        np.testing.assert_allclose(a, tparams[k].detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=k)


def test_clip_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    grads = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=7).astype(np.float32)}
    ts = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads.values()]
    for t, g in zip(ts, grads.values()):
        t.grad = torch.tensor(g)
    tnorm = torch.nn.utils.clip_grad_norm_(ts, 0.5)
    norm = clip_global_norm(grads, 0.5)
    assert norm == pytest.approx(float(tnorm), rel=1e-5)
    for t, g in zip(ts, grads.values()):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-5)
    assert math.sqrt(sum(float((g ** 2).sum()) for g in grads.values())) == pytest.approx(0.5, rel=1e-4)


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0, 1.0, 4, 104, 0.1) == pytest.approx(0.25)
    assert lr_at(3, 1.0, 4, 104, 0.1) == pytest.approx(1.0)
    assert lr_at(4, 1.0, 4, 104, 0.1) == pytest.approx(1.0)
    assert lr_at(54, 1.0, 4, 104, 0.1) == pytest.approx(0.55)     # halfway: the mean of lr and min_lr
    assert lr_at(104, 1.0, 4, 104, 0.1) == pytest.approx(0.1)


# --------------------------------------------------------------------------------- bad inputs
def _cli(*args):
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.output


def test_bad_inputs_are_one_line_errors(tmp_path):
    out = str(tmp_path / "m.npz")
    code, msg = _cli("train", "--arch", "gpt2", "--data", str(tmp_path / "nope.txt"), "-o", out)
    assert code == 2 and "nope.txt: no such data file" in msg and "Traceback" not in msg
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, msg = _cli("train", "--arch", "gpt2", "--data", str(empty), "-o", out)
    assert code == 2 and "empty" in msg
    text = tmp_path / "t.txt"
    text.write_text("hello world. " * 100)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, msg = _cli("train", "--config", str(bad), "--data", str(text), "-o", out)
    assert code == 2 and "bad.json: not valid JSON" in msg
    bad.write_text(json.dumps({"arch": "gpt2", "d_model": 30, "n_heads": 4}))
    code, msg = _cli("train", "--config", str(bad), "--data", str(text), "-o", out, "--vocab-size", "300")
    assert code == 2 and "d_model 30 is not divisible by n_heads 4" in msg
    bad.write_text(json.dumps({"arch": "gpt2", "n_layerz": 2}))
    code, msg = _cli("train", "--config", str(bad), "--data", str(text), "-o", out, "--vocab-size", "300")
    assert code == 2 and "n_layerz" in msg
    code, msg = _cli("train", "--arch", "gpt2", "--data", str(text), "-o", out, "--steps", "0")
    assert code == 2 and "--steps must be a positive integer" in msg
    code, msg = _cli("train", "--arch", "gpt2", "--data", str(text), "-o", out, "--resume", str(text))
    assert code == 2 and "not a valid checkpoint" in msg
    code, msg = _cli("train", "--arch", "gpt2", "--data", str(text), "-o", str(tmp_path / "no" / "m.npz"))
    assert code == 2 and "does not exist" in msg
    code, msg = _cli("eval", str(tmp_path / "none.npz"), "--data", str(text))
    assert code == 2 and "no such model file" in msg
    assert not os.path.exists(out)


def test_short_text_is_refused():
    with pytest.raises(MinitxError, match="too few"):
        data.split(np.arange(10), 0.1, 16)


def test_given_tokenizer_is_used(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("a rose is a rose is a rose. " * 80)
    tok = data.train_tokenizer(text.read_text(), 270)
    (tmp_path / "tok.json").write_text(tok)
    out = tmp_path / "m.npz"
    r = CliRunner().invoke(main, ["train", "--arch", "llama", "--data", str(text), "--tokenizer",
                                  str(tmp_path / "tok.json"), "--steps", "2", "--batch", "2", "--seq", "16",
                                  "-q", "-o", str(out)])
    assert r.exit_code == 0, r.output
    from minitx import modelfile

    m = modelfile.load(out)
    from tokenizers import Tokenizer

    assert m.tokenizer_json == tok and m.vocab_size == Tokenizer.from_str(tok).get_vocab_size()
    code, msg = _cli("train", "--arch", "gpt2", "--data", str(text), "--tokenizer", str(text), "-o", str(out))
    assert code == 2 and "not a valid tokenizer.json" in msg


def test_checkpoint_gets_the_usual_file_permissions(tmp_path):
    st = tr.fresh_model(models.complete_config(TINY), None, _settings())
    path = tmp_path / "ck.npz"
    tr.save_checkpoint(path, st)
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask    # not the 0600 of a bare mkstemp


def test_recompute_plugin_trains_the_same_weights_in_less_activation_memory(tmp_path):
    """--plugin recompute: an exact rewrite, so training gives the very same weights, while the
    recorded peak activation memory drops; the plugin survives a checkpoint round trip."""
    cfg = models.complete_config(dict(TINY, n_layers=4))
    ids = _pattern_ids()
    peaks: dict[str, list[int]] = {"plain": [], "recompute": []}
    plain = tr.fit(tr.fresh_model(cfg, None, _settings()), ids,
                     progress=lambda r: peaks["plain"].append(r["peak_activation_bytes"]))
    ckpt = str(tmp_path / "c.npz")
    re = tr.fit(tr.fresh_model(cfg, None, _settings(plugins=("recompute:every",))), ids, checkpoint=ckpt,
                  progress=lambda r: peaks["recompute"].append(r["peak_activation_bytes"]))
    for k, a in plain.model.params.items():
        np.testing.assert_array_equal(re.model.params[k], a, err_msg=k)
    assert max(peaks["recompute"]) < 0.75 * max(peaks["plain"])
    assert tr.load_checkpoint(ckpt).settings.plugins == ("recompute:every",)


def test_training_refuses_a_rewrite_that_changes_the_weights():
    st = tr.fresh_model(models.complete_config(TINY), None, _settings(plugins=("quant:int8",)))
    with pytest.raises(MinitxError, match="only exact rewrites"):
        tr.fit(st, _pattern_ids())


def test_evaluate_runs_a_head_pruned_model():
    """Head pruning narrows some layers' KV caches: evaluation must feed caches as wide as the
    rewritten graph declares (it fed the config's width and the attention concat failed)."""
    from minitx import plugin

    m = Model.from_config(models.complete_config(dict(TINY, n_heads=4)), seed=0)
    pruned = plugin.optimize(m, ["sparsity:weights=heads,sparsity=0.5"], validate=False)
    widths = {v.shape[-1] for v in pruned.graph.inputs if v.name.startswith("past.")}
    assert min(widths) < 16  # some cache really is narrower than d_model
    r = tr.evaluate(pruned, _pattern_ids(200))
    assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1


# ------------------------------------------------------------------------ hostile checkpoints
def _tampered(tmp_path, meta_edit=None, arrays_edit=None) -> str:
    """A real checkpoint, rewritten with its ``__train__`` JSON and/or arrays edited."""
    st = tr.fresh_model(models.complete_config(TINY), None, _settings())
    good = tmp_path / "good.npz"
    tr.save_checkpoint(good, st)
    with np.load(good, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if meta_edit is not None:
        meta = meta_edit(json.loads(arrays["__train__"].tobytes()))
        text = meta if isinstance(meta, str) else json.dumps(meta)
        arrays["__train__"] = np.frombuffer(text.encode(), np.uint8)
    if arrays_edit is not None:
        arrays_edit(arrays)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    return str(bad)


def _drop(key):
    def edit(m):
        del m[key]
        return m
    return edit


def _set(key, value):
    def edit(m):
        m[key] = value
        return m
    return edit


def _float64(arrays):
    arrays["param.tok_emb.weight"] = arrays["param.tok_emb.weight"].astype(np.float64)


@pytest.mark.parametrize("meta_edit, arrays_edit, msg", [
    (lambda m: [m], None, "'__train__' must be a JSON object, got list"),
    (_drop("settings"), None, "'__train__' has no 'settings'"),
    (_set("settings", {"steps": "many"}), None, "settings are malformed"),
    (_set("rng", {"bit_generator": "PCG64", "state": "garbage"}), None, "random generator's state"),
    (_set("rng", [1, 2, 3]), None, "random generator's state"),
    (_set("step", "3"), None, "step must be a non-negative integer, got '3'"),
    (_set("step", -1), None, "step must be a non-negative integer"),
    (_set("step", 7), None, "step 7 is beyond the run's 6 steps"),
    (lambda m: "[" * 100_000 + "]" * 100_000, None, "nested too deeply|not valid JSON"),
    (None, _float64, "'param.tok_emb.weight' is float64, expected float32"),
])
def test_bad_checkpoints_are_refused_in_one_line(tmp_path, meta_edit, arrays_edit, msg):
    path = _tampered(tmp_path, meta_edit, arrays_edit)
    with pytest.raises(MinitxError, match=msg) as e:
        tr.load_checkpoint(path)
    assert "\n" not in str(e.value) and "bad.npz" in str(e.value)


def test_cli_refuses_bad_checkpoints_and_outputs_that_destroy_inputs(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 80)
    common = ["train", "--arch", "gpt2", "--data", str(text), "--vocab-size", "270", "--batch", "2", "--seq", "8",
              "--steps", "2", "-q"]
    assert _cli(*common, "-o", str(tmp_path / "m.npz"))[0] == 0
    # A checkpoint at step 2 of 2 resumed with --steps 1: refused, not silently "done".
    code, msg = _cli(*common, "--steps", "1", "-o", str(tmp_path / "n.npz"), "--resume", str(tmp_path / "m.ckpt.npz"))
    assert code == 2 and msg.count("\n") == 1 and "beyond --steps 1" in msg, msg
    # The output may not be the checkpoint (however spelled) nor the text it trains on.
    os.symlink(tmp_path / "m.npz", tmp_path / "link.npz")
    for out, ck, what in [("x.npz", "x.npz", "same file"), ("m.npz", "link.npz", "same file"),
                          ("t.txt", None, "same file as --data")]:
        args = [*common, "-o", str(tmp_path / out)] + (["--checkpoint", str(tmp_path / ck)] if ck else [])
        code, msg = _cli(*args)
        assert code == 2 and msg.count("\n") == 1 and what in msg, msg
    assert text.read_text().startswith("the cat") and not (tmp_path / "x.npz").exists()
    bad = _tampered(tmp_path, _set("step", "1"))
    code, msg = _cli(*common, "-o", str(tmp_path / "k.npz"), "--resume", bad)
    assert code == 2 and msg.count("\n") == 1 and "step must be a non-negative integer" in msg, msg


def test_cli_train_json_report_and_threads(tmp_path, monkeypatch):
    from minitx import threads

    seen = []
    monkeypatch.setattr(threads, "configure", lambda n=None: seen.append(n) or 1)
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 80)
    r = CliRunner().invoke(main, ["train", "--arch", "gpt2", "--data", str(text), "--vocab-size", "270",
                                  "--batch-size", "2", "--seq-len", "8", "--steps", "2", "--eval-every", "1",
                                  "--threads", "1", "--json", "-o", str(tmp_path / "m.npz")])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)            # the progress line went to stderr
    assert rep["steps"] == 2 and rep["output"] == str(tmp_path / "m.npz") and len(rep["history"]) == 2
    assert rep["val_perplexity"] == pytest.approx(math.exp(rep["val_loss"]))
    assert seen == [1]
    assert "--batch-size" not in CliRunner().invoke(main, ["train", "--help"]).output   # a hidden alias
