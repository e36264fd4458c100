"""The parallel rewrite equals the unsharded model (GPT-2, LLaMA with grouped-query attention,
BERT), in one process with the collectives' specs: against minitx's own unsharded graph, and
against the transformers goldens in tests/fixtures (independent references)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from minitx import feeds, models, modelfile
from minitx.cli import main
from minitx.convert import convert
from minitx.distributed import layout, prepare
from minitx.distributed.cost import param_bytes_per_rank, sent_bytes
from minitx.distributed.program import rank_program
from minitx.errors import MinitxError
from minitx.executor import Executor
from minitx.model import Model
from minitx.plugins.parallel import Layout, check_spmd, shard, stage_sizes

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
IDS = np.array([[3, 1, 4, 1, 5, 9], [2, 6, 5, 3, 5, 8]])


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def _model(arch: str, **over) -> Model:
    cfg = {**models.preset(arch, "tiny"), **over}
    return Model.from_config(cfg, seed=7)


CONFIGS = {
    "gpt2": dict(vocab_size=509),                                    # odd: padded to a multiple of tp
    "llama": dict(vocab_size=510, n_heads=8, n_kv_heads=4),          # grouped-query: 2 query heads per KV head
    "bert": dict(vocab_size=511),
}


def _outputs(m: Model, graph=None, params=None, past=None) -> dict[str, np.ndarray]:
    g = graph or m.graph
    f = feeds.build(g, IDS, past=past) if m.is_decoder else feeds.for_sequences(g, IDS.tolist(), False)
    return Executor(g, params or m.params).run(f)


def _sharded_equals_whole(arch, layout_):
    """Shard the tiny model of ``arch``, check its outputs equal the unsharded ones; the model, graph, params and outputs."""
    m = _model(arch, **CONFIGS[arch])
    ref = _outputs(m)
    g, p = shard(m.graph, m.params, layout_)
    out = _outputs(m, g, p)
    for k, r in ref.items():
        np.testing.assert_allclose(out[k], r, rtol=1e-5, atol=2e-6, err_msg=k)
    return m, g, p, ref


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("tp,pp", [(2, 1), (4, 1), (1, 2), (2, 2)])
def test_sharded_graph_equals_the_unsharded_model(arch, tp, pp):
    m, g, _, _ = _sharded_equals_whole(arch, Layout(tp, pp))
    assert g.meta["parallel"] == {"tp": tp, "sp": 1, "pp": pp, "mb": 1, "world": tp * pp}
    assert [v.name for v in g.inputs] == [v.name for v in m.graph.inputs] and g.outputs == m.graph.outputs
    ops = {n.op for n in g.nodes}
    if tp > 1:
        assert {"all_reduce", "vocab_embedding"} <= ops
        assert ("all_gather" in ops) == m.is_decoder          # the LM head's vocabulary pieces
    if pp > 1:
        assert "send_recv" in ops
    ranks = {int(n.tags["rank"]) for n in g.nodes if "rank" in n.tags}
    assert ranks == set(range(tp * pp))


def test_decode_with_a_cache_matches_and_each_rank_holds_its_heads():
    """A prefill then one decode step: the sharded graph reads and returns the unsharded cache."""
    m = _model("llama", **CONFIGS["llama"])
    g, p = shard(m.graph, m.params, Layout(2, 1))
    ref1 = _outputs(m)
    past = {k.replace("present.", "past."): v for k, v in ref1.items() if k.startswith("present.")}
    step = np.array([[7], [11]])
    fr = feeds.build(m.graph, step, past=past)
    ref2 = Executor(m.graph, m.params).run(fr)
    out2 = Executor(g, p).run(feeds.build(g, step, past=past))
    np.testing.assert_allclose(out2["logits"], ref2["logits"], rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(out2["present.1.v"], ref2["present.1.v"], rtol=1e-6, atol=1e-7)
    sdpa = [n for n in g.nodes if n.op == "attention"]
    assert {(n.attrs["n_heads"], n.attrs["n_kv_heads"]) for n in sdpa} == {(4, 2)}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("tp,pp,mb", [(1, 2, 2), (2, 2, 2), (2, 1, 2)])
def test_micro_batches_equal_the_whole_batch(arch, tp, pp, mb):
    m, g, _, _ = _sharded_equals_whole(arch, Layout(tp, pp, mb))
    assert {n.tags.get("microbatch") for n in g.nodes if "rank" in n.tags and n.op not in ("chunk", "concat")} == set(range(mb))


def test_a_stage_starts_the_next_micro_batch_after_handing_on_the_last():
    """GPipe's forward order in each rank's program: stage 0 sends micro-batch 0 on, then computes
    micro-batch 1 while stage 1 works on 0; an uneven batch (3 rows in 2) is cut 2 + 1."""
    m = _model("gpt2", n_layers=3)
    g, p = shard(m.graph, m.params, Layout(1, 2, 2))
    prog = rank_program(g, p, 0).graph.nodes
    first_send = next(k for k, n in enumerate(prog) if n.op == "send_recv")
    first_mb1 = next(k for k, n in enumerate(prog) if n.tags.get("microbatch") == 1)
    assert first_send < first_mb1
    ids = np.array([[1, 2], [3, 4], [5, 6]])
    out = Executor(g, p).run(feeds.build(g, ids))
    np.testing.assert_allclose(out["logits"], Executor(m.graph, m.params).run(feeds.build(m.graph, ids))["logits"],
                               rtol=1e-6, atol=1e-7)
    with pytest.raises(MinitxError, match="cannot be cut into 2 non-empty pieces"):
        Executor(g, p).run(feeds.build(g, ids[:1]))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("layout_", [Layout(sp=2), Layout(sp=4), Layout(sp=2, pp=2), Layout(sp=2, pp=2, mb=2)],
                         ids=str)
def test_sequence_parallel_equals_the_whole_sequence(arch, layout_):
    """Ulysses: each rank a piece of the 6 tokens (4 ranks: 2+2+1+1), all-to-all to heads for
    attention and back; per-token outputs all-gathered at the edge."""
    m, g, _, _ = _sharded_equals_whole(arch, layout_)
    ops = [n.op for n in g.nodes]
    assert ops.count("all_to_all") == 2 * 2 * m.config["n_layers"] * layout_.mb   # q, k, v in, out back: 4 per layer
    assert "all_reduce" not in ops


def test_sequence_parallel_decodes_one_token_on_two_ranks():
    """A decode step has one token: the second rank's piece is empty, and the result is exact."""
    m = _model("gpt2")
    g, p = shard(m.graph, m.params, Layout(sp=2))
    ref1 = _outputs(m)
    past = {k.replace("present.", "past."): v for k, v in ref1.items() if k.startswith("present.")}
    step = np.array([[7], [11]])
    ref2 = Executor(m.graph, m.params).run(feeds.build(m.graph, step, past=past))
    out2 = Executor(g, p).run(feeds.build(g, step, past=past))
    for k in ref2:
        np.testing.assert_allclose(out2[k], ref2[k], rtol=1e-5, atol=2e-6, err_msg=k)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("layout_", [Layout(tp=2, sp=2), Layout(tp=4, sp=4), Layout(tp=2, sp=2, pp=2)], ids=str)
