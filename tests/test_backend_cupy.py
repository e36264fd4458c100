"""The CuPy backend on a real GPU, against the spec. Skipped cleanly (one skip) without one.

What a machine with an NVIDIA GPU checks first (benchmarks/gpu_session.sh runs this file):
conformance of every op the backend implements in float32 and float16; GPT-2-tiny and
LLaMA-tiny (grouped-query) generation token for token equal to the spec's; int8 and int4
quantized models with every node on the GPU (strict: no fallback at all); a training step's
gradients equal to the spec's; out-of-memory as a one-line MinitxError; and decoding that keeps
the KV cache on the GPU, grown in place (kvcache.py), moving only ids/mask in and logits out.
"""
from __future__ import annotations

import numpy as np
import pytest

try:
    import cupy as cp

    _n = cp.cuda.runtime.getDeviceCount()
    _why = "" if _n else "no CUDA device (the driver reports 0 GPUs)"
except ImportError:
    cp, _why = None, "cupy is not installed"
except Exception as e:  # noqa: BLE001 — CUDARuntimeError without a driver
    cp, _why = None, f"no CUDA device ({type(e).__name__})"
if _why:
    pytest.skip(f"cupy backend: {_why}", allow_module_level=True)

from minitx import generate as gen, models  # noqa: E402
from minitx.backend import describe, get_backend  # noqa: E402
from minitx.conformance import run_conformance  # noqa: E402
from minitx.errors import MinitxError  # noqa: E402
from minitx.executor import Executor  # noqa: E402
from minitx.model import Model  # noqa: E402
from minitx.precision import Precision  # noqa: E402

pytestmark = pytest.mark.gpu
PROMPTS = [[5, 17, 3, 99, 250, 7], [42, 8]]  # two lengths: left padding and its mask


def _model(arch: str, dtype: str = "float32") -> Model:
    m = Model.from_config(models.preset(arch, "tiny"), seed=0)
    if dtype == "float16":
        p = Precision("float16")
        m = Model(m.config, p.params(m.params), p.graph(m.graph))
    return m


def test_listed_available() -> None:
    info = describe("cupy")
    assert info["available"], info
    assert info["device"].startswith("cuda") and {"linear", "attention", "linear_q4"} <= set(info["forward"])
    assert not get_backend("cupy").problems


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_conformance(dtype: str) -> None:
    report = run_conformance("cupy", dtypes=[dtype])
    assert report.counts()["PASS"] > 0
    assert report.ok, "\n".join(report.table().splitlines()[:2] + [
        line for line in report.table().splitlines() if "FAIL" in line])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_equals_spec(arch: str) -> None:
    m = _model(arch)
    want = gen.generate(m, PROMPTS, 12, backends=("numpy",))
    got = gen.generate(m, PROMPTS, 12, backends=("cupy",), strict=True)
    assert got == want
    ex = m.executor(("cupy",), True)
    assert {b for _, _, b in ex.explain()} == {"cupy"}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_float16_decode_close_to_spec(arch: str) -> None:
    m32, m16 = _model(arch), _model(arch, "float16")
    ids, mask = gen.left_pad(PROMPTS)
    ref, st_ref = gen.step(m32, ids, gen.empty_state(m32, 2), mask, ("numpy",))
    got, st = gen.step(m16, ids, gen.empty_state(m16, 2), mask, ("cupy",), strict=True)
    assert got.dtype == np.float16
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real].astype(np.float32), ref[real], atol=3e-3, rtol=3e-2)
    nxt = ref[:, -1].argmax(-1)[:, None]
    ref2, _ = gen.step(m32, nxt, st_ref, None, ("numpy",))
    got2, _ = gen.step(m16, nxt, st, None, ("cupy",), strict=True)
    np.testing.assert_allclose(got2.astype(np.float32), ref2, atol=3e-3, rtol=3e-2)


