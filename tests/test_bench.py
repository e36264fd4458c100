"""``minitx bench``: the result's structure, error rows, the plot file — never how fast anything is."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from minitx import bench, modelfile, models
from minitx.errors import MinitxError
from minitx.model import Model

FAST = dict(repeat=2, warmup=0, batch=2, prompt_len=4, new_tokens=2)
STAT = {"median", "min", "max", "n"}


@pytest.fixture(scope="module")
def gpt2_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("bench") / "g.npz"
    modelfile.save(Model.from_config(models.preset("gpt2", "tiny"), seed=0), p)
    return str(p)


@pytest.fixture(scope="module")
def bert_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("bench") / "b.npz"
    modelfile.save(Model.from_config(models.preset("bert", "tiny"), seed=0), p)
    return str(p)


@pytest.fixture(scope="module")
def decoder_result(gpt2_file):
    pytest.importorskip("torch")
    return bench.run(gpt2_file, ["numpy", "no-such-backend"], [[], ["no-such-plugin"]], vs_torch=True,
                     settings=bench.Settings(**FAST))


def test_decoder_result_schema(decoder_result):
    res = decoder_result
    assert res["schema"] == bench.SCHEMA
    assert {"model", "settings", "machine", "rows", "reference"} <= set(res)
    assert res["model"]["arch"] == "gpt2" and res["model"]["decoder"] is True
    m = res["machine"]
    assert m["cpu"] and m["cores"] >= 1 and "numpy" in m["versions"] and m["date"]
    assert res["settings"]["batch"] == 2 and res["settings"]["threads"] >= 1
    json.dumps(res)  # JSON-able as a whole
    # backends × plugin sets, then torch
    assert [r["config"] for r in res["rows"]] == ["numpy", "no-such-backend", "numpy + no-such-plugin",
                                                  "no-such-backend + no-such-plugin", "torch"]


def test_decoder_ok_rows_have_every_measurement(decoder_result):
    spec, torch_row = decoder_result["rows"][0], decoder_result["rows"][-1]
    for r in (spec, torch_row):
        assert r["status"] == "ok", r["status"]
        assert set(r["timings"]) == {"prefill_ms_b1", "prefill_ms_batch", "decode_tok_s_b1", "decode_tok_s_batch"}
        for t in r["timings"].values():
            assert set(t) == STAT and t["n"] == 2 and 0 < t["min"] <= t["median"] <= t["max"]
        assert r["peak_rss_mib"] > 0 and r["model_bytes"] == decoder_result["model"]["bytes"]
    assert spec["engine"] == "minitx" and spec["placement"] == {"numpy": spec["placement"]["numpy"]}
    # The spec scored against itself is exact; torch agrees to float32 accuracy.
    assert spec["accuracy"]["max_abs"] == 0.0 and spec["accuracy"]["top1"] == 1.0
    assert torch_row["accuracy"]["max_abs"] < 1e-4 and torch_row["accuracy"]["cosine"] > 0.999999
    assert set(spec["vs_torch"]) == set(spec["timings"]) and all(v > 0 for v in spec["vs_torch"].values())
    assert torch_row["vs_torch"] is None


def test_failures_stay_in_their_rows(decoder_result):
    rows = {r["config"]: r for r in decoder_result["rows"]}
    bad = rows["no-such-backend"]
    assert bad["status"].startswith("error:") and "unknown backend 'no-such-backend'" in bad["status"]
    assert bad["timings"] == {} and bad["accuracy"] is None
    for name in ("numpy + no-such-plugin", "no-such-backend + no-such-plugin"):
        assert rows[name]["status"].startswith("plugin failed:") and "no-such-plugin" in rows[name]["status"]
    text = bench.table(decoder_result)
    assert "unknown backend 'no-such-backend'" in text and "vs torch" in text
    md = bench.markdown(decoder_result, "tiny")
    assert md.startswith("### tiny") and "| numpy | ok |" in md and "cores" in md


def test_encoder_reports_sentences_per_second(bert_file):
    res = bench.run(bert_file, ["numpy"], [[]], settings=bench.Settings(**FAST))
    (row,) = res["rows"]
    assert row["status"] == "ok"
    assert set(row["timings"]) == {"prefill_ms_b1", "prefill_ms_batch", "sent_s_b1", "sent_s_batch"}
    assert row["accuracy"]["top1"] is None and row["accuracy"]["max_abs"] == 0.0
    assert "sent/s" in bench.table(res)
    assert res["read_bandwidth_Bps"] is None and row["roofline"] is None and "roofline" not in bench.table(res)


def test_plugin_set_is_measured_with_packed_size(gpt2_file):
    from minitx import plugin

    if "quant" not in plugin.entries():
        pytest.skip("quant plugin not present")
    res = bench.run(gpt2_file, ["numpy"], [[], bench.parse_plugin_set("quant:int8")],
                    settings=bench.Settings(**FAST))
    base, q = res["rows"]
    assert q["config"] == "numpy + quant:int8" and q["plugins"] == ["quant:int8"]
    if q["status"] == "ok":
        assert q["model_bytes"] < base["model_bytes"]
        assert 0 < q["accuracy"]["max_abs"] < 1.0


def test_settings_and_context_are_checked(gpt2_file):
    with pytest.raises(MinitxError, match="--repeat"):
        bench.run(gpt2_file, settings=bench.Settings(repeat=0))
    with pytest.raises(MinitxError, match="context"):
        bench.run(gpt2_file, settings=bench.Settings(prompt_len=120, new_tokens=16))


def test_parse_plugin_set_and_ratios():
    assert bench.parse_plugin_set("quant:mode=int4,group=64+recompute") == ["quant:mode=int4,group=64", "recompute"]
    assert bench.parse_plugin_set("none") == []
    s = lambda v: {"median": v, "min": v, "max": v, "n": 1}  # noqa: E731
    r = bench.ratios({"prefill_ms_b1": s(10.0), "decode_tok_s_b1": s(50.0)},
                     {"prefill_ms_b1": s(20.0), "decode_tok_s_b1": s(100.0)})
    assert r == {"prefill_ms_b1": 2.0, "decode_tok_s_b1": 0.5}  # half the latency = 2x; half the tok/s = 0.5x
    assert bench.stat([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}


# ------------------------------------------------------------------------------------- CLI
def _cli():
    from minitx.cli import main

    return main


def test_cli_json_and_plot(gpt2_file, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "b.png"
    r = CliRunner().invoke(_cli(), ["bench", gpt2_file, "--backend", "numpy", "--backend", "gpu-nope",
                                    "--repeat", "1", "--warmup", "0", "--batch", "2", "--seq", "4",
                                    "--max-new-tokens", "2", "--json", "--plot", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert [row["status"] == "ok" for row in res["rows"]] == [True, False]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["b.png"]  # no temporary file left behind


def test_cli_nothing_could_run(gpt2_file, tmp_path):
    out = tmp_path / "never.png"
    r = CliRunner().invoke(_cli(), ["bench", gpt2_file, "--backend", "nope", "--repeat", "1", "--seq", "4",
                                    "--max-new-tokens", "1", "--plot", str(out)])
    assert r.exit_code == 2
    assert "unknown backend 'nope'" in r.output and "nothing could run" in r.output
    assert not out.exists()


def test_cli_bad_model_is_one_line(tmp_path):
    bad = tmp_path / "x.npz"
    bad.write_bytes(b"not a zip")
    r = CliRunner().invoke(_cli(), ["bench", str(bad)])
    assert r.exit_code == 2 and r.output.count("error:") == 1 and "Traceback" not in r.output


def test_plot_refuses_a_bad_target(decoder_result, tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(MinitxError, match="unsupported image type"):
        bench.plot(decoder_result, str(tmp_path / "x.docx"))
    with pytest.raises(MinitxError, match="does not exist"):
        bench.plot(decoder_result, str(tmp_path / "missing" / "x.png"))
    assert np.all([not f.startswith(".bench-") for f in os.listdir(tmp_path)])


def test_weight_bytes_per_token_counts_gathered_tables_as_one_row():
    g = Model.from_config(models.preset("gpt2", "tiny"), seed=0)      # tied head: tok_emb is read whole
    pos = g.params["pos_emb.weight"]
    assert bench.weight_bytes_per_token(g) == g.nbytes() - pos.nbytes + pos.nbytes // pos.shape[0]
    ll = Model.from_config(models.preset("llama", "tiny"), seed=0)    # own lm_head: tok_emb is only gathered
    tok = ll.params["tok_emb.weight"]
    assert bench.weight_bytes_per_token(ll) == ll.nbytes() - tok.nbytes + tok.nbytes // tok.shape[0]
    from minitx.plugin import optimize

    q = optimize(g, ["quant:int8"], force=True)
    assert bench.weight_bytes_per_token(q) < bench.weight_bytes_per_token(g) / 3  # packed bytes


def test_decode_rows_carry_their_roofline(decoder_result):
    bw = decoder_result["read_bandwidth_Bps"]
    assert bw > 1e8
    head, body = bench._columns(decoder_result)
    col = head.index("b=1 of roofline")
    for r, cells in zip(decoder_result["rows"], body):
        if r["status"] != "ok":
            assert r["roofline"] is None and cells[col] == "-"
            continue
        rl = r["roofline"]
        assert rl["tok_s"] == pytest.approx(bw / rl["bytes_per_token"])
        assert rl["fraction_b1"] == pytest.approx(r["timings"]["decode_tok_s_b1"]["median"] / rl["tok_s"])
        assert cells[col] == f"{rl['fraction_b1']:.0%} of {rl['tok_s']:.1f}"
    assert "roofline: host read bandwidth" in bench.table(decoder_result)


def test_configurations_are_measured_round_by_round(bert_file):
    """Interleaved: every configuration takes its turn in each round, so load changes hit all alike."""
    order = []
    bench.run(bert_file, ["numpy", "numpy,numba"], [[]], settings=bench.Settings(**{**FAST, "repeat": 2}),
              progress=lambda n, label: order.append(label.split(":")[0]) if label.endswith("measuring") else None)
    assert order == ["numpy", "numpy,numba", "numpy", "numpy,numba"]
