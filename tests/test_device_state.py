"""Decoding keeps its KV cache on the device: only ids, positions and the mask go in per step,
only the logits come out.

A fake device backend stands in for a GPU: its arrays are host arrays behind a wrapper that
refuses implicit conversion (``np.asarray`` raises, as it does for CuPy arrays), and its
``asarray``/``to_numpy`` count the bytes they move. Its kernels are the spec's own, so token
equality with the spec checks the plumbing (placement, transfers, state), not arithmetic.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pytest

from minitx import backend as backend_mod, generate as gen, models, ops
from minitx.backend import Backend
from minitx.executor import Executor
from minitx.ir import Builder
from minitx.model import Model

PROMPTS = [[5, 17, 3, 99, 250, 7], [42, 8]]  # two lengths: left padding and its mask
NEW_TOKENS = 10


class Dev:
    """An array in the fake device's memory."""

    __slots__ = ("a", "__weakref__")

    def __init__(self, a: np.ndarray) -> None:
        self.a = a

    shape = property(lambda self: self.a.shape)
    dtype = property(lambda self: self.a.dtype)
    nbytes = property(lambda self: self.a.nbytes)
    ndim = property(lambda self: self.a.ndim)

    def astype(self, dtype: Any, copy: bool = True) -> "Dev":
        return Dev(self.a.astype(dtype, copy=copy))   # a conversion on the device

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError("implicit device -> host conversion; use the backend's to_numpy")