@pytest.mark.parametrize("mode", ["int8", "int4", "int8_block", "kv8", "float16", "bfloat16", "w8a8"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_quantized_model_all_on_gpu(arch: str, mode: str) -> None:
    from minitx.plugin import optimize

    # group / block 16: LLaMA-tiny's FFN is 176 wide, which 32 does not divide
    spec = {"int8": "quant:int8", "int4": "quant:int4,group=16", "int8_block": "quant:int8_block,block=16",
            "kv8": "quant:kv8", "float16": "quant:float16", "bfloat16": "quant:bfloat16", "w8a8": "quant:w8a8"}[mode]
    q = optimize(_model(arch), [spec], validate=False)
    quant_ops = {n.op for n in q.graph.nodes} & {"linear_q8", "linear_q8_0", "linear_q4", "embedding_q8",
                                                  "embedding_q4", "attention_kv8", "linear_cast"}
    assert quant_ops, "the plugin produced no quantized op"
    ex = q.executor(("cupy",), strict=True)  # strict: any node off the GPU is an error
    assert {b for _, _, b in ex.explain()} == {"cupy"}
    ids, mask = gen.left_pad(PROMPTS)
    ref, st_ref = gen.step(q, ids, gen.empty_state(q, 2), mask, ("numpy",))
    got, st = gen.step(q, ids, gen.empty_state(q, 2), mask, ("cupy",), strict=True)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], ref[real], atol=1e-4, rtol=1e-3)
    nxt = ref[:, -1].argmax(-1)[:, None]   # one decode step: the skinny (decode) kernels
    ref2, _ = gen.step(q, nxt, st_ref, None, ("numpy",))
    got2, _ = gen.step(q, nxt, st, None, ("cupy",), strict=True)
    np.testing.assert_allclose(got2, ref2, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_training_step_gradients_equal_spec(arch: str) -> None:
    m = _model(arch)
    g = models.with_loss(m.graph)
    rng = np.random.default_rng(0)
    B, T = 2, 9
    ids = rng.integers(0, m.vocab_size, (B, T))
    width = (m.config.get("n_kv_heads") or m.config["n_heads"]) * m.config["d_model"] // m.config["n_heads"]
    feeds = {"input_ids": ids, "position_ids": np.tile(np.arange(T), (B, 1)),
             "attention_mask": np.ones((B, T), np.int64), "targets": np.roll(ids, -1, axis=1)}
    for i in range(m.config["n_layers"]):
        feeds[f"past.{i}.k"] = feeds[f"past.{i}.v"] = np.zeros((B, 0, width), np.float32)
    ref = Executor(g, m.params, ("numpy",)).forward_backward(feeds)
    got = Executor(g, m.params, ("cupy",)).forward_backward(feeds)
    np.testing.assert_allclose(got.outputs["loss"], ref.outputs["loss"], rtol=1e-5)
    assert got.grads.keys() == ref.grads.keys()
    for k in ref.grads:
        scale = max(1e-6, float(np.abs(ref.grads[k]).max()))
        np.testing.assert_allclose(got.grads[k] / scale, ref.grads[k] / scale, atol=2e-4, err_msg=k)


def test_out_of_memory_is_a_minitx_error() -> None:
    b = get_backend("cupy")
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    limit = pool.total_bytes() + 64 * 2**20
    pool.set_limit(size=limit)
    try:
        with pytest.raises(MinitxError, match="GPU out of memory while copying"):
            b.asarray(np.zeros((12000, 12000), np.float32))  # 549 MiB
        x = b.asarray(np.ones((2048, 2048), np.float32))    # 16 MiB each; the product needs 64 MiB more
        w = b.asarray(np.ones((2048, 8192), np.float32))
        with pytest.raises(MinitxError, match="GPU out of memory while running op linear"):
            b.kernels["linear"](x, w, None)
    finally:
        pool.set_limit(size=0)
        pool.free_all_blocks()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decode_cache_stays_on_gpu_and_grows_in_place(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per decode step only ids, positions and the mask go to the GPU and only the logits come
    back; the caches are views of buffers that grow in place (kvcache.py)."""
    m = _model(arch)
    b = get_backend("cupy")
    moved = {"h2d": 0, "d2h": 0}
    asarray, to_numpy = b.asarray, b.to_numpy

    def counted_asarray(a):
        moved["h2d"] += a.nbytes
        return asarray(a)

    def counted_to_numpy(a):
        moved["d2h"] += a.nbytes
        return to_numpy(a)

    monkeypatch.setattr(b, "asarray", counted_asarray)
    monkeypatch.setattr(b, "to_numpy", counted_to_numpy)
    ids, mask = gen.left_pad(PROMPTS)
    logits, st = gen.step(m, ids, gen.empty_state(m, 2), mask, ("cupy",), strict=True)
    ref_logits, ref = gen.step(m, ids, gen.empty_state(m, 2), mask, ("numpy",))
    buffers = {k: v.base for k, v in st.past.items()}
    assert all(buf is not None for buf in buffers.values())
    for _ in range(6):
        nxt = ref_logits[:, -1].argmax(-1)[:, None]
        moved.update(h2d=0, d2h=0)
        logits, st = gen.step(m, nxt, st, None, ("cupy",), strict=True)
        ref_logits, ref = gen.step(m, nxt, ref, None, ("numpy",))
        assert all(isinstance(v, cp.ndarray) for v in st.past.values())
        assert all(v.base is buffers[k] for k, v in st.past.items()), "the cache was copied, not grown"
        assert moved["h2d"] <= nxt.nbytes * 2 + st.mask.nbytes, moved
        assert moved["d2h"] <= logits.nbytes, moved
        np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=1e-3)
    for k, v in st.on_host().past.items():
        np.testing.assert_allclose(v, ref.past[k], atol=1e-5, rtol=1e-4, err_msg=k)




SOURCES = [[5, 17, 3, 99, 250, 7, 11], [42, 8]]   # two lengths: right padding and the encoder mask


@pytest.mark.parametrize("arch,overrides", [("t5", {}), ("t5", {"activation": "geglu"}), ("bart", {}),
                                            ("marian", {}), ("transformer", {})])
def test_encoder_decoder_equals_spec(arch: str, overrides: dict) -> None:
    """Teacher-forced logits, greedy and beam outputs of every encoder–decoder family, all on the
    GPU (strict: cross-attention, T5's bias, GEGLU, sinusoidal positions, scale, concat)."""
    from minitx import seq2seq

    m = Model.from_config({**models.preset(arch, "tiny"), **overrides}, seed=0)
    targets = [[0, 9, 4, 31], [0, 2, 77, 5]]
    ref = seq2seq.logits(m, SOURCES, targets, ("numpy",))
    got = seq2seq.logits(m, SOURCES, targets, ("cupy",), strict=True)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-3)
    for beams in (1, 3):
        want = seq2seq.generate(m, SOURCES, 10, beams=beams, backends=("numpy",))
        assert seq2seq.generate(m, SOURCES, 10, beams=beams, backends=("cupy",), strict=True) == want, beams
