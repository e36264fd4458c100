"""The layers plugin (plugins/layers.py): a block made the identity is the one measured least
important and dropped; dropping it changes nothing (logits, generation through the KV cache);
evenly spaced selection; the student file loads and runs; bad options are one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from minitx import feeds, modelfile, models, plugin
from minitx.cli import main
from minitx.executor import Executor
from minitx.generate import generate
from minitx.model import Model
from minitx.plugin import CalibrationData
from minitx.plugins import layers as L


def model(arch: str, n_layers: int = 4, identity: int | None = None) -> Model:
    m = Model.from_config(models.complete_config({**models.preset(arch, "tiny"), "n_layers": n_layers}), seed=0)
    for i in range(n_layers):   # init scale leaves every block nearly the identity; make them matter
        for k in (f"layers.{i}.attn.out.weight", f"layers.{i}.mlp.down.weight"):
            m.params[k] *= 8
    if identity is not None:    # the block adds nothing to the residual stream
        for k in list(m.params):
            if k.startswith(f"layers.{identity}.") and (".attn.out." in k or ".mlp.down." in k):
                m.params[k][...] = 0
    return m


CALIB = CalibrationData(tuple(tuple(int(t) for t in np.random.default_rng(s).integers(0, 512, 16)) for s in range(3)),
                        "test")


@pytest.mark.parametrize("identity", [0, 2])
def test_importance_finds_the_identity_block_of_a_decoder(identity):
    m = model("gpt2", identity=identity)
    errs = L.importance(m.graph, m.params, CALIB.sequences)
    assert errs[identity] < 1e-9 < min(e for i, e in errs.items() if i != identity)
    res = L.LayersPlugin().apply(m.graph, m.params, plugin.parse_spec("layers:drop=1").options, calib=CALIB)
    assert [f.node for f in res.firings] == [f"layers.{identity}"]
    assert not any(k.startswith(f"layers.{identity}.") for k in res.params)
    assert not any(v.name.startswith(f"past.{identity}.") for v in res.graph.inputs)
    x = np.array([[3, 1, 4, 1, 5, 9]])
    a = Executor(m.graph, m.params).run(feeds.build(m.graph, x), outputs=["logits"])["logits"]
    b = Executor(res.graph, res.params).run(feeds.build(res.graph, x), outputs=["logits"])["logits"]
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    small = Model(m.config, res.params, res.graph, None, {})
    assert generate(small, [[3, 1, 4]], 8) == generate(m, [[3, 1, 4]], 8)   # through the shortened KV cache


def test_importance_finds_the_near_identity_block_of_an_encoder():
    m = model("bert", identity=1)
    errs = L.importance(m.graph, m.params, CALIB.sequences)
    assert min(errs, key=errs.get) == 1 and errs[1] < 0.1 * min(e for i, e in errs.items() if i != 1)


def test_dropping_the_last_encoder_block_keeps_the_hidden_output():
    m = model("bert", n_layers=3)
    res = L.drop_blocks(m.graph, m.params, [2])
    assert res.graph.outputs == m.graph.outputs
    fed = feeds.for_sequences(res.graph, [[5, 6, 7]], decoder=False)
    out = Executor(res.graph, res.params).run(fed, outputs=["hidden"], keep=["layers.1.norm2"])
    np.testing.assert_array_equal(out["hidden"], out["layers.1.norm2"])


def test_alternate_keeps_evenly_spaced_blocks_last_included():
    assert L.alternate(list(range(6)), 3) == [1, 3, 5]
    assert L.alternate(list(range(4)), 1) == [3]
    m = model("gpt2", n_layers=6)
    plan = L.LayersPlugin().analyze(m.graph, m.params, plugin.parse_spec("layers:keep=3,by=alternate").options)
    assert plan.drop == (0, 2, 4)


def test_student_file_loads_and_runs(tmp_path):
    m = model("bert", n_layers=4)
    modelfile.save(m, str(tmp_path / "t.npz"))
    r = CliRunner().invoke(main, ["optimize", str(tmp_path / "t.npz"), "--plugin", "layers:keep=2",
                                  "--calib", "random:3x16", "-o", str(tmp_path / "s.npz")])
    assert r.exit_code == 0, r.output
    assert "layers.drop x2" in r.output
    s = modelfile.load(str(tmp_path / "s.npz"))
    assert len({k.split(".")[1] for k in s.params if k.startswith("layers.")}) == 2
    r = CliRunner().invoke(main, ["infer", str(tmp_path / "s.npz"), "--ids", "5,6,7", "--ids", "8,9"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("spec, message", [
    ("layers:drop=4", "must leave between 1 and 3"),
    ("layers:drop=1,keep=2", "give one of drop=N or keep=N"),
    ("layers", "give one of drop=N or keep=N"),
    ("layers:drop=-1", "bad value '-1' for drop"),
    ("layers:by=random,drop=1", "bad value 'random' for by"),
])
def test_bad_options_are_one_line_exit_2(tmp_path, spec, message):
    modelfile.save(model("gpt2"), str(tmp_path / "t.npz"))
    r = CliRunner().invoke(main, ["optimize", str(tmp_path / "t.npz"), "--plugin", spec, "-o", str(tmp_path / "o.npz")])
    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "o.npz").exists()


def test_distill_starts_from_a_layer_dropped_decoder(tmp_path):
    from minitx.bundled import default_model_path

    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife. " * 20)
    r = CliRunner().invoke(main, ["optimize", "--plugin", "layers:drop=1", "--calib", f"file:{text}",
                                  "-o", str(tmp_path / "s.npz")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["distill", "--student", str(tmp_path / "s.npz"), "--data", str(text),
                                  "-o", str(tmp_path / "d.npz"), "--steps", "2", "--batch", "2", "--seq", "32",
                                  "--max-new-tokens", "2", "--json", "-q"])
    assert r.exit_code == 0, r.output
    d = modelfile.load(str(tmp_path / "d.npz"))
    n = modelfile.load(default_model_path()).config["n_layers"]
    assert len({k.split(".")[1] for k in d.params if k.startswith("layers.")}) == n - 1
    assert generate(d, [[1, 2, 3]], 3)