def test_tp_with_sp_is_megatron_sequence_parallelism(arch, layout_):
    """tp and sp on the same ranks: between the tensor-parallel regions each rank holds its piece of
    the sequence; the partial sums meet in reduce-scatters along time (no all-reduce left), the
    column-parallel linears all-gather first. Exact, prefill and a one-token decode step."""
    m, g, p, ref = _sharded_equals_whole(arch, layout_)
    assert g.meta["parallel"]["world"] == layout_.tp * layout_.pp
    ops = [n.op for n in g.nodes if "ranks" in n.tags]
    L = m.config["n_layers"]
    assert "all_reduce" not in ops and ops.count("reduce_scatter") == 2 * L + 1      # per layer 2, + the embedding
    if m.is_decoder:
        past = {k.replace("present.", "past."): v for k, v in ref.items() if k.startswith("present.")}
        step = np.array([[7], [11]])
        want = Executor(m.graph, m.params).run(feeds.build(m.graph, step, past=past))
        got = Executor(g, p).run(feeds.build(g, step, past=past))
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=2e-6, err_msg=k)


def test_tp_with_another_sp_is_refused():
    with pytest.raises(MinitxError, match="sequence parallelism runs on the tp ranks themselves"):
        Layout(tp=2, sp=4)
    with pytest.raises(MinitxError, match="without ring"):
        Layout(tp=2, sp=2, ring=1)


