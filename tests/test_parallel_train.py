"""Tensor- and pipeline-parallel training: the split model's weight gradients are the unsharded
model's (simulated ranks, one process), the pipeline schedules as data (1F1B holds at most P
micro-batches, GPipe all K, both the same gradients), and ``mpiexec -n 2 … train --parallel
tp=2 | pp=2`` reaching the single-process weights, writing once and resuming under another layout.
The mpiexec tests skip when MPI cannot start."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from minitx import feeds, models
from minitx.distributed import model_parallel as mp
from minitx.distributed.pipeline import Pipeline, gpipe, in_flight, one_f_one_b, schedule, stages, timeline
from minitx.errors import MinitxError
from minitx.executor import Executor
from minitx.model import Model
from minitx.plugins.parallel import Layout, shard
from test_parallel_dp import _common, _compare, _one, corpus  # noqa: F401  (corpus: a fixture)
from test_parallel_mpi import CLI, mpi, mpirun  # noqa: F401  (mpi: the skip-if-no-MPI fixture)

CONFIGS = {
    "gpt2": {"arch": "gpt2", "vocab_size": 509, "n_ctx": 32, "d_model": 32, "n_layers": 3, "n_heads": 4, "d_ff": 48},
    "llama": {"arch": "llama", "vocab_size": 509, "n_ctx": 32, "d_model": 32, "n_layers": 3, "n_heads": 8,
              "n_kv_heads": 4, "d_ff": 48},
}
IDS = np.random.default_rng(0).integers(0, 509, (4, 7))


def _reference(arch: str):
    m = Model.from_config(CONFIGS[arch], seed=5)
    g = models.with_loss(m.graph)
    g.outputs = ["loss"]
    f = feeds.build(g, IDS, targets=np.roll(IDS, -1, axis=1))
    return m, g, f, Executor(g, m.params).forward_backward(f)


def _close(got, ref) -> None:
    assert sorted(got.grads) == sorted(ref.grads)
    np.testing.assert_allclose(got.outputs["loss"], ref.outputs["loss"], rtol=1e-6)
    for k, g in ref.grads.items():
        np.testing.assert_allclose(got.grads[k], g, rtol=1e-4, atol=2e-6, err_msg=k)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("spec", ["tp=2", "tp=4", "pp=2", "pp=3,mb=4", "pp=3,mb=4,schedule=gpipe", "sp=2", "sp=3,ring=1",
                                  "tp=2,sp=2"])
def test_simulated_split_training_gives_the_unsharded_gradients(arch, spec):
    m, g, f, ref = _reference(arch)
    red = mp.ModelParallel(mp.parse(spec))
    got = red.executor(g, m.params, ["numpy"]).forward_backward(f)
    _close(got, ref)


def test_tp_training_never_gathers_the_logits():
    """The loss is Megatron's vocabulary-parallel cross-entropy: no all-gather in the graph."""
    m, g, _, _ = _reference("gpt2")
    sg, _ = shard(g, m.params, Layout(2, 1))
    ops = [n.op for n in sg.nodes if "ranks" in n.tags]
    assert "all_gather" not in ops and ops[-1] == "vocab_cross_entropy"
    inference, _ = shard(m.graph, m.params, Layout(2, 1))            # (inference still gathers them)
    assert "all_gather" in [n.op for n in inference.nodes]


@pytest.mark.parametrize("P,K", [(2, 1), (2, 4), (3, 4), (4, 8), (4, 2)])
def test_schedules_as_data(P, K):
    for kind in ("1f1b", "gpipe"):
        plan = schedule(kind, P, K)
        for steps in plan:               # each stage runs every micro-batch's F before its B, once
            assert sorted(steps) == sorted([("F", k) for k in range(K)] + [("B", k) for k in range(K)])
            assert all(steps.index(("F", k)) < steps.index(("B", k)) for k in range(K))
    assert [in_flight(s) for s in gpipe(P, K)] == [K] * P              # GPipe: grows with the micro-batches
    assert [in_flight(s) for s in one_f_one_b(P, K)] == [min(P - s, K) for s in range(P)]   # 1F1B: ≤ P
    assert one_f_one_b(2, 3)[0] == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("B", 2)]


