"""Encoder–decoders (T5, BART, Marian) against transformers: converted folders, teacher-forced
logits, greedy and beam search, padded batches; the CLI's init/infer for every family.

Golden numbers come from transformers (scripts/make_fixtures.py); the live cases at the bottom
call transformers directly with other beam settings and model shapes.
"""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from minitx.cli import main

from minitx import modelfile, seq2seq
from minitx.convert import convert
from minitx.errors import MinitxError
from minitx.model import Model
from minitx.training import pairs as pair_training
from minitx.training.loop import fit
from minitx.training.settings import TrainSettings, new_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
ARCHS = ("t5", "bart", "marian")
REL = 1e-5


def _rows(a: np.ndarray) -> list[list[int]]:
    return [[int(t) for t in r if t >= 0] for r in a]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    d = tmp_path_factory.mktemp("seq2seq")
    out = {}
    for arch in ARCHS:
        p = str(d / f"{arch}.npz")
        convert(os.path.join(FIX, f"hf-{arch}-tiny"), p)
        ref = np.load(os.path.join(FIX, f"reference-seq2seq-{arch}.npz"), allow_pickle=False)
        out[arch] = (p, modelfile.load(p), ref)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_teacher_forced_logits_match_transformers(converted, arch):
    _, m, g = converted[arch]
    got = seq2seq.logits(m, _rows(g["sources"]), g["targets"])
    ref = g["logits"]
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() / np.abs(ref).max() <= REL


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("search,beams", [("greedy", 1), ("beam3", 3)])
def test_generation_matches_transformers(converted, arch, search, beams):
    _, m, g = converted[arch]
    assert seq2seq.generate(m, _rows(g["sources"]), 12, beams=beams) == _rows(g[search])


@pytest.mark.parametrize("arch", ARCHS)
def test_a_padded_row_generates_what_it_would_alone(converted, arch):
    _, m, g = converted[arch]
    srcs = _rows(g["sources"])
    batch = seq2seq.generate(m, srcs, 6, beams=2)
    assert batch == [seq2seq.generate(m, [s], 6, beams=2)[0] for s in srcs]


@pytest.mark.parametrize("arch", ARCHS)
def test_numba_runs_every_node_and_matches_transformers(converted, arch):
    """With no fallback to the spec, the numba backend's logits and beams equal transformers'."""
    pytest.importorskip("numba")
    _, m, g = converted[arch]
    nb = ("numba",)
    got = seq2seq.logits(m, _rows(g["sources"]), g["targets"], backends=nb, strict=True)
    assert np.abs(got - g["logits"]).max() / np.abs(g["logits"]).max() <= REL
    assert seq2seq.generate(m, _rows(g["sources"]), 12, beams=3, backends=nb, strict=True) == _rows(g["beam3"])


def test_cached_decoding_equals_teacher_forcing(converted):
    """Step-by-step decoding with the self-attention cache gives the full forward's logits."""
    _, m, g = converted["t5"]
    srcs, tgt = _rows(g["sources"]), g["targets"]
    cross, mask = seq2seq.encode(m, srcs)
    past, steps = {}, []
    for t in range(tgt.shape[1]):
        lg, past = seq2seq.decode_step(m, tgt[:, t:t + 1], past, cross, mask)
        steps.append(lg[:, 0])
    np.testing.assert_allclose(np.stack(steps, 1), g["logits"], rtol=0, atol=1e-5 * np.abs(g["logits"]).max())


def test_split_cuts_at_the_cross_attention_kv(converted):
    _, m, _ = converted["bart"]
    enc, dec = seq2seq.split(m.graph)
    assert enc.outputs == [f"cross.{i}.{t}" for i in range(2) for t in "kv"]
    assert {v.name for v in enc.inputs} == {"encoder_ids", "encoder_mask", "encoder_position_ids"}
    assert "encoder_ids" not in {v.name for v in dec.inputs} and "cross.0.k" in {v.name for v in dec.inputs}
    assert not any(n.op == "layer_norm" and n.name.startswith("enc.") for n in dec.nodes)


def test_sampling_is_seeded_and_stops_at_eos(converted):
    from minitx.generate import Sampling

    _, m, g = converted["bart"]
    srcs = _rows(g["sources"])
    a = seq2seq.generate(m, srcs, 8, Sampling(temperature=1.5, seed=3))
    assert a == seq2seq.generate(m, srcs, 8, Sampling(temperature=1.5, seed=3))
    eos = m.config["eos_token_id"]
    assert all(eos not in r[:-1] and 1 <= len(r) <= 8 for r in a)