def test_vocabulary_is_padded_to_a_multiple_of_tp():
    m = _model("gpt2", vocab_size=509)
    g, p = shard(m.graph, m.params, Layout(4, 1))
    shards = [p[f"tok_emb.weight@{r}"] for r in range(4)]
    assert all(s.shape == (128, 64) for s in shards)           # 509 → 512 rows, 128 per rank
    np.testing.assert_array_equal(np.concatenate(shards)[:509], m.params["tok_emb.weight"])
    assert not np.concatenate(shards)[509:].any()
    assert g.infer({"B": 1, "T": 2, "S": 0})["logits"][0] == (1, 2, 509)


def test_weights_per_rank_shrink_with_tp():
    m = _model("gpt2", vocab_size=512)
    g, _ = shard(m.graph, m.params, Layout(2, 1))
    mem = param_bytes_per_rank(g)
    total = m.nbytes()
    # Everything but norms, biases of row-parallel layers and positions is split in half.
    assert all(0.5 * total < b < 0.6 * total for b in mem.values()), (mem, total)


def test_pipeline_stages_split_layers_evenly_earlier_stages_first():
    assert stage_sizes(3, 2) == [2, 1]
    assert stage_sizes(4, 3) == [2, 1, 1]
    assert stage_sizes(4, 2) == [2, 2]
    with pytest.raises(MinitxError, match="at least one"):
        stage_sizes(2, 3)
    m = _model("gpt2", n_layers=3)
    g, p = shard(m.graph, m.params, Layout(1, 2))
    rank_of_layer = {int(n.tags["layer"]): int(n.tags["rank"]) for n in g.nodes if "layer" in n.tags}
    assert rank_of_layer == {0: 0, 1: 0, 2: 1}
    assert g.node("lm_head@1").op == "matmul" and g.node("tok_emb@0").op == "embedding"
    np.testing.assert_allclose(_outputs(m, g, p)["logits"], _outputs(m)["logits"], rtol=1e-6, atol=1e-7)


def test_heads_that_tp_cannot_split_are_an_error_naming_them():
    m = _model("llama")                                          # 4 heads, 2 KV heads
    with pytest.raises(MinitxError, match="tp=4 cannot split 4 attention heads and 2 KV heads"):
        shard(m.graph, m.params, Layout(4, 1))
    with pytest.raises(MinitxError, match="already sharded"):
        g, p = shard(m.graph, m.params, Layout(2, 1))
        shard(g, p, Layout(2, 1))


def test_spmd_check_catches_a_read_across_ranks():
    m = _model("gpt2")
    g, _ = shard(m.graph, m.params, Layout(2, 1))
    check_spmd(g)
    n = g.node("layers.0.mlp.act@1")
    n.inputs = ["layers.0.mlp.up@0"]
    with pytest.raises(MinitxError, match="on rank 1 reads 'layers.0.mlp.up@0' of rank 0"):
        check_spmd(g)


def test_training_gradients_through_the_collectives_match():
    """The collectives' VJPs make the sharded graph's weight gradients the unsharded ones, cut the
    same way (summed over ranks for a replicated weight)."""
    m = _model("gpt2", vocab_size=510)
    g, p = shard(m.graph, m.params, Layout(2, 1))
    targets = np.roll(IDS, -1, axis=1)
    ref = Executor(models.with_loss(m.graph), m.params).forward_backward(
        feeds.build(models.with_loss(m.graph), IDS, targets=targets))
    gl = models.with_loss(g)
    gl.nodes[-1].inputs[0] = "logits"
    out = Executor(gl, p).forward_backward(feeds.build(gl, IDS, targets=targets))
    np.testing.assert_allclose(out.outputs["loss"], ref.outputs["loss"], rtol=1e-6)
    up = np.concatenate([out.grads["layers.1.mlp.up.weight@0"], out.grads["layers.1.mlp.up.weight@1"]], axis=1)
    np.testing.assert_allclose(up, ref.grads["layers.1.mlp.up.weight"], rtol=1e-4, atol=1e-6)
    norm = out.grads["layers.0.norm1.weight@0"] + out.grads["layers.0.norm1.weight@1"]
    np.testing.assert_allclose(norm, ref.grads["layers.0.norm1.weight"], rtol=1e-4, atol=1e-6)
    emb = np.concatenate([out.grads["tok_emb.weight@0"], out.grads["tok_emb.weight@1"]])[:510]
    np.testing.assert_allclose(emb, ref.grads["tok_emb.weight"], rtol=1e-4, atol=1e-6)


