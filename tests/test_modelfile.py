"""The model file: round trip, and every kind of bad file is a one-line error naming file and key."""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest

from minitx import models, modelfile
from minitx.errors import MinitxError
from minitx.model import Model


@pytest.fixture
def saved(tmp_path):
    m = Model.from_config(models.preset("llama", "tiny"), seed=0, tokenizer_json='{"fake": true}')
    p = tmp_path / "m.npz"
    modelfile.save(m, p)
    return m, p


def _rewrite(src, dst, change):
    """Copy an npz, letting ``change(dict)`` edit the arrays (written raw, bypassing save())."""
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    change(arrays)
    with open(dst, "wb") as f:
        np.savez(f, **arrays)


def test_round_trip(saved):
    m, p = saved
    back = modelfile.load(p)
    assert back.config == m.config
    assert back.tokenizer_json == m.tokenizer_json
    assert set(back.params) == set(m.params)
    for k in m.params:
        np.testing.assert_array_equal(back.params[k], m.params[k])
    assert back.graph.to_json() == m.graph.to_json()
    with zipfile.ZipFile(p) as z:
        assert "__graph__.npy" not in z.namelist()  # the config rebuilds it


def test_save_is_atomic(tmp_path, monkeypatch):
    m = Model.from_config(models.preset("gpt2", "tiny"))
    target = tmp_path / "out.npz"
    target.write_bytes(b"previous contents")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(RuntimeError):
        modelfile.save(m, target)
    assert target.read_bytes() == b"previous contents"
    assert os.listdir(tmp_path) == ["out.npz"]  # no temporary file left behind


CASES = {
    "missing key": (lambda a: a.pop("layers.1.norm2.weight"), r"missing key 'layers.1.norm2.weight'"),
    "extra key": (lambda a: a.update(stray=np.zeros(3, np.float32)), r"unexpected key 'stray'"),
    "wrong shape": (lambda a: a.update({"norm_f.weight": np.ones(7, np.float32)}),
                    r"key 'norm_f.weight' has shape \(7,\), but the config expects \(64,\)"),
    "wrong dtype": (lambda a: a.update({"norm_f.weight": np.ones(64, np.float16)}),
                    r"key 'norm_f.weight' has dtype float16, expected float32"),
    "nan": (lambda a: a["layers.0.mlp.down.weight"].__setitem__((0, 0), np.nan),
            r"key 'layers.0.mlp.down.weight' contains NaN"),
    "inf": (lambda a: a["tok_emb.weight"].__setitem__((1, 1), np.inf), r"key 'tok_emb.weight' contains Inf"),
    "unknown arch": (lambda a: a.update(__config__=modelfile._text(json.dumps({"arch": "rnn"}))),
                     r"unknown architecture 'rnn'"),
    "newer format": (lambda a: a.update(__format_version__=np.array(99)), r"format version 99 is newer"),
    "no version": (lambda a: a.pop("__format_version__"), r"missing key '__format_version__'"),
    "bad config json": (lambda a: a.update(__config__=modelfile._text("{nope")), r"key '__config__' is not valid JSON"),
    "bad config field": (lambda a: a.update(__config__=modelfile._text(json.dumps(
        dict(models.preset("llama", "tiny"), n_heads=5)))), r"d_model 64 is not divisible by n_heads 5"),
    "pickled object": (lambda a: a.update(__meta__=np.array([{"x": 1}], dtype=object)), r"refusing to unpickle"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_files_are_named_errors(saved, tmp_path, case):
    _, p = saved
    change, pattern = CASES[case]
    bad = tmp_path / "bad.npz"
    _rewrite(p, bad, change)
    with pytest.raises(MinitxError, match=pattern) as e:
        modelfile.load(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_truncated_and_non_zip_files(saved, tmp_path):
    _, p = saved
    data = p.read_bytes()
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(MinitxError, match="trunc.npz: not a valid model file"):
        modelfile.load(trunc)
    junk = tmp_path / "junk.npz"
    junk.write_text("hello")
    with pytest.raises(MinitxError, match="junk.npz: not a valid model file"):
        modelfile.load(junk)
    with pytest.raises(MinitxError, match="no such model file"):
        modelfile.load(tmp_path / "absent.npz")
    npy = tmp_path / "arr.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(MinitxError, match="bare .npy"):
        modelfile.load(npy)


def test_corrupt_member_is_named(saved, tmp_path):
    _, p = saved
    data = bytearray(p.read_bytes())
    # Overwrite bytes in the middle of one member's data: the CRC check names the member.
    with zipfile.ZipFile(p) as z:
        info = z.getinfo("layers.0.mlp.down.weight.npy")
    start = info.header_offset + 30 + len(info.filename) + 200
    data[start:start + 64] = b"\xff" * 64
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(bytes(data))
    with pytest.raises(MinitxError, match="layers.0.mlp.down.weight"):
        modelfile.load(bad)
