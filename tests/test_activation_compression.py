"""Activation compression (plugins/activations.py, minitx/saved.py): the formats against their
definitions and PyTorch's float8, and training that keeps the forward exact, evaluates each VJP
at the decompressed value, and holds less."""
import numpy as np
import pytest

from minitx import models, ops, plugin, saved
from minitx.errors import MinitxError
from minitx.executor import Executor
from minitx.ir import Builder
from minitx.model import Model
from minitx.validate import Calibration


@pytest.mark.parametrize("shape,block", [((3, 64), 64), ((5, 7), 4), ((2, 3, 10), 64), ((1,), 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_int8_within_half_a_step_of_each_block(shape, block, dtype):
    x = np.random.default_rng(1).standard_normal(shape).astype(dtype) * 10 ** np.random.default_rng(2).uniform(-3, 3, shape)
    c = saved.compress(x, "int8", block)
    r = saved.decompress(c)
    assert r.shape == x.shape and r.dtype == x.dtype
    assert c.codes.dtype == np.int8 and c.codes.size == -(-x.size // block) * block
    flat = np.concatenate([x.ravel(), np.zeros(-x.size % block)]).reshape(-1, block)
    step = np.abs(flat).max(axis=1, keepdims=True) / 127
    err = np.abs(np.concatenate([r.ravel(), np.zeros(-x.size % block)]).reshape(-1, block) - flat)
    assert np.all(err <= 0.5 * step * (1 + 1e-6) + 1e-30)


def test_fp8_matches_torch_float8_e4m3fn():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    # one block of 448-scaled values spanning normals, subnormals, exact ties and zero
    x = np.concatenate([rng.standard_normal(4000) * 10.0 ** rng.uniform(-6, 0, 4000),
                        [448.0, -448.0, 0.0, 2.0 ** -9, 1.0625, 1.1875, 2.0 ** -10 * 3]]).astype(np.float32)
    block = x.size
    c = saved.compress(x, "fp8", block)
    scale = np.float32(np.abs(x).max() / np.float32(saved.FP8_MAX))
    y = x / scale
    ref = torch.from_numpy(y).to(torch.float8_e4m3fn).to(torch.float32).numpy() * scale
    np.testing.assert_array_equal(saved.decompress(c), ref.astype(np.float32))


def test_zero_blocks_and_zeros_stay_exact():
    x = np.zeros((4, 64), np.float32)
    x[1, 3] = -2.5
    for fmt in saved.FORMATS:
        r = saved.decompress(saved.compress(x, fmt, 64))
        np.testing.assert_array_equal(r[0], 0)
        assert r[1, 3] == -2.5 and np.count_nonzero(r) == 1


def test_bad_format_and_block_are_errors():
    with pytest.raises(MinitxError, match="format 'int4'"):
        saved.compress(np.ones(3), "int4")
    with pytest.raises(MinitxError, match="block"):
        saved.compress(np.ones(3), "int8", 0)
    with pytest.raises(MinitxError, match="format"):
        plugin.plan(["activations:int4"])


def _two_layer_graph(save: str | None):
    b = Builder()
    x = b.input("x", (6, 16))
    w1, w2 = b.param("w1", (16, 32)), b.param("w2", (32, 8))
    tags = {"layer": 0, **({"save": save, "save_block": 8} if save else {})}
    h = b.op("linear", x, w1, name="up", tags=tags)
    a = b.op("gelu", h, name="act", tags=tags)
    y = b.op("linear", a, w2, name="down", tags=tags)
    t = b.input("t", (6, 8))
    b.op("mse", y, t, name="loss", outputs=["loss"])
    b.output("loss")
    return b.graph


def test_each_vjp_runs_at_the_decompressed_value():
    rng = np.random.default_rng(3)
    params = {"w1": rng.standard_normal((16, 32)).astype(np.float32),
              "w2": rng.standard_normal((32, 8)).astype(np.float32)}
    feeds = {"x": rng.standard_normal((6, 16)).astype(np.float32), "t": rng.standard_normal((6, 8)).astype(np.float32)}
    exact = Executor(_two_layer_graph(None), params).forward_backward(feeds)
    r = Executor(_two_layer_graph("int8"), params).forward_backward(feeds)
    assert r.outputs["loss"] == exact.outputs["loss"]
    # By hand: the forward exactly, each VJP reading the int8 round trip of what it saved.
    q = lambda v: saved.decompress(saved.compress(v, "int8", 8))  # noqa: E731
    h = ops.get("linear").forward(feeds["x"], params["w1"])
    a = ops.get("gelu").forward(h)
    y = ops.get("linear").forward(a, params["w2"])
    (gy, _) = ops.get("mse").vjp((np.float32(1.0),), (q(y), feeds["t"]), None)   # y too: its producer is tagged
    ga, gw2, _ = ops.get("linear").vjp((gy,), (q(a), params["w2"], None), None)
    (gh,) = ops.get("gelu").vjp((ga,), (q(h),), None)
    _, gw1, _ = ops.get("linear").vjp((gh,), (feeds["x"], params["w1"], None), None)
    np.testing.assert_allclose(r.grads["w2"], gw2, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(r.grads["w1"], gw1, rtol=1e-6, atol=1e-6)
    assert not np.allclose(r.grads["w1"], exact.grads["w1"], rtol=1e-7, atol=0)   # it did change something


@pytest.fixture(scope="module")
def tiny():
    cfg = {**models.preset("gpt2", "tiny"), "n_layers": 4}
    m = Model.from_config(cfg, seed=0)
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 512, (2, 32)),
             "position_ids": np.broadcast_to(np.arange(32), (2, 32)).astype(np.int64),
             "attention_mask": np.ones((2, 32), np.int64), "targets": rng.integers(0, 512, (2, 32))}
    for i in range(4):
        feeds[f"past.{i}.k"] = feeds[f"past.{i}.v"] = np.zeros((2, 0, 64), np.float32)
    return m, feeds, Executor(models.with_loss(m.graph), m.params).forward_backward(feeds)


def _cos(a, b):
    return float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("specs,min_cos,max_mem", [(["activations:int8"], 0.9999, 0.5),
                                                   (["activations:fp8"], 0.999, 0.5),
                                                   (["activations:int8", "recompute:sqrt"], 0.9999, 0.5)])
def test_model_loss_exact_gradients_close_peak_lower(tiny, specs, min_cos, max_mem):
    m, feeds, base = tiny
    new = plugin.optimize(m, specs, calib=Calibration.random(1, 8))
    assert all(r["validation"]["passed"] for r in new.meta["rewrites"])
    tagged = [n for n in new.graph.nodes if n.tags.get("save")]
    assert tagged and all("layer" in n.tags for n in tagged)
    r = Executor(models.with_loss(new.graph), new.params).forward_backward(feeds)
    assert r.outputs["loss"] == base.outputs["loss"]
    assert set(r.grads) == set(base.grads)
    worst = min(_cos(r.grads[k], base.grads[k]) for k in base.grads if np.any(base.grads[k]))
    assert min_cos <= worst < 1.0
    assert r.peak_activation_bytes <= max_mem * base.peak_activation_bytes
