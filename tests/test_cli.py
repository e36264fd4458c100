"""The command line: init, infer and show for all three families; errors are one line, exit 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from minitx.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    assert r.stderr.strip() == f"error: {tmp_path / 'nope.npz'}: no such model file"
    assert r.stdout == ""


def test_init_refuses_missing_folder(tmp_path):
    r = run("init", "--arch", "gpt2", "-o", str(tmp_path / "no" / "such" / "m.npz"), ok=False)
    assert r.exit_code == 2 and "does not exist" in r.output


# ------------------------------------------------------------------- arguments (issue #14)
def one_line_error(r, *needles: str) -> None:
    """Exit 2, exactly one line on stderr naming the problem, nothing on stdout, no traceback."""
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert r.stdout == "", r.stdout
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def gpt2_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli") / "g.npz"
    run("init", "--arch", "gpt2", "-o", str(p))
    return str(p)


@pytest.mark.parametrize("args", [
    ["init", "--arch", "gpt2", "--seed", "-1", "-o", "{tmp}/x.npz"],
    ["infer", "{model}", "--ids", "1,2", "--seed", "-1"],          # greedy: the seed is unused, still checked
    ["golden", "{model}", "--random", "1x4", "--seed", "-1", "-o", "{tmp}/g.npz"],
    ["bench", "{model}", "--seed", "-1"],
    ["optimize", "{model}", "--plugin", "quant:int8", "--calib-seed", "-1", "-o", "{tmp}/q.npz"],
])
def test_negative_seed_is_refused(args, gpt2_file, tmp_path):
    r = run(*[a.format(model=gpt2_file, tmp=tmp_path) for a in args], ok=False)
    one_line_error(r, "seed", "-1")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args,needle", [
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--top-p", "nan"], "--top-p"),
    (["--top-p", "0"], "--top-p"),
    (["--top-k", "-1"], "--top-k"),
    (["-n", "-1"], "--max-new-tokens"),
    (["--threads", "-1"], "--threads"),
    (["--stop", "99999"], "--stop"),
])
def test_bad_infer_values_are_one_line(args, needle, gpt2_file):
    one_line_error(run("infer", gpt2_file, "--ids", "1,2,3", *args, ok=False), needle)


@pytest.mark.parametrize("cmd", [
    ["init", "--arch", "gpt2"],
    ["golden", "{model}", "--random", "1x4"],
    ["optimize", "{model}", "--plugin", "quant:int8"],
    ["convert", "{tmp}"],
])
def test_empty_output_path_is_refused(cmd, gpt2_file, tmp_path):
    r = run(*[a.format(model=gpt2_file, tmp=tmp_path) for a in cmd], "-o", "", ok=False)
    one_line_error(r, "--output", "empty")


@pytest.mark.parametrize("args,needle", [
    (["--seq", "-5"], "--seq"), (["--seq", "0"], "--seq"), (["--batch", "0"], "--batch"),
    (["--past", "-1"], "--past"), (["--seq", "100", "--past", "100"], "context"), (["--past", "128"], "no room"),
])
def test_show_refuses_impossible_shapes(args, needle, gpt2_file):
    one_line_error(run("show", gpt2_file, *args, ok=False), needle)


def test_mistyped_calib_prefix_is_an_error(gpt2_file, tmp_path):
    r = run("optimize", gpt2_file, "--plugin", "quant:int8", "--calib", "fille:x.txt", "-o", str(tmp_path / "q.npz"),
            ok=False)
    one_line_error(r, "fille", "file:")
    assert not (tmp_path / "q.npz").exists()


def test_calib_text_prefix_keeps_literal_text():
    from minitx.validate import Calibration

    assert Calibration.parse(["text:fille:x.txt", "a plain sentence: with a colon"]).texts == [
        "fille:x.txt", "a plain sentence: with a colon"]


def test_fifo_as_model_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "model.npz"
    os.mkfifo(fifo)
    r = subprocess.run([sys.executable, "-m", "minitx", "show", str(fifo)], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == f"error: {fifo}: is not a regular file (a FIFO, device or socket), not a model file"
    one_line_error(run("infer", str(fifo), "--ids", "1", ok=False), "not a regular file")
    one_line_error(run("infer", str(tmp_path), "--ids", "1", ok=False), "is a folder")


def test_infer_prints_nothing_before_it_fails(gpt2_file):
    # Streaming (one prompt, no --json) used to print the prompt, then fail.
    one_line_error(run("infer", gpt2_file, "--ids", "1,2,3", "--backend", "no-such-backend", ok=False), "no-such-backend")


def test_force_hint_names_a_flag_the_command_has(gpt2_file):
    r = run("infer", gpt2_file, "--ids", "1,2,3", "-n", "2", "--plugin", "quant:int4,max_kl=1e-12", ok=False)
    one_line_error(r, "exceeds its declared tolerance", "--force")
    ok = run("infer", gpt2_file, "--ids", "1,2,3", "-n", "2", "--plugin", "quant:int4,max_kl=1e-12", "--force")
    assert ok.stdout.split()[:3] == ["1", "2", "3"]


def test_unknown_option_is_one_line(gpt2_file):
    one_line_error(run("infer", gpt2_file, "--ids", "1", "--max-new-token", "3", ok=False), "--max-new-tokens")
    one_line_error(run("infr", ok=False), "infer")


# ------------------------------------------------------------------------- vocabulary (#16)
def test_old_spellings_parse_hidden_with_a_warning(gpt2_file):
    help_text = run("bench", "--help").output
    assert "--seq" in help_text and "--max-new-tokens" in help_text
    assert "--prompt-len" not in help_text and "--new-tokens" not in help_text
    # the alias reaches --seq's check (no benchmark runs)
    r = run("bench", gpt2_file, "--prompt-len", "0", ok=False)
    assert "warning: --prompt-len is deprecated; use --seq" in r.stderr
    one_line_error(r, "--seq")
    r = run("bench", gpt2_file, "--seq", "100", "--new-tokens", "100", ok=False)
    assert "use --max-new-tokens" in r.stderr
    one_line_error(r, "--seq 100 + --max-new-tokens 100", "context")


def test_every_model_command_defaults_to_the_bundled_model(tmp_path):
    from minitx.bundled import default_model_path

    for cmd in ("infer", "show", "golden", "verify", "optimize", "bench"):
        assert "[MODEL]" in run(cmd, "--help").output.splitlines()[0], cmd
    from minitx import golden

    gold = tmp_path / "g.npz"
    run("golden", "--random", "1x4", "-o", str(gold))
    assert golden.load(gold).provenance["model_file"] == os.path.basename(default_model_path())
    assert run("verify", str(gold)).stdout.strip().endswith("PASS")


def test_threads_flag_configures_the_budget(gpt2_file, monkeypatch):
    from minitx import threads

    seen = []
    monkeypatch.setattr(threads, "configure", lambda n=None: seen.append(n) or (n or 1))
    run("infer", gpt2_file, "--ids", "1,2", "-n", "1", "--threads", "1")
    run("show", gpt2_file, "--seq", "4")                       # computes nothing: no --threads
    run("golden", gpt2_file, "--random", "1x2", "-o", gpt2_file + ".g.npz")
    assert seen == [1, None]


def test_python_dash_m_minitx():
    r = subprocess.run([sys.executable, "-m", "minitx", "--version"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0 and "minitx" in r.stdout


def test_bare_command_shows_help_and_verify_counts_its_files(gpt2_file):
    r = run(ok=False)
    assert "Usage:" in r.output and "infer" in r.output
    one_line_error(run("verify", gpt2_file, gpt2_file, gpt2_file, ok=False), "[MODEL] GOLDEN")
    one_line_error(run("verify", ok=False), "[MODEL] GOLDEN")
