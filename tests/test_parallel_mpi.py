"""Across processes: ``mpiexec -n N python cli.py … --parallel …`` prints what the single-process
command prints, and failures end every rank within bounded time. Skipped when MPI cannot start
(``.ci/run`` installs the ``mpi`` extra, so CI runs them)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from minitx import modelfile
from minitx.model import Model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(ROOT, "cli.py")
LIMIT = 240


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "MINITX_MPI_TIMEOUT": "20"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra.pop("PYTHONPATH", ""), ROOT, env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def mpirun(n: int, *args: str, timeout: float = LIMIT, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mpiexec", "-n", str(n), sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(**env), cwd=ROOT)


@pytest.fixture(scope="module")
def mpi() -> None:
    if shutil.which("mpiexec") is None:
        pytest.skip("mpiexec is not installed (pip install '.[mpi]')")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py is not installed (pip install '.[mpi]')")
    try:
        r = mpirun(2, "-c", "from mpi4py import MPI; assert MPI.COMM_WORLD.Get_size() == 2", timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("mpiexec -n 2 did not start within 60 s")
    if r.returncode != 0:
        pytest.skip(f"mpiexec -n 2 cannot start here: {r.stderr.strip()[-200:]}")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    """A grouped-query LLaMA (8 heads, 4 KV heads, 3 layers: pp=2 splits it 2 + 1) with an odd vocabulary."""
    cfg = {"arch": "llama", "vocab_size": 509, "n_ctx": 64, "d_model": 64, "n_layers": 3, "n_heads": 8,
           "n_kv_heads": 4, "d_ff": 96}
    path = str(tmp_path_factory.mktemp("mpi") / "llama.npz")
    modelfile.save(Model.from_config(cfg, seed=11), path)
    return path


def _single(*args: str) -> str:
    r = subprocess.run([sys.executable, CLI, *args], capture_output=True, text=True, timeout=LIMIT, env=_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("n,spec", [(2, "tp=2"), (2, "pp=2"), (2, "pp=2,mb=2"), (2, "sp=2"), (4, "tp=2,pp=2"),
                                    (2, "sp=2,ring=1"), (4, "sp=2,ring=1,pp=2"), (2, "tp=2,sp=2")])
def test_mpiexec_infer_prints_once_what_one_process_prints(mpi, llama, n, spec):
    args = ["infer", llama, "--ids", "5,1,4,1", "--ids", "9,2", "-n", "12", "--json"]
    want = _single(*args)
    r = mpirun(n, CLI, *args, "--parallel", spec)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want                      # once: rank 0 prints, the others are silent
    assert len(json.loads(want)["token_ids"][0]) == 12


def test_mpiexec_encoder_embeddings_match(mpi, tmp_path):
    path = str(tmp_path / "bert.npz")
    cfg = {"arch": "bert", "vocab_size": 301, "n_ctx": 32, "type_vocab_size": 2, "d_model": 32, "n_layers": 2,
           "n_heads": 4, "d_ff": 48}
    modelfile.save(Model.from_config(cfg, seed=2), path)
    args = ["infer", path, "--ids", "1,2,3", "--ids", "4,5", "--json"]
    want = np.array(json.loads(_single(*args))["embeddings"])
    r = mpirun(2, CLI, *args, "--parallel", "tp=2")
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.array(json.loads(r.stdout)["embeddings"]), want, rtol=1e-5, atol=1e-6)


def test_wrong_world_size_is_one_line_on_every_rank(mpi, llama):
    r = mpirun(3, CLI, "infer", llama, "--ids", "1,2", "--parallel", "tp=2")
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert lines == ["error: --parallel tp=2 needs 2 ranks (tp·sp·pp), but mpiexec started 3"] * 3


def test_heads_tp_cannot_split_fail_on_every_rank(mpi, tmp_path):
    path = str(tmp_path / "gqa.npz")
    cfg = {"arch": "llama", "vocab_size": 64, "n_ctx": 16, "d_model": 32, "n_layers": 1, "n_heads": 4,
           "n_kv_heads": 2, "d_ff": 32}
    modelfile.save(Model.from_config(cfg), path)
    r = mpirun(4, CLI, "infer", path, "--ids", "1,2", "--parallel", "tp=4", timeout=120)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 4 and all("tp=4 cannot split 4 attention heads and 2 KV heads" in l for l in lines)


@pytest.fixture(scope="module")
def seq2seq_models(tmp_path_factory) -> dict[str, str]:
    """T5 and BART tiny as ``minitx init`` writes them."""
    d = tmp_path_factory.mktemp("s2s")
    out = {}
    for arch in ("t5", "bart"):
        out[arch] = str(d / f"{arch}.npz")
        _single("init", "--arch", arch, "--seed", "3", "-o", out[arch])
    return out


@pytest.mark.parametrize("arch", ["t5", "bart"])
@pytest.mark.parametrize("beams", ["1", "3"])
@pytest.mark.parametrize("n,spec", [(2, "tp=2"), (2, "pp=2")])
def test_mpiexec_encoder_decoders_print_what_one_process_prints(mpi, seq2seq_models, arch, beams, n, spec):
    """Greedy and beam search across processes — tp=2: self- and cross-attention split by heads,
    each rank its own cross-attention K/V and cache; pp=2: the encoder's and the decoder's layers
    over two stages, the encoder's states handed on once per input — inputs of different lengths."""
    args = ["infer", seq2seq_models[arch], "--ids", "5,6,7,8", "--ids", "9,4", "-n", "8", "--beams", beams, "--json"]
    want = _single(*args)
    r = mpirun(n, CLI, *args, "--parallel", spec)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want
    assert len(json.loads(want)["token_ids"]) == 2


