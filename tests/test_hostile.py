"""Hostile and careless inputs (issue #14): every one is a single `error:` line with exit code 2 —
no traceback, no unbounded memory, no hang — and no output ever destroys an input.

Model files are edited member by member (raw zip entries), so each test states exactly which byte
sequence a hostile file holds.
"""
from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import stat
import time
import tracemalloc
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from minitx import golden as gd
from minitx import modelfile, models
from minitx.cli import main
from minitx.convert import plan
from minitx.errors import MinitxError
from minitx.model import Model
from minitx.outputs import atomic_write, check_output

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


# ------------------------------------------------------------------------------------ helpers
def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def fails(match: str, *args: str) -> str:
    r = run(*args)
    line = r.output.strip()
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert line.startswith("error: ") and "\n" not in line and "Traceback" not in line, line
    assert match in line, line
    return line


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, allow_pickle=False)
    return buf.getvalue()


def text(s: str) -> bytes:
    return npy(np.frombuffer(s.encode(), np.uint8))


def members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def write_zip(path, ms: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as z:
        for k, v in ms.items():
            z.writestr(k, v)
    return str(path)


@pytest.fixture(scope="module")
def gpt2_file(tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("m") / "gpt2.npz"
    modelfile.save(Model.from_config(models.preset("gpt2", "tiny"), seed=0), p)
    return str(p)


def edited(tmp_path, base: str, **changes: bytes) -> str:
    """``base`` with members replaced: ``key=bytes`` (the key without .npy, ``__dot__`` for a dot)."""
    ms = members(base)
    for k, v in changes.items():
        ms[k.replace("__dot__", ".") + ".npy"] = v
    return write_zip(tmp_path / "bad.npz", ms)


def with_config(tmp_path, base: str, **fields) -> str:
    cfg = {**modelfile.load(base).config, **fields}
    return edited(tmp_path, base, __config__=text(json.dumps(cfg)))


# --------------------------------------------------------------------- model files: hostile data
def test_member_that_is_not_npy(tmp_path, gpt2_file):
    bad = edited(tmp_path, gpt2_file, **{"layers__dot__0__dot__norm1__dot__weight": b"PK\x03\x04 not an array"})
    fails("key 'layers.0.norm1.weight' is not an npy array", "infer", bad, "--ids", "1")


def test_config_nested_100000_deep(tmp_path, gpt2_file):
    bad = edited(tmp_path, gpt2_file, __config__=text("[" * 100_000 + "]" * 100_000))
    fails("nested too deeply", "infer", bad, "--ids", "1")
    cfg = {**modelfile.load(gpt2_file).config, "activation": json.loads("[" * 500 + "]" * 500)}
    bad = edited(tmp_path, gpt2_file, __config__=text(json.dumps(cfg)))
    fails("activation list is not supported", "infer", bad, "--ids", "1")


def test_unknown_node_attribute(tmp_path):
    m = Model.from_config(models.preset("gpt2", "tiny"))
    g = json.loads(m.graph.to_json())
    g["nodes"][2]["attrs"]["bogus"] = 1
    p = tmp_path / "g.npz"
    modelfile.save(m, p, graph_differs=True)
    bad = edited(tmp_path, str(p), __graph__=text(json.dumps(g)))
    fails("has unknown attribute 'bogus'", "infer", bad, "--ids", "1")


@pytest.mark.parametrize("attr, value, match", [
    ("eps", "1e-5", "attribute eps must be a finite number, got '1e-5'"),
    ("approximate", "banana", "attribute approximate must be 'none' or 'tanh'"),
])
def test_node_attribute_of_the_wrong_kind(tmp_path, attr, value, match):
    """Attributes an op reads only when it runs are checked when the file is loaded."""
    m = Model.from_config(models.preset("gpt2", "tiny"))
    g = json.loads(m.graph.to_json())
    node = next(n for n in g["nodes"] if attr in n["attrs"])
    node["attrs"][attr] = value
    p = tmp_path / "g.npz"
    modelfile.save(m, p, graph_differs=True)
    fails(match, "infer", edited(tmp_path, str(p), __graph__=text(json.dumps(g))), "--ids", "1")


def test_stored_graph_that_is_not_a_graph(tmp_path, gpt2_file):
    for g in ("[1, 2]", '{"inputs": 5}', '{"inputs": [], "outputs": [], "params": [], "nodes": [{"op": 3}]}'):
        bad = edited(tmp_path, gpt2_file, __graph__=text(g))
        fails("__graph__", "infer", bad, "--ids", "1")


def test_npy_header_declaring_terabytes(tmp_path, gpt2_file):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (2**40,)})
    bad = edited(tmp_path, gpt2_file, **{"layers__dot__0__dot__norm1__dot__weight": buf.getvalue() + b"\0" * 8})
    fails("declares 4,398,046,511,104 bytes", "infer", bad, "--ids", "1")
    # the same header in a golden file (no config to compare with): refused by the size records too
    bad_golden = write_zip(tmp_path / "g.npz", {"__golden__.npy": text(json.dumps(
        {"format": 1, "model": {"arch": "gpt2", "config_hash": "0"}, "inputs": [], "outputs": ["logits"]})), "out.logits.npy": buf.getvalue()})
    with pytest.raises(MinitxError, match="declares"):
        gd.load(bad_golden)


