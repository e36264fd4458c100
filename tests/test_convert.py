"""Converting HF folders: layouts, dtypes, and every way a folder can be wrong (one clear line,
nothing written). Uses the committed tiny HF folders in tests/fixtures/ (made by transformers)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from minitx import modelfile
from minitx.cli import main
from minitx.convert import convert, stream_npz
from minitx.errors import MinitxError

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def _copy(name: str, tmp_path) -> str:
    dst = str(tmp_path / name)
    shutil.copytree(os.path.join(FIX, name), dst)
    return dst


def _edit_config(folder: str, **changes) -> None:
    p = os.path.join(folder, "config.json")
    cfg = json.load(open(p))
    cfg.update(changes)
    json.dump(cfg, open(p, "w"))


def _fails(tmp_path, folder: str, match: str) -> None:
    out = tmp_path / "out.npz"
    r = CliRunner().invoke(main, ["convert", folder, "-o", str(out)])
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert line.startswith("error: ") and "\n" not in line and "Traceback" not in line
    assert match in line, line
    assert not out.exists() and not [f for f in os.listdir(tmp_path) if "minitx-tmp" in f]


@pytest.mark.parametrize("name", ["hf-gpt2-tiny", "hf-llama-tiny", "hf-bert-tiny"])
def test_layouts(name, tmp_path):
    """Transposes and fusions land where the graphs expect them."""
    folder = os.path.join(FIX, name)
    convert(folder, str(tmp_path / "m.npz"))
    m = modelfile.load(str(tmp_path / "m.npz"))
    hf = load_file(os.path.join(folder, "model.safetensors"))
    if name == "hf-gpt2-tiny":
        np.testing.assert_array_equal(m.params["layers.1.attn.qkv.weight"], hf["transformer.h.1.attn.c_attn.weight"])
        assert m.config["activation"] == "gelu_tanh" and m.config["n_heads"] == 5
    elif name == "hf-llama-tiny":
        q, k, v = (hf[f"model.layers.0.self_attn.{t}_proj.weight"] for t in "qkv")
        np.testing.assert_array_equal(m.params["layers.0.attn.qkv.weight"], np.concatenate([q.T, k.T, v.T], 1))
        g, u = hf["model.layers.0.mlp.gate_proj.weight"], hf["model.layers.0.mlp.up_proj.weight"]
        np.testing.assert_array_equal(m.params["layers.0.mlp.gate_up.weight"], np.concatenate([g.T, u.T], 1))
        np.testing.assert_array_equal(m.params["lm_head.weight"], hf["lm_head.weight"].T)
        assert (m.config["n_heads"], m.config["n_kv_heads"], m.config["tie_embeddings"]) == (6, 2, False)
    else:
        b = [hf[f"encoder.layer.1.attention.self.{t}.bias"] for t in ("query", "key", "value")]
        np.testing.assert_array_equal(m.params["layers.1.attn.qkv.bias"], np.concatenate(b))
        np.testing.assert_array_equal(m.params["layers.1.mlp.up.weight"], hf["encoder.layer.1.intermediate.dense.weight"].T)
    assert m.meta["source"].startswith("converted from Hugging Face")
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in m.params.values())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoints_widen_to_float32(dtype, tmp_path):
    folder = _copy("hf-llama-tiny", tmp_path)
    st = os.path.join(folder, "model.safetensors")
    t = load_file(st)
    if dtype == "float16":
        save_file({k: v.astype(np.float16) for k, v in t.items()}, st)
        expect = {k: v.astype(np.float16).astype(np.float32) for k, v in t.items()}
    else:
        torch = pytest.importorskip("torch")
        from safetensors.torch import save_file as save_torch

        save_torch({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in t.items()}, st)
        expect = {k: torch.from_numpy(v).to(torch.bfloat16).float().numpy() for k, v in t.items()}
    convert(folder, str(tmp_path / "m.npz"))
    m = modelfile.load(str(tmp_path / "m.npz"))
    assert m.params["tok_emb.weight"].dtype == np.float32
    np.testing.assert_array_equal(m.params["tok_emb.weight"], expect["model.embed_tokens.weight"])
    assert not np.array_equal(m.params["tok_emb.weight"], t["model.embed_tokens.weight"])  # really rounded


def test_unsupported_architecture(tmp_path):
    folder = _copy("hf-gpt2-tiny", tmp_path)
    _edit_config(folder, architectures=["MistralForCausalLM"], model_type="mistral")
    _fails(tmp_path, folder, "MistralForCausalLM is not supported")


def test_missing_files(tmp_path):
    _fails(tmp_path, str(tmp_path / "nowhere"), "not a folder")
    folder = _copy("hf-gpt2-tiny", tmp_path)
    os.remove(os.path.join(folder, "model.safetensors"))
    _fails(tmp_path, folder, "model.safetensors: no such file")
    os.remove(os.path.join(folder, "config.json"))
    _fails(tmp_path, folder, "config.json: no such file")


@pytest.mark.parametrize("cut", [4, 100, -50])
def test_truncated_or_corrupt_safetensors(cut, tmp_path):
    folder = _copy("hf-gpt2-tiny", tmp_path)
    st = os.path.join(folder, "model.safetensors")
    data = open(st, "rb").read()
    open(st, "wb").write(data[:cut])
    _fails(tmp_path, folder, "model.safetensors")


def test_garbage_safetensors(tmp_path):
    folder = _copy("hf-bert-tiny", tmp_path)
    open(os.path.join(folder, "model.safetensors"), "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    _fails(tmp_path, folder, "model.safetensors")


def test_shapes_disagreeing_with_config(tmp_path):
    folder = _copy("hf-llama-tiny", tmp_path)
    _edit_config(folder, intermediate_size=64)
    _fails(tmp_path, folder, "mlp.gate_up.weight")
    folder = _copy("hf-gpt2-tiny", tmp_path / "b")
    _edit_config(folder, n_head=6, n_embd=36)
    _fails(tmp_path, folder, "config.json implies")


def test_missing_tensor(tmp_path):
    folder = _copy("hf-bert-tiny", tmp_path)
    st = os.path.join(folder, "model.safetensors")
    t = load_file(st)
    del t["encoder.layer.1.attention.self.key.bias"]
    save_file(t, st, metadata={"format": "pt"})
    _fails(tmp_path, folder, "'encoder.layer.1.attention.self.key.bias'")


def test_unsupported_rope_scaling(tmp_path):
    folder = _copy("hf-llama-tiny", tmp_path)
    _edit_config(folder, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    _fails(tmp_path, folder, "'yarn' is not supported")
    _edit_config(folder, rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0})
    _fails(tmp_path, folder, "'linear' is not supported")


def test_rope_theta_and_tied_embeddings(tmp_path):
    folder = _copy("hf-llama-tiny", tmp_path)
    _edit_config(folder, rope_parameters={"rope_type": "default", "rope_theta": 123.0}, tie_word_embeddings=True)
    convert(folder, str(tmp_path / "m.npz"))
    m = modelfile.load(str(tmp_path / "m.npz"))
    assert m.config["rope_theta"] == 123.0 and m.config["tie_embeddings"] and "lm_head.weight" not in m.params


def _st_folder(tmp_path, pooling: dict, normalize: bool = True, max_seq_length: int | None = 12) -> str:
    folder = _copy("hf-bert-tiny", tmp_path)
    mods = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        mods.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    json.dump(mods, open(os.path.join(folder, "modules.json"), "w"))
    os.makedirs(os.path.join(folder, "1_Pooling"))
    json.dump({"word_embedding_dimension": 24, **pooling}, open(os.path.join(folder, "1_Pooling", "config.json"), "w"))
    json.dump({"max_seq_length": max_seq_length, "do_lower_case": False},
              open(os.path.join(folder, "sentence_bert_config.json"), "w"))
    return folder


def test_sentence_transformers_pipeline(tmp_path):
    folder = _st_folder(tmp_path, {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False})
    convert(folder, str(tmp_path / "m.npz"))
    m = modelfile.load(str(tmp_path / "m.npz"))
    assert m.config["normalize"] is True and m.config["max_seq_length"] == 12
    folder = _st_folder(tmp_path / "b", {"pooling_mode_mean_tokens": True}, normalize=False)
    convert(folder, str(tmp_path / "n.npz"))
    assert modelfile.load(str(tmp_path / "n.npz")).config["normalize"] is False


@pytest.mark.parametrize("mode", ["pooling_mode_cls_token", "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens"])
def test_unsupported_pooling(mode, tmp_path):
    folder = _st_folder(tmp_path, {"pooling_mode_mean_tokens": False, mode: True})
    _fails(tmp_path, folder, "pooling mode")


def test_stream_npz_is_atomic(tmp_path):
    out = tmp_path / "x.npz"

    def items():
        yield "a", np.arange(3.0)
        raise MinitxError("boom")

    with pytest.raises(MinitxError):
        stream_npz(str(out), items())
    assert os.listdir(tmp_path) == []
    stream_npz(str(out), iter([("a", np.arange(3.0)), ("s", np.array(7)), ("t", np.ones((2, 3)).T)]))
    z = np.load(out, allow_pickle=False)
    assert z["s"].shape == () and z["t"].shape == (3, 2) and z["a"][2] == 2.0
