"""Data-parallel training: ``mpiexec -n 2 python cli.py train … --parallel dp=2`` trains on the
single-process run's global batches and reaches its weights (float round-off), writes once, and
its checkpoint resumes in one process. The mpiexec tests skip when MPI cannot start (CI installs
``[mpi]``, so they run there)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from minitx.distributed import data_parallel as dp
from minitx.errors import MinitxError
from test_parallel_mpi import CLI, ROOT, _env, mpi, mpirun  # noqa: F401  (mpi: the skip-if-no-MPI fixture)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("dp")
    (d / "t.txt").write_text("the cat sat on the mat. the dog sat on the log. a bird flew over the hill. " * 40)
    (d / "cfg.json").write_text(json.dumps({"arch": "gpt2", "n_ctx": 16, "d_model": 16, "n_layers": 2,
                                            "n_heads": 2, "d_ff": 32}))
    return d


def _common(d, steps=4, batch=4, accum=2):
    return ["train", "--config", str(d / "cfg.json"), "--data", str(d / "t.txt"), "--vocab-size", "280",
            "--batch", str(batch), "--grad-accum", str(accum), "--steps", str(steps), "--eval-every", "2",
            "--eval-batches", "1", "--warmup", "1", "--seed", "3", "--checkpoint-every", "2", "-q"]


def _one(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, CLI, *args], capture_output=True, text=True, timeout=120, env=_env(),
                          cwd=ROOT)


def _weights(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files if not k.startswith("__")}


def _compare(a, b, exact: bool) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa and sorted(wa) == sorted(wb)
    worst = 0.0
    for k in wa:
        if exact:
            np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
        worst = max(worst, float(np.abs(wa[k].astype(np.float64) - wb[k]).max()))
    return worst


def test_mpiexec_dp2_reaches_the_single_process_weights(mpi, corpus, tmp_path):
    d = corpus
    one = _one(*_common(d), "-o", str(tmp_path / "one.npz"), "--json")
    assert one.returncode == 0, one.stderr
    sim = _one(*_common(d), "-o", str(tmp_path / "sim.npz"), "--parallel", "dp=2", "--json")
    assert sim.returncode == 0, sim.stderr
    r = mpirun(2, CLI, *_common(d), "-o", str(tmp_path / "mpi.npz"), "--parallel", "dp=2", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1          # rank 0 reports, once
    rep = json.loads(r.stdout)
    assert rep["steps"] == 4 and os.path.exists(tmp_path / "mpi.ckpt.npz")
    # Same global batches, gradients averaged: the one-process weights up to float round-off
    # (each slice's mean is scaled by 1/(B/2), then the halves summed) ...
    worst = _compare(tmp_path / "one.npz", tmp_path / "mpi.npz", exact=False)
    assert worst < 1e-5, worst
    # ... and bit for bit the simulated two ranks (with 2 ranks MPI's sum is the same float sum).
    _compare(tmp_path / "sim.npz", tmp_path / "mpi.npz", exact=True)
    assert abs(rep["val_loss"] - json.loads(one.stdout)["val_loss"]) < 1e-4


def test_batch_that_dp_does_not_divide_is_one_line_on_every_rank(mpi, corpus, tmp_path):
    r = mpirun(2, CLI, *_common(corpus, batch=3), "-o", str(tmp_path / "x.npz"), "--parallel", "dp=2", timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and all(ln.startswith("error: --batch 3 does not split into 2") for ln in lines), r.stderr
    assert not os.path.exists(tmp_path / "x.npz")


def test_mpiexec_without_dp_is_refused(mpi, corpus, tmp_path):
    r = mpirun(2, CLI, *_common(corpus), "-o", str(tmp_path / "x.npz"), timeout=60)
    assert r.returncode == 2 and r.stderr.count("give --parallel dp=2") == 2, r.stderr


def test_dp2_checkpoint_resumes_in_one_process(mpi, corpus, tmp_path):
    """The checkpoint holds the global state only: resumed by one process (a different rank count)
    it continues as the straight dp=2 run does, to round-off."""
    d = corpus
    ck = str(tmp_path / "half.ckpt.npz")
    r = mpirun(2, CLI, *_common(d, steps=2), "-o", str(tmp_path / "half.npz"), "--checkpoint", ck,
               "--parallel", "dp=2", timeout=120)
    assert r.returncode == 0, r.stderr
    r = _one(*_common(d, steps=4), "-o", str(tmp_path / "resumed.npz"), "--resume", ck)
    assert r.returncode == 0, r.stderr
    straight = _one(*_common(d, steps=4), "-o", str(tmp_path / "straight.npz"), "--parallel", "dp=2")
    assert straight.returncode == 0, straight.stderr
    worst = _compare(tmp_path / "straight.npz", tmp_path / "resumed.npz", exact=False)
    assert worst < 1e-5, worst
    # Resumed with dp=2 simulated, it is the straight dp=2 run bit for bit.
    r = _one(*_common(d, steps=4), "-o", str(tmp_path / "resumed2.npz"), "--resume", ck, "--parallel", "dp=2")
    assert r.returncode == 0, r.stderr
    _compare(tmp_path / "straight.npz", tmp_path / "resumed2.npz", exact=True)


def test_parse_and_refusals():
    assert dp.parse(None) == (1, False) and dp.parse("dp=4") == (4, False) and dp.parse("dp=2,zero=1") == (2, True)
    for bad in ("tp=2", "dp=0", "dp=x", "dp", "dp=2,tp=2", "dp=2,zero=2", "dp=2,dp=2", "zero=1"):
        with pytest.raises(MinitxError, match="--parallel"):
            dp.parse(bad)
    with pytest.raises(MinitxError, match="--batch 6 does not split into 4"):
        dp.reducer("dp=4", 6)


def test_buckets_are_flat_per_dtype_and_bounded():
    g = {"a": np.zeros(5, np.float32), "b": np.zeros(3, np.float32), "c": np.zeros(2, np.float64),
         "d": np.zeros(9, np.float32), "e": np.zeros(1, np.float32)}
    out = dp.buckets(g, size=8)
    assert sorted(k for b in out for k in b) == sorted(g)
    for b in out:
        assert len({g[k].dtype for k in b}) == 1
        assert len(b) == 1 or sum(g[k].size for k in b) <= 8
    assert ["a", "b"] in out and ["d"] in out


def test_simulated_reducer_averages_the_slices():
    red = dp.LocalReducer(2)
    parts = [{"w": np.array([1.0, 2.0], np.float32)}, {"w": np.array([3.0, 6.0], np.float32)}]
    grads, stats = red.reduce(parts, np.array([2.0, 4.0, 0.0]))    # last: overflow flag
    np.testing.assert_array_equal(grads["w"], [2.0, 4.0])
    np.testing.assert_array_equal(stats, [1.0, 2.0, 0.0])
    grads, stats = red.reduce([{}, parts[1]], np.array([2.0, 4.0, 1.0]))   # slice 0 overflowed: skip
    assert grads == {} and stats[-1] > 0


AGREE = """
import sys
from mpi4py import MPI
from minitx.distributed.data_parallel import MPIReducer
from minitx.errors import MinitxError
red = MPIReducer(MPI.COMM_WORLD)
red.agree("ab" * 32, "tokens")                                  # the same: passes
try:
    red.agree(("ab" if red.rank == 0 else "cd") * 32, "tokens")