def test_each_ranks_program_is_its_part_alone():
    m = _model("llama", **CONFIGS["llama"])
    g, p = shard(m.graph, m.params, Layout(2, 2))
    for r in range(4):
        prog = rank_program(g, p, r)
        assert all(n.tags.get("rank", r) == r for n in prog.graph.nodes)
        stage = r // 2
        layer = stage                                             # 2 layers on 2 stages
        past = {v.name: v.shape for v in prog.graph.inputs if v.name.startswith("past.")}
        assert past == {f"past.{layer}.k": ("B", "S", 16), f"past.{layer}.v": ("B", "S", 16)}  # 4 KV heads of 8, halved
        assert ("logits" in prog.graph.outputs) == (stage == 1)
        assert prog.shared == {"logits": 2}
        assert set(prog.params) == {k for k in p if k.endswith(f"@{r}")}


# ------------------------------------------------------------------ independent references
@pytest.mark.parametrize("name,spec", [("gpt2", "tp=5"), ("gpt2", "pp=2"), ("llama", "tp=2"),
                                       ("llama", "tp=2,pp=2"), ("bert", "tp=3")])
def test_transformers_goldens_verify_through_the_split(name, spec, tmp_path):
    """The committed transformers goldens (odd vocabularies 61/67/53, 5 / 6+2 GQA / 3 heads) pass
    through the sharded graph with the CLI, as unsharded."""
    m = str(tmp_path / "m.npz")
    convert(os.path.join(FIX, f"hf-{name}-tiny"), m)
    r = run("verify", m, os.path.join(FIX, f"golden-{name}-tiny.npz"), "--json", "--parallel", spec)
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["rows"]
    assert rows[0]["max_rel"] <= 1e-5 and rows[0]["budget_used"] < 0.5


def test_prepare_validates_the_split_as_an_exact_rewrite(tmp_path):
    m = _model("gpt2")
    out = prepare(m, "tp=2")
    entry = out.meta["rewrites"][-1]
    assert entry["plugin"] == "parallel" and entry["exact"] and entry["validation"]["passed"]


# ------------------------------------------------------------------ command line
def test_cli_infer_parallel_prints_what_the_plain_command_prints(tmp_path):
    path = str(tmp_path / "m.npz")
    m = _model("llama", **CONFIGS["llama"])
    modelfile.save(m, path)
    plain = run("infer", path, "--ids", "1,2,3", "-n", "6", "--json")
    assert plain.exit_code == 0, plain.output
    for spec in ("tp=4", "tp=2,pp=2"):
        r = run("infer", path, "--ids", "1,2,3", "-n", "6", "--json", "--parallel", spec)
        assert r.exit_code == 0, r.output
        assert json.loads(r.output) == json.loads(plain.output)


