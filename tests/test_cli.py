"""The command line: init, infer and show for all three families; errors are one line, exit 2."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from minitx.cli import main


def run(*args: str, ok: bool = True):
    r = CliRunner().invoke(main, list(args))
    if ok:
        assert r.exit_code == 0, r.output + repr(r.exception)
    return r


@pytest.fixture
def model_file(tmp_path, arch):
    p = tmp_path / f"{arch}.npz"
    run("init", "--arch", arch, "-o", str(p))
    return p


def test_init_infer_show(model_file, arch):
    shown = run("show", str(model_file), "--seq", "8")
    assert "total" in shown.output and "attention" in shown.output
    js = json.loads(run("show", str(model_file), "--seq", "8", "--json").output)
    assert js["totals"]["params"] == sum(r["params"] for r in js["nodes"])
    assert js["totals"]["flops"] > 0
    if arch == "bert":
        out = json.loads(run("infer", str(model_file), "--ids", "1,2,3", "--ids", "4,5", "--json").output)
        emb = np.array(out["embeddings"])
        sim = np.array(out["similarity"])
        assert emb.shape == (2, 64)
        np.testing.assert_allclose(np.diag(sim), 1.0, rtol=1e-6)
        np.testing.assert_allclose(sim[0, 1], emb[0] @ emb[1] / np.linalg.norm(emb[0]) / np.linalg.norm(emb[1]),
                                   rtol=1e-6)
        text = run("infer", str(model_file), "--ids", "1,2,3", "--ids", "4,5", "--ids", "6").output
        assert "cosine similarity" in text
    else:
        out = json.loads(run("infer", str(model_file), "--ids", "1,2,3", "--ids", "7", "-n", "5", "--json").output)
        assert len(out["token_ids"]) == 2 and all(len(t) == 5 for t in out["token_ids"])
        assert "texts" not in out  # no tokenizer in a fresh model
        streamed = run("infer", str(model_file), "--ids", "1,2,3", "-n", "5").output.split()
        assert streamed == ["1", "2", "3"] + [str(t) for t in out["token_ids"][0]]


@pytest.mark.parametrize("arch", ["gpt2"])
def test_sampling_is_seeded(model_file):
    a = run("infer", str(model_file), "--ids", "1,2", "-n", "12", "--temperature", "1.5", "--seed", "3", "--json").output
    b = run("infer", str(model_file), "--ids", "1,2", "-n", "12", "--temperature", "1.5", "--seed", "3", "--json").output
    c = run("infer", str(model_file), "--ids", "1,2", "-n", "12", "--temperature", "1.5", "--seed", "4", "--json").output
    assert a == b != c


@pytest.mark.parametrize("arch", ["gpt2"])
@pytest.mark.parametrize("args,message", [
    (["--ids", "1,2,600"], "token id 600 is outside the vocabulary"),
    (["--ids", ""], "is empty"),
    (["--ids", "1,x"], "comma-separated integers"),
    (["--prompt", "hello"], "carries no tokenizer"),
    (["--text", "hello"], "--text is for encoders"),
    ([], "nothing to run"),
    (["--ids", ",".join(["1"] * 129)], "longer than the model's context"),
    (["--ids", "1", "--temperature", "-1"], "--temperature': -1 must be >= 0"),
])
def test_infer_errors(model_file, args, message):
    r = run("infer", str(model_file), *args, ok=False)
    assert r.exit_code == 2
    assert message in r.output
    assert "Traceback" not in r.output


def test_missing_model_file_subprocess(tmp_path):
    r = subprocess.run([sys.executable, "-m", "minitx.cli", "infer", str(tmp_path / "nope.npz"), "--ids", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {tmp_path / 'nope.npz'}: no such file"
    assert r.stdout == ""


def test_init_refuses_missing_folder(tmp_path):
    r = run("init", "--arch", "gpt2", "-o", str(tmp_path / "no" / "such" / "m.npz"), ok=False)
    assert r.exit_code == 2 and "does not exist" in r.output