except MinitxError as e:
    print(red.rank, e)
"""


def test_ranks_that_read_different_text_are_refused(mpi):
    r = mpirun(2, "-c", AGREE, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = sorted(r.stdout.strip().splitlines())
    assert len(lines) == 2 and all("rank 1 has other tokens than rank 0" in ln for ln in lines), r.stdout


OVERFLOW = """
import sys
import numpy as np
from minitx import models, training as tr
from minitx.distributed import data_parallel as dp
from minitx.precision import LossScaler
cfg = {"arch": "gpt2", "vocab_size": 12, "n_ctx": 16, "d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32}
s = tr.TrainSettings(steps=2, batch_size=4, seq_len=12, lr=1e-2, min_lr=1e-3, warmup=1, eval_every=0,
                     eval_batches=1, val_fraction=0.1, seed=3, precision="float16")
st = tr.fresh_model(models.complete_config(cfg), None, s)
st.scaler = LossScaler(scale=2.0 ** 17, max_scale=2.0 ** 17, backoff=0.25)   # the first step overflows
recs = []
tr.fit(st, (np.arange(2000) % 10).astype(np.int64), progress=recs.append, reducer=dp.reducer("dp=2", 4))
if st.scaler.skipped == 1 and [r["skipped"] for r in recs] == [True, False]:
    np.savez(sys.argv[1], **st.model.params)
"""


def test_an_overflow_skips_the_step_on_every_rank(mpi, tmp_path):
    """float16 with a loss scale beyond its range: the first step overflows; every rank skips it,
    lowers the scale and takes the second — as the simulated two ranks do, bit for bit."""
    r = mpirun(2, "-c", OVERFLOW, str(tmp_path / "mpi.npz"), timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-c", OVERFLOW, str(tmp_path / "sim.npz")], capture_output=True, text=True,
                       timeout=60, env=_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    _compare(tmp_path / "mpi.npz", tmp_path / "sim.npz", exact=True)


ZERO = """
import sys
import numpy as np
from minitx import models, training as tr
from minitx.distributed import data_parallel as dp
cfg = {"arch": "gpt2", "vocab_size": 12, "n_ctx": 16, "d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 32}
s = tr.TrainSettings(steps=3, batch_size=4, seq_len=12, lr=1e-2, min_lr=1e-3, warmup=1, eval_every=0,
                     eval_batches=1, val_fraction=0.1, seed=3, checkpoint_every=2)
st = tr.fresh_model(models.complete_config(cfg), None, s)
red = dp.reducer(sys.argv[2], 4)
tr.fit(st, (np.arange(2000) % 10).astype(np.int64), reducer=red, checkpoint=sys.argv[1] + ".ckpt.npz")
held = sum(a.size for a in st.opt.m.values()) / sum(a.size for a in st.model.params.values())
print(f"moments {held:.3f}", flush=True)
if red.is_writer:
    np.savez(sys.argv[1] + ".npz", **st.model.params)
"""


def test_zero1_shards_the_moments_and_keeps_the_weights_bit_for_bit(mpi, tmp_path):
    """dp=2,zero=1: each rank keeps about half the AdamW moments, yet the weights and the
    checkpoint (moments gathered) are the plain dp=2 run's, bit for bit."""
    sim = subprocess.run([sys.executable, "-c", ZERO, str(tmp_path / "sim"), "dp=2"], capture_output=True, text=True,
                         timeout=60, env=_env(), cwd=ROOT)
    assert sim.returncode == 0, sim.stderr
    assert sim.stdout.strip() == "moments 1.000"
    r = mpirun(2, "-c", ZERO, str(tmp_path / "zero"), "dp=2,zero=1", timeout=60)
    assert r.returncode == 0, r.stderr
    shares = [float(ln.split()[1]) for ln in r.stdout.split("\n") if ln.startswith("moments")]
    assert len(shares) == 2 and all(0.3 < x < 0.7 for x in shares) and abs(sum(shares) - 1) < 1e-9, shares
    _compare(tmp_path / "sim.npz", tmp_path / "zero.npz", exact=True)
    _compare(tmp_path / "sim.ckpt.npz", tmp_path / "zero.ckpt.npz", exact=True)
    with np.load(tmp_path / "zero.ckpt.npz", allow_pickle=False) as z:   # every rank's moments, gathered
        assert sum(k.startswith("opt.m.") for k in z.files) == sum(k.startswith("param.") for k in z.files) > 0