def test_bad_inputs_are_one_line_errors(converted):
    _, m, _ = converted["marian"]
    for bad, msg in (([[]], "empty"), ([[1, 99]], "outside the vocabulary"), ([list(range(1, 30))], "context")):
        with pytest.raises(MinitxError, match=msg):
            seq2seq.generate(m, bad, 3)
    with pytest.raises(MinitxError, match="beams"):
        seq2seq.generate(m, [[3]], 3, beams=0)


# ------------------------------------------------------------------------------------------ CLI
def run(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("arch", ["t5", "bart", "marian", "transformer"])
def test_cli_init_and_infer_json(tmp_path, arch):
    p = str(tmp_path / f"{arch}.npz")
    assert run("init", "--arch", arch, "-o", p).exit_code == 0
    r = run("infer", p, "--ids", "5,6,7", "--ids", "9", "-n", "4", "--json")
    assert r.exit_code == 0, r.output
    ids = json.loads(r.output)["token_ids"]
    assert len(ids) == 2 and all(1 <= len(x) <= 4 for x in ids)
    m = Model.from_preset(arch, "tiny")
    assert m.n_params() == modelfile.load(p).n_params()


def test_cli_infer_beams_matches_transformers(converted):
    p, _, g = converted["bart"]
    args = [a for s in _rows(g["sources"]) for a in ("--ids", ",".join(map(str, s)))]
    r = run("infer", p, *args, "-n", "12", "--beams", "3", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["token_ids"] == _rows(g["beam3"])


def test_cli_errors_are_one_line_exit_2(converted, tmp_path):
    p, _, _ = converted["t5"]
    for args, msg in ((["--ids", "5,999"], "outside the vocabulary"), (["--ids", "5", "--beams", "2", "--temperature", "1"],
                                                                      "--beams or --temperature"),
                      (["--ids", "5", "--stop", "1"], "--stop")):
        r = run("infer", p, *args)
        assert r.exit_code == 2 and msg in r.output and len(r.output.strip().splitlines()) == 1, r.output
    g = str(tmp_path / "gpt2.npz")
    run("init", "--arch", "gpt2", "-o", g)
    r = run("infer", g, "--ids", "5", "--beams", "2")
    assert r.exit_code == 2 and "encoder–decoder" in r.output


# ------------------------------------------------------------------------- live transformers
def _reference():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("make_fixtures", os.path.join(ROOT, "scripts", "make_fixtures.py"))
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    return ref


LIVE = {
    "t5-relu-tied": lambda ref, f: ref.tiny_t5(f, seed=3),
    "t5-one-head-wide": lambda ref, f: ref.tiny_t5(f, heads=1, d_kv=20, layers=1, dec_layers=1, seed=4),
    "t5-v1.1-unscaled": lambda ref, f: ref.tiny_t5(f, ffn="gated-gelu", tied=False, seed=8),
    "bart-untied-scaled": lambda ref, f: ref.tiny_bart(f, tied=False, scale_embedding=True, seed=9),
    "bart-eos-mid": lambda ref, f: ref.tiny_bart(f, seed=5, eos_bias=1.5),
    "bart-eos-late": lambda ref, f: ref.tiny_bart(f, seed=7, eos_bias=2.5),
    "marian-wide-ffn": lambda ref, f: ref.tiny_marian(f, d_ff=40, heads=4, seed=6),
}
SETTINGS = [(2, 1.0, False), (3, 0.5, True), (4, 2.0, "never"), (3, -1.0, False)]


@pytest.mark.reference
@pytest.mark.parametrize("name", sorted(LIVE))
def test_live_beam_settings_match_transformers(tmp_path, name):
    ref = _reference()
    folder = LIVE[name](ref, str(tmp_path / "hf"))
    convert(folder, str(tmp_path / "m.npz"))
    m = modelfile.load(str(tmp_path / "m.npz"))
    if "untied" in name:
        assert not m.config["tie_embeddings"] and {"lm_head.weight", "enc.tok_emb.weight", "dec.tok_emb.weight"} <= set(m.params)
    if "unscaled" in name:
        assert not m.config["scale_logits"]
    hf = ref.load_seq2seq(folder)
    rng = np.random.default_rng(len(name))
    pool = [t for t in range(m.vocab_size) if t not in (m.config["pad_token_id"], m.config["eos_token_id"])]
    srcs = [rng.choice(pool, n).tolist() for n in (7, 2, 5)]
    if "eos" in name:
        rng = np.random.default_rng(14)
        srcs = [rng.choice(pool, n).tolist() for n in (7, 2, 5)]
    tgt = np.concatenate([np.full((3, 1), m.config["decoder_start_token_id"]), rng.choice(pool, (3, 4))], axis=1)
    want = ref.seq2seq_logits(hf, srcs, tgt)
    assert np.abs(seq2seq.logits(m, srcs, tgt) - want).max() / np.abs(want).max() <= REL
    assert seq2seq.generate(m, srcs, 9) == ref.seq2seq_generate(hf, srcs, 9)
    ended = []
    for beams, lp, es in SETTINGS:
        got = seq2seq.generate(m, srcs, 9, beams=beams, length_penalty=lp, early_stopping=es)
        assert got == ref.seq2seq_generate(hf, srcs, 9, beams=beams, length_penalty=lp, early_stopping=es), \
            (beams, lp, es)
        ended += [r for r in got if len(r) > 1 and r[-1] == m.config["eos_token_id"]]
    if "eos" in name:  # these models finish beams mid-way: the EOS bookkeeping is exercised
        assert ended


# ------------------------------------------------------------------------------------- training
def test_training_on_a_pair_file_learns_to_reverse_digits(tmp_path):
    """A tiny original-architecture Transformer learns to reverse digit strings from a
    source<TAB>target file: exact-match greedy accuracy on unseen strings >= 90%."""
    rng = np.random.default_rng(0)

    def digits():
        return rng.integers(3, 13, rng.integers(2, 7)).tolist()   # ids 3…12; 0 pad/start, 1 EOS

    path = tmp_path / "pairs.tsv"
    path.write_text("".join(f"{' '.join(map(str, s))}\t{' '.join(map(str, s[::-1]))}\n"
                            for s in (digits() for _ in range(2000))))
    m = Model.from_config({"arch": "transformer", "vocab_size": 13, "n_ctx": 16, "d_model": 32, "n_layers": 2,
                           "n_heads": 4, "d_ff": 64}, seed=0)
    pairs = seq2seq.read_pairs(str(path), m)
    test = [digits() for _ in range(100)]
    before = seq2seq.generate(m, test, 8)
    losses = []
    settings = TrainSettings(steps=400, batch_size=32, lr=3e-3, min_lr=3e-4, warmup=20, weight_decay=0.0,
                             eval_every=0, val_fraction=0.05)
    st = fit(new_state(m, settings), pair_training.stream(pairs), pair_training.PairCrossEntropy(pairs),
             progress=lambda rec: losses.append(rec["loss"]))
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    assert st.history[-1]["val_loss"] < 0.5 * np.mean(losses[:20])   # the file's held-out tail
    out = seq2seq.generate(m, test, 8)
    acc = np.mean([o == s[::-1] + [1] for o, s in zip(out, test)])
    assert acc >= 0.9 and np.mean([o == s[::-1] + [1] for o, s in zip(before, test)]) == 0


def test_pair_file_errors_name_the_line(tmp_path):
    m = Model.from_preset("transformer", "tiny")
    for text, msg in (("1 2 3\n", ":1: expected"), ("1 2\t3\n4\t5\t6\n", ":2: expected"), ("1\tx\n", "token ids"),
                      ("1\t999\n", "outside the vocabulary"), ("\n", "no source")):
        p = tmp_path / "p.tsv"
        p.write_text(text)
        with pytest.raises(MinitxError, match=msg):
            seq2seq.read_pairs(str(p), m)


@pytest.mark.reference
def test_cli_text_with_the_converted_tokenizer_matches_transformers(converted):
    """--text goes through the tokenizer.json convert carried over (<s> words </s>); the beams
    and their decoded text match transformers on the same ids."""
    ref = _reference()
    p, m, _ = converted["bart"]
    assert m.tokenizer is not None
    r = run("infer", p, "--text", "w10 w20 w30 w40", "--text", "w33 w12", "-n", "6", "--beams", "3",
            "--length-penalty", "2", "--early-stopping", "never", "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    ids = [m.tokenizer.encode(t).ids for t in ("w10 w20 w30 w40", "w33 w12")]
    assert ids[1] == [0, 33, 12, 2]
    hf = ref.load_seq2seq(os.path.join(FIX, "hf-bart-tiny"))
    want = ref.seq2seq_generate(hf, ids, 6, beams=3, length_penalty=2.0, early_stopping="never")
    assert got["token_ids"] == want and any(len(w) > 1 for w in want)
    assert got["texts"] == [m.tokenizer.decode(w) for w in want]


# --------------------------------------------------------------- the original Transformer vs torch
@pytest.mark.parametrize("prenorm", [False, True])
def test_transformer_family_matches_torch_nn_transformer(prenorm):
    """``arch: transformer`` (post-norm or pre-norm, ReLU; final norms on, as torch.nn.Transformer
    always has them) against torch.nn.Transformer given the same weights; embeddings·√d + sinusoidal
    positions are computed here from the formula, the logits as y·Eᵀ."""
    torch = pytest.importorskip("torch")
    C, H, F, V = 16, 4, 24, 23
    m = Model.from_config({"arch": "transformer", "vocab_size": V, "n_ctx": 16, "d_model": C, "n_layers": 2,
                           "n_decoder_layers": 1, "n_heads": H, "d_ff": F, "final_norm": True, "prenorm": prenorm},
                          seed=3)
    rng = np.random.default_rng(0)
    P = {k: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32) for k, v in m.params.items()}  # norms ≠ 1, biases ≠ 0
    m.params.update(P)
    ref = torch.nn.Transformer(C, H, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=F, dropout=0.0,
                               batch_first=True, norm_first=prenorm).eval()

    def t(a):
        return torch.tensor(np.ascontiguousarray(a))

    with torch.no_grad():
        for i, lay in enumerate(ref.encoder.layers):
            p = f"enc.layers.{i}."
            lay.self_attn.in_proj_weight.copy_(t(P[p + "attn.qkv.weight"].T))
            lay.self_attn.in_proj_bias.copy_(t(P[p + "attn.qkv.bias"]))
            lay.self_attn.out_proj.weight.copy_(t(P[p + "attn.out.weight"].T))
            lay.self_attn.out_proj.bias.copy_(t(P[p + "attn.out.bias"]))
            for mod, name in ((lay.linear1, "mlp.up"), (lay.linear2, "mlp.down")):
                mod.weight.copy_(t(P[p + name + ".weight"].T))
                mod.bias.copy_(t(P[p + name + ".bias"]))
            for mod, name in ((lay.norm1, "attn.norm"), (lay.norm2, "mlp.norm")):
                mod.weight.copy_(t(P[p + name + ".weight"]))
                mod.bias.copy_(t(P[p + name + ".bias"]))
        for i, lay in enumerate(ref.decoder.layers):
            p = f"layers.{i}."
            lay.self_attn.in_proj_weight.copy_(t(P[p + "attn.qkv.weight"].T))
            lay.self_attn.in_proj_bias.copy_(t(P[p + "attn.qkv.bias"]))
            lay.self_attn.out_proj.weight.copy_(t(P[p + "attn.out.weight"].T))
            lay.self_attn.out_proj.bias.copy_(t(P[p + "attn.out.bias"]))
            lay.multihead_attn.in_proj_weight.copy_(t(np.concatenate([P[p + "cross.q.weight"], P[p + "cross.kv.weight"]], 1).T))
            lay.multihead_attn.in_proj_bias.copy_(t(np.concatenate([P[p + "cross.q.bias"], P[p + "cross.kv.bias"]])))
            lay.multihead_attn.out_proj.weight.copy_(t(P[p + "cross.out.weight"].T))
            lay.multihead_attn.out_proj.bias.copy_(t(P[p + "cross.out.bias"]))
            for mod, name in ((lay.linear1, "mlp.up"), (lay.linear2, "mlp.down")):
                mod.weight.copy_(t(P[p + name + ".weight"].T))
                mod.bias.copy_(t(P[p + name + ".bias"]))
            for mod, name in ((lay.norm1, "attn.norm"), (lay.norm2, "cross.norm"), (lay.norm3, "mlp.norm")):
                mod.weight.copy_(t(P[p + name + ".weight"]))
                mod.bias.copy_(t(P[p + name + ".bias"]))
        for mod, name in ((ref.encoder.norm, "enc.norm_f"), (ref.decoder.norm, "norm_f")):
            mod.weight.copy_(t(P[name + ".weight"]))
            mod.bias.copy_(t(P[name + ".bias"]))

    srcs = [[3, 4, 5, 6, 7], [8, 9]]
    tgt = np.array([[0, 5, 6, 7], [0, 11, 12, 13]])
    E = P["tok_emb.weight"]

    def embed(ids):
        T = ids.shape[1]
        pos = np.arange(T)[:, None] / 10000.0 ** (np.arange(0, C, 2) / C)
        pe = np.zeros((T, C))
        pe[:, 0::2], pe[:, 1::2] = np.sin(pos), np.cos(pos)
        return t((E[ids] * np.sqrt(C) + pe).astype(np.float32))

    src = np.array([s + [0] * (5 - len(s)) for s in srcs])
    pad = t(np.arange(5) >= np.array([[5], [2]]))              # True = padding, torch's convention
    with torch.no_grad():
        y = ref(embed(src), embed(tgt), src_key_padding_mask=pad, memory_key_padding_mask=pad,
                tgt_mask=ref.generate_square_subsequent_mask(4), tgt_is_causal=True)
    want = y.numpy() @ E.T
    got = seq2seq.logits(m, srcs, tgt)
    assert np.abs(got - want).max() / np.abs(want).max() <= REL


# ---------------------------------------------------------------------------------------- bench
def test_bench_reports_encoder_time_and_decoder_tokens_apart(converted):
    """An encoder–decoder's bench row has the encoder's milliseconds and the decoder's tokens/s
    (not a decoder-only 'prefill'), and its first-step logits agree with the spec's."""
    from minitx import bench

    p, m, _ = converted["t5"]
    res = bench.run(p, ["numpy", "numba"], settings=bench.Settings(repeat=1, warmup=0, batch=2, prompt_len=5,
                                                                    new_tokens=3), model=m)
    assert res["model"]["encoder_decoder"]
    for row in res["rows"]:
        assert row["status"] == "ok", row["status"]
        assert {"encode_ms_b1", "encode_ms_batch", "decode_tok_s_b1", "decode_tok_s_batch"} == set(row["timings"])
        assert row["accuracy"]["top1"] == 1.0 and row["accuracy"]["max_rel"] < 1e-5
    text = bench.table(res)
    assert "encode b=1 ms" in text and "decode b=2 tok/s" in text and "prefill" not in text


def _reverse_pairs(path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    rows = (rng.integers(3, 13, rng.integers(2, 7)).tolist() for _ in range(n))
    path.write_text("".join(f"{' '.join(map(str, s))}\t{' '.join(map(str, s[::-1]))}\n" for s in rows))


def test_cli_train_pairs_resumes_exactly(tmp_path):
    """`train --pairs` stopped at step 4 and resumed to 8 ends with the weights of one 8-step run
    (the pairs objective keeps no state of its own: the loop's generator draws the pairs)."""
    pairs = tmp_path / "pairs.tsv"
    _reverse_pairs(pairs, 120)
    common = ["--pairs", str(pairs), "--batch", "4", "--eval-every", "4", "--quiet"]
    r = run("train", "--arch", "transformer", *common, "--steps", "8", "-o", str(tmp_path / "one.npz"))
    assert r.exit_code == 0, r.output
    r = run("train", "--arch", "transformer", *common, "--steps", "4", "-o", str(tmp_path / "half.npz"))
    assert r.exit_code == 0, r.output
    r = run("train", "--resume", str(tmp_path / "half.ckpt.npz"), *common, "--steps", "8",
            "-o", str(tmp_path / "two.npz"))
    assert r.exit_code == 0, r.output
    a, b = modelfile.load(str(tmp_path / "one.npz")), modelfile.load(str(tmp_path / "two.npz"))
    start = Model.from_preset("transformer", "tiny", seed=0)
    assert any(not np.array_equal(a.params[k], start.params[k]) for k in a.params)   # it trained
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)


def test_cli_train_pairs_refusals_are_one_line(tmp_path):
    pairs, text = tmp_path / "pairs.tsv", tmp_path / "t.txt"
    _reverse_pairs(pairs, 20)
    text.write_text("some text to train on\n")
    out = ["-o", str(tmp_path / "m.npz")]
    for args, msg in ((["--arch", "transformer"], "give one of --data"),
                      (["--arch", "t5", "--data", str(text)], "train it on --pairs"),
                      (["--arch", "gpt2", "--pairs", str(pairs)], "trains an encoder–decoder"),
                      (["--arch", "bart", "--pairs", str(pairs), "--vocab-size", "300"], "--vocab-size")):
        r = run("train", *args, *out, "--quiet")
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, (args, r.output)
    assert not os.path.exists(tmp_path / "m.npz")