@pytest.mark.parametrize("P,K", [(2, 4), (4, 8), (3, 2)])
def test_both_schedules_take_the_same_time_with_the_same_bubble(P, K):
    """With a backward twice a forward (the usual cost), GPipe and 1F1B finish at the same tick:
    3(K + P − 1) ticks for 3K of work per stage, the bubble (P − 1)/(K + P − 1) — 1F1B saves
    memory, not time. Stage 0 of 1F1B runs its first backward as soon as the last stage sends it."""
    for kind in ("gpipe", "1f1b"):
        t = timeline(schedule(kind, P, K), forward=1, backward=2)
        end = max(tick + (1 if step[0] == "F" else 2) for stage in t for tick, step in stage.items())
        assert end == 3 * (K + P - 1), kind
    first_b = min(tick for tick, step in timeline(one_f_one_b(P, K), 1, 2)[0].items() if step[0] == "B")
    # F0 done on the last stage at tick P, then P backwards of 2 ticks back down to stage 0
    assert first_b == P + 2 * (P - 1)


def test_pipeline_runs_hold_what_the_schedule_says_and_agree():
    m, g, f, ref = _reference("gpt2")
    st = stages(g, m.params, 3)
    for kind in ("1f1b", "gpipe"):
        pipe = Pipeline(st, kind, 4)
        _close(pipe.forward_backward(f), ref)
        assert pipe.peak_held == {s: in_flight(steps) for s, steps in enumerate(schedule(kind, 3, 4))}
    with pytest.raises(MinitxError, match="cannot be cut into 8 micro-batches"):
        Pipeline(st, "1f1b", 8).forward_backward(f)


@pytest.mark.parametrize("text,msg", [
    ("tp=2,pp=2", "pp and tp or sp together is not implemented yet"),
    ("sp=2,tp=4", "sequence parallelism runs on the tp ranks themselves"),
    ("ring=1", "ring=1 is how sequence parallelism attends"),
    ("tp=2,dp=2", "data parallelism with tp or pp is not implemented yet"),
    ("mb=2", "mb and schedule are pipeline options"),
    ("pp=2,schedule=zb", "schedule must be one of 1f1b, gpipe"),
    ("tp=0", "tp must be a positive integer"),
])
def test_layout_refusals(text, msg):
    with pytest.raises(MinitxError, match=msg):
        mp.parse(text)