def test_cli_show_parallel_prints_memory_and_bytes_per_rank(tmp_path):
    path = str(tmp_path / "m.npz")
    modelfile.save(_model("gpt2"), path)
    r = run("show", path, "--parallel", "tp=2,pp=2", "--seq", "8", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert set(s["param_bytes_per_rank"]) == {"0", "1", "2", "3"}
    pf = s["steps"]["prefill"]["bytes_sent_per_token"]
    # Stage 0 (ranks 0, 1): embedding + 2·(attention, MLP) all-reduces of 64 floats... on one layer:
    # 3 all-reduces at 2(n-1)/n·256 B + the hand-on to stage 1 (256 B) per token.
    assert pf["0"] == pytest.approx(3 * sent_bytes("all_reduce", 256, 2) + 256)
    assert set(s["peak_activation_bytes_per_rank"]) == {"0", "1", "2", "3"}
    text = run("show", path, "--parallel", "tp=2")
    assert text.exit_code == 0 and "weights MiB" in text.output and "act. MiB" in text.output


def test_activation_memory_of_a_stage_is_its_part():
    """Per-rank peak activations come from the rank's own nodes: a pipeline's first stage of a
    4-layer model holds about half the activations of one process, never more than all of them."""
    from minitx.distributed.cost import peak_activation_bytes

    m = _model("gpt2", n_layers=4, vocab_size=64)
    g, _ = shard(m.graph, m.params, Layout(1, 2))
    b = {"B": 4, "T": 32, "S": 0}
    whole = peak_activation_bytes(m.graph, b)
    first = peak_activation_bytes(g, b, rank=0)
    assert 0.3 * whole < first < 0.8 * whole
    assert peak_activation_bytes(g, b) >= whole


@pytest.mark.parametrize("spec,msg", [
    ("tp=4", "tp=4 cannot split 4 attention heads and 2 KV heads"),
    ("dp=2", "data parallelism is for training: minitx train --parallel dp=N"),
    ("tp=0", "tp must be a positive integer"),
    ("tp2", "expects tp=N,pp=M"),
    ("pp=3", "pp=3 stages for a model of 2 layer(s)"),
])
def test_cli_parallel_errors_are_one_line_exit_2(tmp_path, spec, msg):
    path = str(tmp_path / "m.npz")
    modelfile.save(_model("llama"), path)
    r = run("infer", path, "--ids", "1,2", "--parallel", spec)
    assert r.exit_code == 2
    assert msg in r.output and r.output.count("\n") == 1 and "Traceback" not in r.output


def test_layout_strings():
    assert layout("tp=2,pp=3") == Layout(2, 3) and layout(" pp=2 ") == Layout(1, 2)
    assert layout("sp=2,pp=2,mb=4") == Layout(pp=2, mb=4, sp=2)
    with pytest.raises(MinitxError, match="twice"):
        layout("tp=2,tp=2")


@pytest.mark.parametrize("layout_", [Layout(tp=2), Layout(tp=4), Layout(tp=2, pp=2), Layout(sp=2), Layout(sp=4),
                                     Layout(pp=3), Layout(sp=2, pp=2), Layout(tp=4, pp=3)], ids=str)
@pytest.mark.parametrize("batch,seq", [(2, 8), (1, 7), (1, 1)])
def test_the_analytic_cost_model_counts_what_the_rewrite_sends(layout_, batch, seq):
    """predict() (from the model's shape alone, for layouts too large to build) equals the bytes
    and modelled time of the collectives in the actual sharded graph, on its busiest rank."""
    from minitx.distributed.cost import predict, summary

    cfg = models.complete_config({**models.preset("llama", "tiny"), "n_layers": 5, "vocab_size": 509,
                                  "n_heads": 8, "n_kv_heads": 4})
    m = Model.from_config(cfg)
    g, _ = shard(m.graph, m.params, layout_, only_rank=-1)
    step = summary(g, m.nbytes(), batch, seq, 0)["steps"]["prefill"]
    got = predict(cfg, layout_.tp, layout_.pp, layout_.sp, batch=batch, seq=seq)
    assert got["bytes_sent_per_token"] == pytest.approx(max(step["bytes_sent_per_token"].values()), rel=1e-12)
    assert got["comm_seconds"] == pytest.approx(max(step["comm_seconds_model"].values()), rel=1e-12)


@pytest.mark.parametrize("arch,tp", [("t5", 2), ("t5", 4), ("bart", 2), ("bart", 4), ("marian", 2)])
def test_encoder_decoders_split_their_cross_attention_exactly(tmp_path, arch, tp):
    """T5, BART, Marian: tp splits self- and cross-attention by heads (T5's relative position bias
    too); the split model's teacher-forced logits and greedy tokens are transformers' (fixtures)."""
    from minitx import seq2seq

    path = str(tmp_path / f"{arch}.npz")
    convert(os.path.join(FIX, f"hf-{arch}-tiny"), path)
    m = modelfile.load(path)
    ref = np.load(os.path.join(FIX, f"reference-seq2seq-{arch}.npz"), allow_pickle=False)
    rows = [[int(t) for t in r if t >= 0] for r in ref["sources"]]
    sm = prepare(m, f"tp={tp}")
    ops = {n.op for n in sm.graph.nodes}
    assert "all_reduce" in ops and sm.graph.meta["parallel"]["tp"] == tp
    cross = [n for n in sm.graph.nodes if n.name.startswith("layers.0.cross.sdpa")]
    assert len(cross) == tp and all(int(n.attrs["n_heads"]) * tp == int(m.config["n_heads"]) for n in cross)
    got = seq2seq.logits(sm, rows, ref["targets"])
    assert np.abs(got - ref["logits"]).max() / np.abs(ref["logits"]).max() <= 1e-5
    assert seq2seq.generate(sm, rows, 12, beams=1) == [[int(t) for t in r if t >= 0] for r in ref["greedy"]]
    r = run("show", path, "--parallel", f"tp={tp}", "--seq", "8", "--json")
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.output)["param_bytes_per_rank"]) == tp


