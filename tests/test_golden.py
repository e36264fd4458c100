"""Golden files and metrics: record, verify (table / JSON / exit codes), wrong-model refusal."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from minitx import golden, metrics, modelfile
from minitx.cli import main
from minitx.convert import convert

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def run(*args: str):
    return CliRunner().invoke(main, list(args))


# ---------------------------------------------------------------------------------- metrics
def test_compare_metrics():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(4, 7, 11)).astype(np.float32)
    same = metrics.compare(ref, ref.copy(), logits=True)
    assert same.passed and same.max_abs == 0 and same.top1 == 1.0 and same.kl == 0 and same.sqnr_db == float("inf")
    noisy = ref + 1e-3 * rng.normal(size=ref.shape).astype(np.float32)
    c = metrics.compare(ref, noisy, logits=True)
    assert not c.passed and c.budget_used > 1 and 0.999 < c.cosine < 1 and 40 < c.sqnr_db < 80
    assert c.max_abs == pytest.approx(np.abs(noisy - ref).max(), rel=1e-6)
    assert c.max_rel == pytest.approx(c.max_abs / np.abs(ref).max(), rel=1e-6)
    assert metrics.compare(ref, noisy, atol=1e-2, rtol=0).passed
    flipped = ref.copy()
    flipped[0, 0] = -flipped[0, 0]
    assert metrics.compare(ref, flipped, logits=True).top1 == pytest.approx(27 / 28)
    nan = ref.copy()
    nan[1, 2, 3] = np.nan
    assert not metrics.compare(ref, nan).passed
    assert metrics.default_tolerance(np.float64)[1] < metrics.default_tolerance("float32")[1]
    assert metrics.default_tolerance(np.int64) == (0.0, 0.0)
    with pytest.raises(ValueError):
        metrics.compare(ref, ref[:1])


# ----------------------------------------------------------------------------- golden CLI
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("g")
    for arch in ("gpt2", "llama", "bert"):
        assert run("init", "--arch", arch, "-o", str(d / f"{arch}.npz")).exit_code == 0
    return d


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_record_and_verify(arch, tiny, tmp_path):
    m, g = str(tiny / f"{arch}.npz"), str(tmp_path / "g.npz")
    r = run("golden", m, "--random", "3x9", "--intermediates", "-o", g)
    assert r.exit_code == 0, r.output
    gold = golden.load(g)
    assert gold.provenance["reference"].startswith("minitx") and gold.provenance["backend"] == "numpy"
    assert len(gold.nodes) > 10 and gold.inputs["attention_mask"].sum() == 9 + 8 + 7
    r = run("verify", m, g)
    assert r.exit_code == 0, r.output
    assert r.output.strip().endswith("PASS") and "layers.1.attn.qkv" in r.output
    r = run("verify", m, g, "--json")
    obj = json.loads(r.output)
    assert obj["passed"] and {row["status"] for row in obj["rows"]} == {"PASS"}
    assert {"max_abs", "max_rel", "cosine", "top1", "budget_used", "atol", "rtol"} <= set(obj["rows"][0])


def test_verify_detects_a_wrong_weight(tiny, tmp_path):
    m = modelfile.load(str(tiny / "gpt2.npz"))
    g = str(tmp_path / "g.npz")
    assert run("golden", str(tiny / "gpt2.npz"), "--ids", "1,2,3,4", "--ids", "5,6", "--intermediates", "-o", g).exit_code == 0
    m.params["layers.1.mlp.down.weight"] = m.params["layers.1.mlp.down.weight"] * np.float32(1.001)
    modelfile.save(m, str(tmp_path / "bad.npz"))
    r = run("verify", str(tmp_path / "bad.npz"), g)
    assert r.exit_code == 1 and "FAIL" in r.output
    rows = {line.split()[0]: line.split()[-1] for line in r.output.splitlines()[2:-1]}
    assert rows["layers.0.mlp.down"] == "PASS" and rows["layers.1.mlp.down"] == "FAIL" and rows["logits"] == "FAIL"
    assert json.loads(run("verify", str(tmp_path / "bad.npz"), g, "--json").output)["passed"] is False
    # A loose enough tolerance accepts it: the declared tolerance is what decides.
    assert run("verify", str(tmp_path / "bad.npz"), g, "--atol", "1", "--rtol", "1").exit_code == 0


def test_golden_for_another_model_is_refused(tiny, tmp_path):
    g = str(tmp_path / "g.npz")
    assert run("golden", str(tiny / "llama.npz"), "--random", "2,5", "-o", g).exit_code == 0
    r = run("verify", str(tiny / "gpt2.npz"), g)
    assert r.exit_code == 2 and "recorded for a llama model" in r.output
    assert run("init", "--arch", "llama", "--preset", "tiny", "-o", str(tmp_path / "l2.npz")).exit_code == 0
    m = modelfile.load(str(tmp_path / "l2.npz"))
    m.config["rope_theta"] = 500.0
    modelfile.save(m, str(tmp_path / "l3.npz"))
    r = run("verify", str(tmp_path / "l3.npz"), g)
    assert r.exit_code == 2 and "config hash" in r.output
    r = run("verify", str(tiny / "llama.npz"), str(tiny / "llama.npz"))
    assert r.exit_code == 2 and "not a golden file" in r.output


def test_golden_input_errors_write_nothing(tiny, tmp_path):
    out = tmp_path / "g.npz"
    for args, msg in ((["--random", "2"], "BxT"), (["--ids", "1,99999"], "outside the vocabulary"),
                      (["--random", "1x999"], "context"), (["--random", "0x4"], "B and T >= 1"),
                      (["--seed", "-1", "--random", "1x4"], "--seed"), ([], "nothing to run"),
                      (["--text", "hi"], "--text is for encoders")):
        r = run("golden", str(tiny / "gpt2.npz"), *args, "-o", str(out))
        assert r.exit_code == 2 and msg in r.stderr, (args, r.output)
        assert r.stdout == "" and len(r.stderr.splitlines()) == 1
        assert not out.exists()


# ------------------------------------------------------------- goldens from transformers
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_committed_transformers_goldens(name, tmp_path):
    """Fixtures written by scripts/make_fixtures.py from transformers verify through the CLI."""
    m = str(tmp_path / "m.npz")
    assert run("convert", os.path.join(FIX, f"hf-{name}-tiny"), "-o", m).exit_code == 0
    r = run("verify", m, os.path.join(FIX, f"golden-{name}-tiny.npz"), "--json")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.output)
    assert obj["reference"]["reference"].startswith("transformers ")
    row = obj["rows"][0]
    assert row["max_rel"] <= 1e-5 and row["budget_used"] < 0.5
    if name != "bert":
        assert row["top1"] == 1.0


def test_committed_golden_fails_on_a_perturbed_model(tmp_path):
    convert(os.path.join(FIX, "hf-llama-tiny"), str(tmp_path / "m.npz"))
    m = modelfile.load(str(tmp_path / "m.npz"))
    m.params["layers.0.norm2.weight"] = m.params["layers.0.norm2.weight"] + np.float32(1e-3)
    rows = golden.verify(m, golden.load(os.path.join(FIX, "golden-llama-tiny.npz")))
    assert not golden.passed(rows)


def test_verify_with_plugin_shows_what_the_rewrite_costs(tmp_path):
    model = tmp_path / "m.npz"
    gold = tmp_path / "g.npz"
    assert run("init", "--arch", "gpt2", "-o", str(model)).exit_code == 0
    assert run("golden", str(model), "--random", "2x8", "-o", str(gold)).exit_code == 0
    exact = run("verify", str(model), str(gold), "--plugin", "recompute:every", "--json")
    assert exact.exit_code == 0 and json.loads(exact.stdout)["passed"]
    approx = run("verify", str(model), str(gold), "--plugin", "quant:int8", "--json")
    assert approx.exit_code == 1
    rows = json.loads(approx.stdout)["rows"]
    logits = next(r for r in rows if r["name"] == "logits")
    assert logits["cosine"] > 0.99  # close, but not within float32 rounding of the spec
