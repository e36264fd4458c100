"""The IR: JSON round trip, structural validation, shape inference, and the installed layout."""
from __future__ import annotations

import importlib.metadata as md

import pytest

from minitx import models
from minitx.errors import MinitxError, ShapeError
from minitx.ir import Builder, Graph


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_json_round_trip_and_inference(arch):
    cfg = models.preset(arch, "tiny")
    g = models.build_graph(cfg)
    back = Graph.from_json(g.to_json())
    assert back.to_json() == g.to_json()
    env = back.infer({"B": 3, "T": 7, "S": 2})
    if arch == "bert":
        assert env["embedding"][0] == (3, cfg["d_model"])
    else:
        assert env["logits"] == ((3, 7, cfg["vocab_size"]), "float32")
        kv = cfg.get("n_kv_heads", cfg["n_heads"]) * cfg["d_model"] // cfg["n_heads"]
        assert env["present.0.k"][0] == (3, 9, kv)


def _tiny_graph() -> Builder:
    b = Builder()
    b.input("x", ("B", 4))
    b.param("w", (4, 3))
    return b


def test_validation_errors():
    b = _tiny_graph()
    b.op("linear", "x", "nope", name="lin")
    with pytest.raises(MinitxError, match="node lin .linear. reads 'nope' before it is defined"):
        b.graph.validate()
    b = _tiny_graph()
    b.op("frobnicate", "x")
    with pytest.raises(MinitxError, match="unknown op 'frobnicate'"):
        b.graph.validate()
    b = _tiny_graph()
    b.op("relu", "x", "w", name="r")
    with pytest.raises(MinitxError, match="node r .relu. has 2 inputs, expected 1"):
        b.graph.validate()
    b = _tiny_graph()
    b.op("relu", "x", outputs=["x"])
    with pytest.raises(MinitxError, match="assigned twice"):
        b.graph.validate()
    b = _tiny_graph()
    b.output("ghost")
    with pytest.raises(MinitxError, match="output 'ghost' is never computed"):
        b.graph.validate()


def test_shape_errors_name_node_and_op():
    b = Builder()
    b.input("x", ("B", 5))
    b.param("w", (4, 3))
    b.op("linear", "x", "w", name="proj")
    with pytest.raises(ShapeError, match=r"node proj: op linear: input features 5 != weight rows 4"):
        b.graph.infer({"B": 2})
    with pytest.raises(MinitxError, match="symbolic dim 'B' with no binding"):
        b.graph.infer({})


def test_installed_namespace_is_clean():
    """Nothing named bare backends, plugins or cli lands in site-packages."""
    try:
        files = md.files("minitx") or []
    except md.PackageNotFoundError:
        pytest.skip("minitx is not installed (running from a checkout)")
    tops = {str(f).split("/")[0] for f in files}
    assert not tops & {"backends", "plugins", "cli.py"}, tops
    names = {str(f) for f in files}
    if not any(n.endswith(".pth") for n in names):  # a regular (non-editable) install carries the mapped folders
        assert "minitx/cli.py" in names
        assert any(n.startswith("minitx/backends/") for n in names)
        assert any(n.startswith("minitx/plugins/") for n in names)