class FakeDevice(Backend):
    name = "fakedev"
    device = "fake"
    dtypes = frozenset({"float32", "float64"})

    def __init__(self, skip: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.kernels = {op: self._wrap(s.forward) for op, s in ops.OPS.items() if op not in skip}
        self.h2d = self.d2h = 0

    def _wrap(self, f: Any) -> Any:
        def kernel(*args: Any, **attrs: Any) -> Any:
            for a in args:
                assert a is None or isinstance(a, Dev), f"a kernel got a {type(a).__name__}, not a device array"
            out = f(*(None if a is None else a.a for a in args), **attrs)
            return tuple(Dev(np.asarray(o)) for o in out) if isinstance(out, tuple) else Dev(np.asarray(out))
        return kernel

    def asarray(self, a: np.ndarray) -> Dev:
        assert isinstance(a, np.ndarray), type(a)
        self.h2d += a.nbytes
        return Dev(a.copy())

    def to_numpy(self, a: Dev) -> np.ndarray:
        assert isinstance(a, Dev), type(a)
        self.d2h += a.nbytes
        return a.a.copy()

    def owns(self, a: Any) -> bool:
        return isinstance(a, Dev)


@pytest.fixture
def fake() -> Iterator[Any]:
    """Registers ``fakedev`` (optionally with some ops left to the spec) and removes it after."""
    made: list[FakeDevice] = []

    def make(skip: tuple[str, ...] = ()) -> FakeDevice:
        b = FakeDevice(skip)
        backend_mod.register("fakedev", lambda: b)
        made.append(b)
        return b

    yield make
    backend_mod.entries().pop("fakedev", None)


def _model(arch: str) -> Model:
    return Model.from_config(models.preset(arch, "tiny"), seed=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decode_moves_logits_and_ids_not_the_cache(arch: str, fake: Any) -> None:
    dev = fake()
    m = _model(arch)
    want = gen.generate(m, PROMPTS, NEW_TOKENS, backends=("numpy",))
    assert gen.generate(m, PROMPTS, NEW_TOKENS, backends=("fakedev",), strict=True) == want

    ids, mask = gen.left_pad(PROMPTS)
    logits, st = gen.step(m, ids, gen.empty_state(m, len(PROMPTS)), mask, ("fakedev",), strict=True)
    ref_logits, ref = gen.step(m, ids, gen.empty_state(m, len(PROMPTS)), mask, ("numpy",))
    for k in range(NEW_TOKENS):
        nxt = ref_logits[:, -1].argmax(-1)[:, None]
        assert (logits[:, -1].argmax(-1) == nxt[:, 0]).all()
        dev.h2d = dev.d2h = 0
        logits, st = gen.step(m, nxt, st, None, ("fakedev",), strict=True)
        ref_logits, ref = gen.step(m, nxt, ref, None, ("numpy",))
        assert isinstance(logits, np.ndarray)
        assert all(isinstance(v, Dev) for v in st.past.values()), "the cache came back to the host"
        # In: ids, positions (B, 1) and the key mask (B, S); out: the logits. The bounds are
        # tight, so even one cache crossing (today's host round trip moves all of them) fails.
        into = nxt.nbytes * 2 + st.mask.nbytes
        assert min(v.nbytes for v in st.past.values()) > 0
        assert dev.h2d <= into, f"step {k}: {dev.h2d} bytes to the device, ids+positions+mask are {into}"
        assert dev.d2h <= logits.nbytes, f"step {k}: {dev.d2h} bytes to the host, logits are {logits.nbytes}"
        np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)
    dev.d2h = 0
    host = st.on_host()
    assert dev.d2h == sum(v.nbytes for v in ref.past.values())  # on_host is the explicit transfer
    for k, v in ref.past.items():
        assert isinstance(host.past[k], np.ndarray)
        np.testing.assert_allclose(host.past[k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("skip", [("attention",), ("gelu", "silu", "layer_norm", "rms_norm")])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_spec_fallback_reads_device_values(arch: str, skip: tuple[str, ...], fake: Any) -> None:
    """Nodes left to the spec get host copies of device values (caches, activations)."""
    fake(skip)
    m = _model(arch)
    ex = m.executor(("fakedev",))
    assert {b for n, op, b in ex.explain() if op in skip} == {"numpy"}
    assert gen.generate(m, PROMPTS, NEW_TOKENS, backends=("fakedev",)) == \
        gen.generate(m, PROMPTS, NEW_TOKENS, backends=("numpy",))


def test_device_state_continues_on_another_backend(fake: Any) -> None:
    """A cache left on the device by one run is read correctly by a spec-only executor."""
    dev = fake()
    m = _model("llama")
    ids, mask = gen.left_pad(PROMPTS)
    _, st = gen.step(m, ids, gen.empty_state(m, 2), mask, ("fakedev",))
    _, ref = gen.step(m, ids, gen.empty_state(m, 2), mask, ("numpy",))
    nxt = np.array([[3], [4]])
    dev.d2h = 0
    got, _ = gen.step(m, nxt, st, None, ("numpy",))
    want, _ = gen.step(m, nxt, ref, None, ("numpy",))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert dev.d2h == sum(v.nbytes for v in st.past.values())  # each cache copied to the host once


def test_device_outputs_stay_put_even_when_a_fallback_node_reads_them(fake: Any) -> None:
    dev = fake(("gelu",))
    b = Builder()
    x = b.input("x", ("B", 4))
    y = b.op("softmax", x, name="sm")           # on the fake device
    z = b.op("gelu", y, name="g")               # on the spec: reads y through the host
    w = b.op("softmax", y, name="sm2")          # on the device again
    b.output(y, z, w)
    ex = Executor(b.graph, {}, ("fakedev",))
    xs = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    out = ex.run({"x": xs}, device_outputs=[y, w])
    assert isinstance(out[y], Dev) and isinstance(out[w], Dev) and isinstance(out[z], np.ndarray)
    sm = ops.get("softmax").forward
    np.testing.assert_allclose(out[y].a, sm(xs), rtol=1e-6)
    np.testing.assert_allclose(out[z], ops.get("gelu").forward(sm(xs)), rtol=1e-6)
    np.testing.assert_allclose(out[w].a, sm(sm(xs)), rtol=1e-6)
    # Fed back, the device array is used where it lies: no transfer in, none out.
    dev.h2d = dev.d2h = 0
    again = ex.run({"x": out[y]}, outputs=[w], device_outputs=[y, w])
    assert dev.h2d == 0 and dev.d2h == xs.nbytes  # only the gelu node's copy (z is not wanted)
    np.testing.assert_allclose(again[w].a, sm(sm(sm(xs))), rtol=1e-6)
    # Without device_outputs, results are host arrays as before.
    assert all(isinstance(v, np.ndarray) for v in ex.run({"x": xs}).values())