@pytest.mark.parametrize("spec", ["tp=2", "pp=2,mb=2", "pp=2,mb=2,schedule=gpipe", "sp=2", "sp=2,ring=1", "tp=2,sp=2"])
def test_mpiexec_split_training_reaches_the_single_process_weights(mpi, corpus, tmp_path, spec):
    d = corpus
    args = _common(d, accum=1)
    one = _one(*args, "-o", str(tmp_path / "one.npz"), "--json")
    assert one.returncode == 0, one.stderr
    sim = _one(*args, "-o", str(tmp_path / "sim.npz"), "--parallel", spec)
    assert sim.returncode == 0, sim.stderr
    r = mpirun(2, CLI, *args, "-o", str(tmp_path / "mpi.npz"), "--parallel", spec, "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1                    # rank 0 reports, once
    assert json.loads(r.stdout)["steps"] == 4 and os.path.exists(tmp_path / "mpi.ckpt.npz")
    assert _compare(tmp_path / "one.npz", tmp_path / "mpi.npz", exact=False) < 1e-5    # round-off
    _compare(tmp_path / "sim.npz", tmp_path / "mpi.npz", exact=True)                   # bit for bit


@pytest.mark.parametrize("spec", ["pp=2,mb=2", "pp=2,mb=4"])
def test_mpiexec_1f1b_with_messages_above_the_eager_limit(mpi, corpus, tmp_path, spec):
    """Activations of 2 x 128 x 128 float32 (128 KiB) per micro-batch: above MPI's eager limit a send
    completes only when its receiver posts the receive, and 1F1B has both stages send at once (the
    next micro-batch forward, a cotangent back). It deadlocked while a send waited for completion."""
    cfg = tmp_path / "wide.json"
    cfg.write_text(json.dumps({"arch": "gpt2", "n_ctx": 128, "d_model": 128, "n_layers": 2, "n_heads": 2, "d_ff": 256}))
    args = ["train", "--config", str(cfg), "--data", str(corpus / "t.txt"), "--vocab-size", "280", "--batch", "4",
            "--seq", "128", "--steps", "2", "--eval-every", "2", "--eval-batches", "1", "--warmup", "1",
            "--seed", "3", "--checkpoint-every", "2", "-q"]
    sim = _one(*args, "-o", str(tmp_path / "sim.npz"), "--parallel", spec)
    assert sim.returncode == 0, sim.stderr
    r = mpirun(2, CLI, *args, "-o", str(tmp_path / "mpi.npz"), "--parallel", spec, timeout=120,
               MINITX_MPI_TIMEOUT="30")
    assert r.returncode == 0, r.stderr
    _compare(tmp_path / "sim.npz", tmp_path / "mpi.npz", exact=True)


def test_mpiexec_tp_checkpoint_resumes_under_pp_and_in_one_process(mpi, corpus, tmp_path):
    d = corpus
    full = _one(*_common(d, steps=4, accum=1), "-o", str(tmp_path / "full.npz"))
    assert full.returncode == 0, full.stderr
    half = mpirun(2, CLI, *_common(d, steps=2, accum=1), "-o", str(tmp_path / "a.npz"), "--parallel", "tp=2",
                  timeout=120)
    assert half.returncode == 0, half.stderr
    for where, cmd in (("pp", "mpi"), ("one", "one")):
        args = [*_common(d, steps=4, accum=1), "--resume", str(tmp_path / "a.ckpt.npz"), "-o", str(tmp_path / f"{where}.npz")]
        r = mpirun(2, CLI, *args, "--parallel", "pp=2", timeout=120) if cmd == "mpi" else _one(*args)
        assert r.returncode == 0, r.stderr
        assert _compare(tmp_path / "full.npz", tmp_path / f"{where}.npz", exact=False) < 1e-5


def test_mpiexec_wrong_world_for_tp_is_one_line_on_every_rank(mpi, corpus, tmp_path):
    r = mpirun(2, CLI, *_common(corpus), "-o", str(tmp_path / "x.npz"), "--parallel", "tp=4", timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and all(ln.startswith("error: --parallel tp=4 needs 4 ranks") for ln in lines), r.stderr


FAULT = """
import os, signal, sys, time
from minitx.distributed import model_parallel as mp
from minitx.cli import main
calls = []
real = mp.ModelParallel.forward_backward
def forward_backward(self, *a):
    calls.append(1)
    if self.rank == 1 and len(calls) == 3:
        if sys.argv[1] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(600)
    return real(self, *a)
mp.ModelParallel.forward_backward = forward_backward
main(sys.argv[2:])
"""


@pytest.mark.parametrize("spec", ["tp=2", "pp=2,mb=2"])
@pytest.mark.parametrize("how", ["kill", "hang"])
def test_a_rank_that_dies_or_hangs_mid_training_ends_the_others(mpi, corpus, tmp_path, spec, how):
    import time

    script = tmp_path / "fault.py"
    script.write_text(FAULT)
    t0 = time.monotonic()
    r = mpirun(2, str(script), how, *_common(corpus, steps=6, accum=1), "-o", str(tmp_path / "x.npz"),
               "--parallel", spec, timeout=120, MINITX_MPI_TIMEOUT="3")
    assert r.returncode != 0
    assert time.monotonic() - t0 < 60
    assert not os.path.exists(tmp_path / "x.npz")              # no half-written model
    if how == "hang":                                          # rank 0's deadline ended it
        assert "got no answer within 3 s" in r.stderr or "got nothing within 3 s" in r.stderr, r.stderr
