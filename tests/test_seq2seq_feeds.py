"""Encoder–decoders through the commands every model has: ``show`` (the encoder length ``E`` is
bound), and ``golden``/``verify`` (feeds build the encoder's inputs).

The feeds are checked against transformers: the whole graph fed by :func:`minitx.feeds.build`
reproduces the reference logits of scripts/make_fixtures.py (padded sources included), and a
padded batch from :func:`minitx.feeds.for_sequences` gives each row the logits it gets alone.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from click.testing import CliRunner

from minitx import feeds, modelfile, seq2seq
from minitx.cli import main
from minitx.convert import convert
from minitx.cost import model_cost
from minitx.errors import MinitxError

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
ARCHS = ("t5", "bart", "marian")


def run(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    d = tmp_path_factory.mktemp("s2s-feeds")
    out = {}
    for arch in ARCHS:
        p = str(d / f"{arch}.npz")
        convert(os.path.join(FIX, f"hf-{arch}-tiny"), p)
        out[arch] = (p, modelfile.load(p))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_build_feeds_the_encoder_as_transformers_does(converted, arch):
    _, m = converted[arch]
    g = np.load(os.path.join(FIX, f"reference-seq2seq-{arch}.npz"), allow_pickle=False)
    src, mask = feeds.pad([[int(t) for t in r if t >= 0] for r in g["sources"]], "right")
    fed = feeds.build(m.graph, g["targets"], encoder_ids=src, encoder_mask=mask)
    assert {v.name for v in m.graph.inputs} == set(fed)
    got = m.executor().run(fed)["logits"]
    ref = g["logits"]
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-5


def test_padded_sequences_get_the_logits_each_gets_alone(converted):
    _, m = converted["t5"]
    seqs = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15]]
    fed = feeds.for_sequences(m.graph, seqs, m.is_decoder)
    assert fed["encoder_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
    assert np.array_equal(fed["encoder_ids"], fed["input_ids"])
    out = m.executor().run(fed)["logits"]
    for r, s in enumerate(seqs):
        alone = seq2seq.logits(m, [s], [s])[0]
        np.testing.assert_allclose(out[r, :len(s)], alone, rtol=1e-5, atol=1e-5)


def test_encoder_feeds_of_the_wrong_shape_are_errors(converted):
    _, m = converted["bart"]
    ids = np.array([[1, 2, 3]])
    with pytest.raises(MinitxError, match="encoder_mask must have encoder_ids' shape"):
        feeds.build(m.graph, ids, encoder_ids=np.array([[1, 2]]), encoder_mask=np.ones((1, 3), np.int64))
    with pytest.raises(MinitxError, match=r"encoder_ids must be \(batch 1, tokens\)"):
        feeds.build(m.graph, ids, encoder_ids=np.array([[1, 2], [3, 4]]))


def test_show_binds_the_encoder_length(converted):
    p, m = converted["t5"]
    r = run("show", p)
    assert r.exit_code == 0 and "no binding" not in r.output, r.output
    assert "cross_attention" in r.output
    rows = {row["node"]: row for row in model_cost(m, batch=2, seq=3, past=4)["nodes"]}
    heads = m.config["n_heads"]
    assert rows["enc.relpos"]["shapes"] == [[1, heads, 7, 7]]        # E = past + seq
    assert rows["dec.relpos"]["shapes"] == [[2, heads, 3, 7]]        # 3 new queries over 4 + 3 keys


@pytest.mark.parametrize("arch", ARCHS)
def test_golden_and_verify(converted, arch, tmp_path):
    p, _ = converted[arch]
    g = str(tmp_path / "g.npz")
    r = run("golden", p, "--ids", "5,6,7", "--ids", "8,9", "-o", g)
    assert r.exit_code == 0, r.output
    r = run("verify", p, g)
    assert r.exit_code == 0 and r.output.strip().endswith("PASS"), r.output
    # The recorded source is what the logits depend on: another source is a failure.
    with np.load(g, allow_pickle=False) as z:
        arrays = dict(z)
    arrays["in.encoder_ids"] = (arrays["in.encoder_ids"] + 1) % 20
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, **arrays)
    r = run("verify", p, bad)
    assert r.exit_code == 1 and "FAIL" in r.output, r.output


def test_a_rewritten_encoder_decoder_is_stored_and_reloaded(converted, tmp_path):
    """A rewrite stores the graph itself; its concat nodes' ``axis`` (the KV cache) must pass the
    load-time attribute check (the variadic ops' signatures declare their attributes)."""
    p, _ = converted["t5"]
    q = str(tmp_path / "q.npz")
    r = run("optimize", p, "--plugin", "quant:int8", "-o", q)
    assert r.exit_code == 0, r.output
    r = run("show", q)
    assert r.exit_code == 0 and "concat" in r.output, r.output