SEQ2SEQ = """
import sys
import numpy as np
from minitx import modelfile, seq2seq
from minitx.distributed import prepare
m = prepare(modelfile.load(sys.argv[1]), sys.argv[4])
ref = np.load(sys.argv[2], allow_pickle=False)
rows = [[int(t) for t in r if t >= 0] for r in ref["sources"]]
out = {"logits": seq2seq.logits(m, rows, ref["targets"])}
for name, beams in (("greedy", 1), ("beam3", 3)):
    got = seq2seq.generate(m, rows, 12, beams=beams)
    out[name] = np.array([r + [-1] * (12 - len(r)) for r in got])
if m.meta["parallel"]["rank"] == 0:
    np.savez(sys.argv[3], **out)
"""


@pytest.mark.parametrize("arch", ["t5", "bart"])
@pytest.mark.parametrize("n,spec", [(2, "tp=2"), (2, "pp=2"), (4, "tp=2,pp=2")])
def test_mpiexec_encoder_decoders_match_transformers(mpi, tmp_path, arch, n, spec):
    """Across processes: teacher-forced logits, greedy and beam tokens are transformers' (the
    fixtures of tests/test_seq2seq.py, a padded batch of three inputs)."""
    from minitx.convert import convert

    path = str(tmp_path / f"{arch}.npz")
    convert(os.path.join(ROOT, "tests", "fixtures", f"hf-{arch}-tiny"), path)
    script = tmp_path / "s2s.py"
    script.write_text(SEQ2SEQ)
    ref_path = os.path.join(ROOT, "tests", "fixtures", f"reference-seq2seq-{arch}.npz")
    r = mpirun(n, str(script), path, ref_path, str(tmp_path / "got.npz"), spec, timeout=180)
    assert r.returncode == 0, r.stderr
    ref, got = np.load(ref_path, allow_pickle=False), np.load(tmp_path / "got.npz", allow_pickle=False)
    assert np.abs(got["logits"] - ref["logits"]).max() / np.abs(ref["logits"]).max() <= 1e-5
    for name in ("greedy", "beam3"):
        want = [[int(t) for t in row if t >= 0] for row in ref[name]]
        assert [[int(t) for t in row if t >= 0] for row in got[name]] == want, name


def _errors(r: subprocess.CompletedProcess) -> list[str]:
    return [l for l in r.stderr.splitlines() if l.startswith("error:")]


def test_encoder_decoder_faults_are_one_line_on_every_rank(mpi, seq2seq_models, tmp_path):
    """A wrong world size, heads tp cannot split, micro-batches (which do not split an
    encoder–decoder yet): one line on every rank, exit 2."""
    t5 = seq2seq_models["t5"]
    r = mpirun(3, CLI, "infer", t5, "--ids", "5,1,4", "-n", "3", "--parallel", "tp=2", timeout=120)
    assert r.returncode == 2
    assert _errors(r) == ["error: --parallel tp=2 needs 2 ranks (tp·sp·pp), but mpiexec started 3"] * 3
    r = mpirun(2, CLI, "infer", t5, "--ids", "5,1,4", "--ids", "2,3", "-n", "3", "--parallel", "pp=2,mb=2",
               timeout=120)
    assert r.returncode == 2
    lines = _errors(r)
    assert len(lines) == 2 and all("micro-batches (mb) do not split encoder–decoders" in l for l in lines), r.stderr
    path = str(tmp_path / "t5-3heads.npz")
    cfg = {"arch": "t5", "vocab_size": 64, "n_ctx": 16, "d_model": 24, "d_kv": 8, "n_layers": 1, "n_heads": 3,
           "d_ff": 32}
    modelfile.save(Model.from_config(cfg), path)
    r = mpirun(2, CLI, "infer", path, "--ids", "1,2", "--parallel", "tp=2", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = _errors(r)
    assert len(lines) == 2 and all("tp=2 cannot split the 3 heads of enc.relpos" in l for l in lines), r.stderr


def test_missing_mpi4py_is_an_error_not_a_hang(mpi, llama, tmp_path):
    fake = tmp_path / "nompi" / "mpi4py"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no MPI library here')\n")
    r = mpirun(2, CLI, "infer", llama, "--ids", "1,2", "--parallel", "tp=2", timeout=60,
               PYTHONPATH=str(tmp_path / "nompi"))
    assert r.returncode == 2
    assert r.stderr.count("mpi4py is not importable") == 2 and "Traceback" not in r.stderr


FAULT = """
import os, signal, sys, time
from minitx import generate, modelfile
from minitx.distributed import prepare
m = prepare(modelfile.load(sys.argv[1]), "tp=2")
seen = []
def on_token(r, t):
    if m.meta["parallel"]["rank"] == 1 and len(seen) == 2:
        if sys.argv[2] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(600)
    seen.append(t)
generate.generate(m, [[1, 2, 3]], 40, on_token=on_token)
"""


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_a_rank_that_dies_or_hangs_ends_the_others_in_bounded_time(mpi, llama, tmp_path, how):
    script = tmp_path / "fault.py"
    script.write_text(FAULT)
    t0 = time.monotonic()
    r = mpirun(2, str(script), llama, how, timeout=120, MINITX_MPI_TIMEOUT="3")
    assert r.returncode != 0
    assert time.monotonic() - t0 < 60
    if how == "hang":                              # rank 0's deadline, not the launcher, ended it
        assert "got no answer within 3 s" in r.stderr