def test_zip_bomb_is_refused_from_its_header(tmp_path, gpt2_file):
    """A member declaring 64 MiB of (highly compressible) zeros, where the config expects 64
    floats: refused from the npy header, before one byte of its data is inflated."""
    ms = members(gpt2_file)
    p = tmp_path / "bomb.npz"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        for k, v in ms.items():
            if k != "layers.0.norm1.weight.npy":
                z.writestr(k, v)
        with z.open("layers.0.norm1.weight.npy", "w", force_zip64=True) as f:
            n = 16 * 2**20
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (n,)})
            chunk = bytes(2**20)
            for _ in range(4 * n // len(chunk)):
                f.write(chunk)
    assert os.path.getsize(p) < 2**20
    tracemalloc.start()
    with pytest.raises(MinitxError, match=r"has shape \(16777216,\), but the config expects \(64,\)"):
        modelfile.load(p)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 2**20, peak


def test_n_layers_of_a_billion_fails_at_once(tmp_path, gpt2_file):
    bad = with_config(tmp_path, gpt2_file, n_layers=10**9)
    t = time.perf_counter()
    fails("n_layers = 1000000000 exceeds the limit", "infer", bad, "--ids", "1")
    assert time.perf_counter() - t < 5
    # within the limits but not what the file holds: the first missing parameter is named
    fails("missing key 'layers.2.norm1.weight'", "infer", with_config(tmp_path, gpt2_file, n_layers=1000), "--ids", "1")


def test_config_implying_more_memory_than_the_machine(tmp_path):
    cfg = {**models.preset("gpt2", "tiny"), "vocab_size": 2**22, "d_model": 2**16, "n_heads": 16}
    with pytest.raises(MinitxError, match="more than this machine's"):
        models.init_params(cfg)
    (tmp_path / "t.txt").write_text("hello world " * 50)
    (tmp_path / "c.json").write_text(json.dumps({"arch": "gpt2", "d_model": 2**16, "n_heads": 16, "n_layers": 1000}))
    fails("more than this machine's", "train", "--config", tmp_path / "c.json", "--data", tmp_path / "t.txt",
          "--vocab-size", "300", "-o", tmp_path / "o.npz", "-q")


def test_corrupt_stored_tokenizer(tmp_path, gpt2_file):
    bad = edited(tmp_path, gpt2_file, __tokenizer__=text('{"model": "this is not a tokenizer"}'))
    r = run("infer", bad, "--ids", "1,2", "-n", "2", "--json")   # ids in, ids out: never parsed
    assert r.exit_code == 0 and json.loads(r.output)["token_ids"], r.output
    fails("the model's stored tokenizer is not readable", "infer", bad, "--prompt", "hi")


def test_meta_that_is_a_list(tmp_path, gpt2_file):
    fails("'__meta__' must be a JSON object", "infer", edited(tmp_path, gpt2_file, __meta__=text("[1, 2]")), "--ids", "1")


@pytest.mark.parametrize("fields, match", [
    ({"n_kv_heads": -2}, "n_kv_heads must be a positive integer, got -2"),
    ({"n_kv_heads": 2}, "gpt2 has no grouped-query attention"),
    ({"activation": "relu"}, "activation 'relu' is not supported"),
    ({"norm_eps": float("inf")}, "norm_eps must be a positive finite number, got inf"),
    ({"n_layers": "2"}, "n_layers must be a positive integer, got '2'"),
    ({"dropout": True}, "dropout must be in [0, 1)"),
    ({"arch": ["gpt2"]}, "unknown architecture list"),
])
def test_config_values_refused(tmp_path, gpt2_file, fields, match):
    fails(match, "infer", with_config(tmp_path, gpt2_file, **fields), "--ids", "1")


@pytest.mark.parametrize("version", [-5, 0])
def test_format_version_below_one(tmp_path, gpt2_file, version):
    bad = edited(tmp_path, gpt2_file, __format_version__=npy(np.array(version, np.int64)))
    fails(f"format version {version} is not a valid version", "infer", bad, "--ids", "1")


def test_weights_so_large_that_logits_are_nan(tmp_path, gpt2_file):
    """Finite weights whose sum overflows: LayerNorm of inf is NaN; argmax would say token 0."""
    big = np.full((512, 64), 3e38, np.float32)
    bad = edited(tmp_path, gpt2_file, **{"tok_emb__dot__weight": npy(big)})
    fails("NaN logits", "infer", bad, "--ids", "1,2", "-n", "3", "--json")


def test_fifo_or_folder_as_model(tmp_path):
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    fails("is not a regular file", "infer", fifo, "--ids", "1")   # and it does not block
    with pytest.raises(MinitxError, match="is a folder"):
        modelfile.load(FIX)


# ------------------------------------------------------------------------------ HF model folders
def _hf(tmp_path, name: str) -> str:
    dst = str(tmp_path / name)
    shutil.copytree(os.path.join(FIX, name), dst)
    return dst


def _hf_config(folder: str, **changes) -> None:
    p = os.path.join(folder, "config.json")
    cfg = json.load(open(p))
    cfg.update(changes)
    json.dump(cfg, open(p, "w"))


def hf_fails(folder: str, match: str) -> None:
    with pytest.raises(MinitxError, match=re.escape(match)):
        plan(folder)


@pytest.mark.parametrize("name, changes, match", [
    ("hf-gpt2-tiny", {"n_layer": "2"}, "n_layer must be an integer, got '2'"),
    ("hf-gpt2-tiny", {"n_layer": 2.0}, "n_layer must be an integer, got 2.0"),
    ("hf-gpt2-tiny", {"n_layer": 10**9}, "n_layers = 1000000000 exceeds the limit"),
    ("hf-gpt2-tiny", {"layer_norm_epsilon": "1e-5"}, "layer_norm_epsilon must be a finite number"),
    ("hf-gpt2-tiny", {"layer_norm_epsilon": None}, "layer_norm_epsilon must be a finite number, got None"),
    ("hf-gpt2-tiny", {"architectures": [123]}, "architectures must be a list of strings"),
    ("hf-gpt2-tiny", {"architectures": None, "model_type": ["gpt2"]}, "model_type must be a string"),
    ("hf-gpt2-tiny", {"activation_function": ["gelu"]}, "activation_function ['gelu'] is not supported"),
    ("hf-llama-tiny", {"rope_scaling": "linear"}, "rope_scaling must be a JSON object or null"),
    ("hf-llama-tiny", {"num_attention_heads": 0}, "num_attention_heads must be positive"),
    ("hf-bert-tiny", {"hidden_size": "24"}, "hidden_size must be an integer"),
])
def test_hf_config_fields(tmp_path, name, changes, match):
    folder = _hf(tmp_path, name)
    _hf_config(folder, **changes)
    hf_fails(folder, match)


def test_hf_deep_nesting_and_folders_in_place_of_files(tmp_path):
    folder = _hf(tmp_path, "hf-gpt2-tiny")
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    hf_fails(folder, "JSON nested too deeply")
    folder = _hf(tmp_path / "b", "hf-gpt2-tiny")
    os.mkdir(os.path.join(folder, "tokenizer.json"))
    hf_fails(folder, "tokenizer.json: is not a regular file")


def _st(tmp_path, mods, sb=None) -> str:
    folder = _hf(tmp_path, "hf-bert-tiny")
    json.dump(mods, open(os.path.join(folder, "modules.json"), "w"))
    if sb is not None:
        json.dump(sb, open(os.path.join(folder, "sentence_bert_config.json"), "w"))
    return folder


def test_hf_sentence_transformers_files(tmp_path):
    hf_fails(_st(tmp_path / "a", ["0_Transformer", "1_Pooling"]), "expected a list of module objects")
    hf_fails(_st(tmp_path / "b", {"idx": 0}), "expected a JSON list, got dict")
    mods = [{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"}]
    hf_fails(_st(tmp_path / "c", mods, {"max_seq_length": "128"}), "max_seq_length must be a positive integer, got '128'")
    mods = [{"idx": 0, "path": "../../etc", "type": "sentence_transformers.models.Pooling"}]
    hf_fails(_st(tmp_path / "d", mods), "points outside the model folder")


def _sharded(tmp_path, weight_map) -> str:
    folder = _hf(tmp_path, "hf-gpt2-tiny")
    os.rename(os.path.join(folder, "model.safetensors"), os.path.join(folder, "shard.safetensors"))
    json.dump({"weight_map": weight_map}, open(os.path.join(folder, "model.safetensors.index.json"), "w"))
    return folder


def test_hf_weight_map(tmp_path):
    hf_fails(_sharded(tmp_path / "a", ["shard.safetensors"]), "weight_map must be a JSON object")
    outside = tmp_path / "outside.safetensors"
    shutil.copy(os.path.join(FIX, "hf-gpt2-tiny", "model.safetensors"), outside)
    hf_fails(_sharded(tmp_path / "b", {"x": str(outside)}), "points outside the model folder")
    hf_fails(_sharded(tmp_path / "c", {"x": "../outside.safetensors"}), "points outside the model folder")
    folder = _sharded(tmp_path / "d", {"x": "shard.safetensors"})
    plan(folder)   # a well-formed index still works


def test_hf_errors_reach_the_cli_as_one_line(tmp_path):
    folder = _hf(tmp_path, "hf-gpt2-tiny")
    _hf_config(folder, n_layer="2")
    fails("n_layer must be an integer", "convert", folder, "-o", tmp_path / "o.npz")


# ------------------------------------------------------------------------------------ golden files
GOLDEN = os.path.join(FIX, "golden-gpt2-tiny.npz")


def golden_with(tmp_path, header_changes=None, **arrays) -> str:
    ms = members(GOLDEN)
    h = json.loads(np.load(GOLDEN)["__golden__"].tobytes())
    h.update(header_changes or {})
    ms["__golden__.npy"] = text(json.dumps(h))
    for k, a in arrays.items():
        ms[k.replace("__dot__", ".") + ".npy"] = npy(a)
    return write_zip(tmp_path / "g.npz", ms)


@pytest.mark.parametrize("changes, arrays, match", [
    ({"format": "1"}, {}, "format must be a positive integer"),
    ({"format": -5}, {}, "format must be a positive integer"),
    ({"inputs": "input_ids"}, {}, "inputs must be a list of names"),
    ({"outputs": {"logits": 1}}, {}, "outputs must be a list of names"),
    ({"provenance": [1]}, {}, "provenance must be a JSON object"),
    ({}, {"in__dot__input_ids": np.ones((1, 2, 3), np.int64)}, "input_ids must be 2-D"),
    ({}, {"in__dot__input_ids": np.ones((1, 3), np.float64)}, "input_ids must be integers"),
    ({}, {"out__dot__logits": np.ones((1, 3, 512), np.complex64)}, "must be real numbers"),
])
def test_golden_files(tmp_path, changes, arrays, match):
    with pytest.raises(MinitxError, match=re.escape(match)):
        gd.load(golden_with(tmp_path, changes, **arrays))


def test_golden_errors_reach_the_cli_as_one_line(tmp_path):
    m = tmp_path / "m.npz"
    assert run("convert", os.path.join(FIX, "hf-gpt2-tiny"), "-o", m).exit_code == 0
    fails("input_ids must be integers", "verify", m,
          golden_with(tmp_path, {}, in__dot__input_ids=np.ones((1, 3), np.float32)))


# ------------------------------------------------------------------------------------------ outputs
def test_special_files_are_never_replaced(tmp_path, gpt2_file):
    fails("is not a regular file", "init", "--arch", "gpt2", "-o", "/dev/null")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    fails("is not a regular file", "golden", gpt2_file, "--ids", "1", "-o", fifo)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    with pytest.raises(MinitxError, match="is a folder"):
        check_output(tmp_path)


def test_a_symlink_is_written_through(tmp_path):
    target = tmp_path / "real.npz"
    target.write_bytes(b"old")
    link = tmp_path / "link.npz"
    os.symlink(target.name, link)
    assert run("init", "--arch", "gpt2", "-o", link).exit_code == 0
    assert os.path.islink(link) and os.readlink(link) == target.name
    assert modelfile.load(target).config["arch"] == "gpt2"


def test_outputs_that_are_inputs_are_refused(tmp_path, gpt2_file):
    m = tmp_path / "m.npz"
    shutil.copy(gpt2_file, m)
    before = m.read_bytes()
    fails("is the same file as the input", "golden", m, "--ids", "1", "-o", m)
    os.link(m, tmp_path / "hard.npz")     # another name, the same inode
    fails("is the same file as the input", "golden", m, "--ids", "1", "-o", tmp_path / "hard.npz")
    assert m.read_bytes() == before
    t = tmp_path / "t.txt"
    t.write_text("some text " * 100)
    fails("is the same file as --data", "train", "--arch", "gpt2", "--data", t, "-o", t, "-q")
    assert t.read_text() == "some text " * 100
    folder = _hf(tmp_path, "hf-gpt2-tiny")
    weights = os.path.join(folder, "model.safetensors")
    w = open(weights, "rb").read()
    fails("is the same file as the input", "convert", folder, "-o", weights)
    assert open(weights, "rb").read() == w
    assert run("convert", folder, "-o", os.path.join(folder, "m.npz")).exit_code == 0   # a new file is fine


def test_optimize_in_place_is_allowed(tmp_path, gpt2_file):
    m = tmp_path / "m.npz"
    shutil.copy(gpt2_file, m)
    r = run("optimize", m, "--plugin", "quant:int8", "--calib", "random:2x8", "--force", "-o", m)
    assert r.exit_code == 0, r.output
    assert modelfile.load(m).meta["rewrites"]


def test_unwritable_folders_are_found_before_the_work(tmp_path):
    fails("cannot write in folder /proc", "init", "--arch", "gpt2", "-o", "/proc/minitx-hostile.npz")
    t = tmp_path / "t.txt"
    t.write_text("hello world, " * 200)
    line = fails("cannot write in folder /proc", "train", "--arch", "gpt2", "--data", t, "--steps", "2",
                 "-o", tmp_path / "o.npz", "--checkpoint", "/proc/minitx-hostile.ckpt.npz")
    assert not (tmp_path / "o.npz").exists(), line


def test_oserror_while_writing_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "o.npz"
    with pytest.raises(MinitxError, match=f"{out}: writing failed: No space left on device"):
        with atomic_write(out) as f:
            f.write(b"x")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert os.listdir(tmp_path) == []


def test_temporary_files_are_named_and_stale_ones_removed(tmp_path):
    out = tmp_path / "o.npz"
    dead = 2**22 + 12345            # above the default pid_max: never a live process
    stale = tmp_path / f".o.npz.minitx-tmp-{dead}"
    live = tmp_path / f".o.npz.minitx-tmp-{os.getppid()}"
    other = tmp_path / f".x.npz.minitx-tmp-{dead}"
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    seen = []
    with atomic_write(out) as f:
        seen = [n for n in os.listdir(tmp_path) if n.startswith(".o.npz.minitx-tmp-")]
        f.write(b"data")
    assert f".o.npz.minitx-tmp-{os.getpid()}" in seen
    assert not stale.exists() and live.exists() and other.exists() and out.read_bytes() == b"data"


def test_check_output_returns_the_target(tmp_path):
    (tmp_path / "a").write_text("x")
    os.symlink("a", tmp_path / "l")
    assert check_output(tmp_path / "l") == str(tmp_path / "a")
    with pytest.raises(MinitxError, match="output path is empty"):
        check_output("")
    with pytest.raises(MinitxError, match="does not exist"):
        check_output(tmp_path / "nope" / "x.npz")


# ------------------------------------------------------------------------------- train's inputs
@pytest.mark.parametrize("config, match", [
    ('{"arch": "gpt2", "vocab_size": "x"}', "vocab_size must be a positive integer, got 'x'"),
    ('{"arch": "gpt2", "n_layers": 1000000000}', "n_layers = 1000000000 exceeds the limit of 1024"),
    ('{"arch": ["gpt2"]}', "unknown architecture list"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
], ids=["string-size", "huge-n_layers", "list-arch", "deep-json"])
def test_train_config_refused_before_the_tokenizer(tmp_path, config, match):
    (tmp_path / "t.txt").write_text("hello world " * 50)
    (tmp_path / "c.json").write_text(config)
    fails(match, "train", "--config", tmp_path / "c.json", "--data", tmp_path / "t.txt", "-o", tmp_path / "o.npz", "-q")


def test_train_text_and_tokenizer_files(tmp_path):
    (tmp_path / "t.txt").write_text("hello world " * 50)
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe not utf-8")
    fails("not UTF-8", "train", "--arch", "gpt2", "--tokenizer", tmp_path / "bad.json", "--data", tmp_path / "t.txt",
          "-o", tmp_path / "o.npz", "-q")
    os.mkfifo(tmp_path / "fifo")
    fails("is not a regular file", "train", "--arch", "gpt2", "--data", tmp_path / "fifo", "-o", tmp_path / "o.npz", "-q")