def test_heads_tp_cannot_split_in_an_encoder_decoder_name_the_attention(tmp_path):
    path = str(tmp_path / "marian.npz")
    convert(os.path.join(FIX, "hf-marian-tiny"), path)
    with pytest.raises(MinitxError, match=r"tp=4 cannot split 2 attention heads .*enc\.layers\.0\.attn\.sdpa"):
        prepare(modelfile.load(path), "tp=4")


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("layout_", [Layout(sp=2, ring=1), Layout(sp=3, ring=1), Layout(sp=4, ring=1),
                                     Layout(sp=2, ring=1, pp=2)], ids=str)
def test_ring_attention_equals_the_whole_sequence(arch, layout_):
    """Ring attention: K/V pieces passed around the ranks with send_recv, blocks combined by their
    log-sum-exps. No all-to-all; a causal model sends each block forward only (n(n−1)/2 hops of
    k and v per layer), a bidirectional one all the way round (n(n−1))."""
    m, g, _, _ = _sharded_equals_whole(arch, layout_)
    ops = [n.op for n in g.nodes]
    assert "all_to_all" not in ops and "all_reduce" not in ops
    n, L = layout_.sp, m.config["n_layers"]
    hops = n * (n - 1) // 2 if m.is_decoder else n * (n - 1)
    assert sum(1 for nd in g.nodes if nd.tags.get("ring")) == 2 * hops * L
    assert ops.count("attention_merge") == n * L


def test_ring_attention_decodes_with_the_cache_and_trains():
    """A decode step (one token: the other ranks' pieces empty) attends to the whole cache on every
    rank; and the weight gradients through the ring are the unsharded ones."""
    m = _model("llama", **CONFIGS["llama"])
    g, p = shard(m.graph, m.params, Layout(sp=3, ring=1))
    ref1 = _outputs(m)
    past = {k.replace("present.", "past."): v for k, v in ref1.items() if k.startswith("present.")}
    step = np.array([[7], [11]])
    ref2 = Executor(m.graph, m.params).run(feeds.build(m.graph, step, past=past))
    out2 = Executor(g, p).run(feeds.build(g, step, past=past))
    for k in ref2:
        np.testing.assert_allclose(out2[k], ref2[k], rtol=1e-5, atol=2e-6, err_msg=k)
    gl = models.with_loss(m.graph)
    gl.outputs = ["loss"]
    f = feeds.build(gl, IDS, targets=np.roll(IDS, -1, axis=1))
    want = Executor(gl, m.params).forward_backward(f)
    sg, sp_ = shard(gl, m.params, Layout(sp=2, ring=1))
    got = Executor(sg, sp_).forward_backward(f)
    np.testing.assert_allclose(got.outputs["loss"], want.outputs["loss"], rtol=1e-6)
    for k, gw in want.grads.items():
        total = sum(got.grads[n] for n in got.grads if n.rsplit("@", 1)[0] == k)
        np.testing.assert_allclose(total, gw, rtol=1e-4, atol=2e-6, err_msg=k)


def test_ring_needs_sp():
    with pytest.raises(MinitxError, match="ring=1 is how sequence parallelism attends"):
        Layout(ring=1)
    assert layout("sp=2,ring=1") == Layout(sp=2, ring=1)
