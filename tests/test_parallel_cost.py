"""The cost model of a split (minitx/distributed/cost.py): its bytes come from the rewritten graph,
a long model is extrapolated exactly from one and two layers per stage, α and β are recovered
from times, the roofline and the pipeline/data-parallel step follow their formulas, and
``show --parallel`` prints the bytes per token and per step from the same summary."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from minitx import models
from minitx.distributed import cost as C
from minitx.ir import Graph, Node, Value

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV = C.Device("test", flops=1e10, bandwidth=1e9, node_overhead=1e-6)
INTRA, INTER = C.Link("intra", 2e-6, 100e9), C.Link("inter", 8e-6, 10e9)
CL = C.Cluster(DEV, INTRA, INTER, per_node=4)
GPT = {"arch": "gpt2", "vocab_size": 301, "n_ctx": 64, "d_model": 32, "n_layers": 7, "n_heads": 4, "d_ff": 64}
LLAMA = {"arch": "llama", "vocab_size": 257, "n_ctx": 64, "d_model": 32, "n_layers": 5, "n_heads": 4,
         "n_kv_heads": 2, "d_ff": 48}
FIELDS = ("compute_s", "comm_s", "bytes_sent", "param_bytes", "collectives")


@pytest.mark.parametrize("cfg,tp,pp,sp,seq,past", [(GPT, 2, 3, 1, 9, 0), (GPT, 4, 2, 1, 1, 5), (LLAMA, 2, 2, 1, 7, 0),
                                                  (LLAMA, 1, 3, 2, 5, 3), (GPT, 1, 1, 1, 4, 0), (GPT, 1, 7, 1, 3, 0)])
def test_extrapolating_layers_equals_rewriting_the_whole_model(cfg, tp, pp, sp, seq, past):
    """7 layers on 3 stages are 3 + 2 + 2: the line through one and two layers per stage gives
    every rank exactly what the rewrite of all 7 layers gives."""
    got = C.layout_cost(cfg, tp, pp, sp, batch=2, seq=seq, past=past, cluster=CL)
    full = C._rank_costs(models.complete_config(cfg), int(cfg["n_layers"]), tp, pp, sp,
                         {"B": 2, "T": seq, "S": past}, CL)
    assert set(got) == set(full) == set(range(tp * pp * sp))
    for r in got:
        for f in FIELDS:
            assert getattr(got[r], f) == pytest.approx(getattr(full[r], f), rel=1e-9, abs=1e-15), (r, f)


def test_tensor_parallel_bytes_are_the_megatron_count():
    """tp=2 on 7 GPT-2 layers, one decode token: 2 all-reduces per layer + the embedding's, of d
    floats, each sending 2(n−1)/n of them; plus the logits' all-gather of the padded half vocabulary."""
    got = C.layout_cost(GPT, 2, batch=1, seq=1, past=3, cluster=CL)
    d, L, V = 32, 7, 301
    want = (2 * L + 1) * 4 * d + 4 * ((V + 1) // 2)
    for r in (0, 1):
        assert got[r].bytes_sent == want
        assert got[r].collectives == 2 * L + 2


def test_links_follow_the_nodes():
    assert CL.link([0, 1, 2, 3]) is INTRA and CL.link([2, 5]) is INTER and CL.link([7]) is INTRA
    # tp=2 inside a node; pp's send from rank 1 to 3 stays inside a node of 4 ranks
    c = C.layout_cost(GPT, 2, 2, batch=1, seq=1, cluster=CL)
    wide = C.layout_cost(GPT, 2, 2, batch=1, seq=1, cluster=C.Cluster(DEV, INTRA, INTER, per_node=2))
    assert wide[0].comm_s > c[0].comm_s              # the stage boundary now crosses nodes


def test_fit_link_recovers_alpha_and_beta():
    sizes = [2 ** k for k in range(3, 27, 2)]
    t = [C.seconds("all_reduce", b, 2, 3e-6, 5e9) for b in sizes]
    t[1] *= 40                                        # one small message descheduled
    link = C.fit_link(sizes, t)
    assert link.alpha == pytest.approx(3e-6, rel=1e-3)
    assert link.beta == pytest.approx(5e9, rel=1e-3)


def test_compute_is_a_roofline_per_node():
    """One (M, K) @ (K, N) linear: 2·M·K·N FLOPs against the bytes of x, W, b and y."""
    M, K, N = 64, 128, 256
    g = Graph([Value("x", (M, K), "float32")], ["y"],
              {"w": Value("w", (K, N), "float32"), "b": Value("b", (N,), "float32")},
              [Node("lin", "linear", ["x", "w", "b"], ["y"])])
    flops, nbytes = 2 * M * K * N, 4 * (M * K + K * N + N + M * N)
    for dev in (C.Device("fast memory", 1e9, 1e12), C.Device("fast math", 1e15, 1e6, node_overhead=2e-3)):
        got = C.compute_seconds(g, {}, dev)[0]
        assert got == pytest.approx(max(flops / dev.flops, nbytes / dev.bandwidth) + dev.node_overhead)


def test_training_step_bubble_and_data_parallel_all_reduce():
    one = C.step_time(GPT, cluster=CL, pp=3, batch=8, seq=8, microbatches=4, train=True)
    assert one["bubble"] == pytest.approx(2 / 6)                        # (p − 1) / (m + p − 1)
    ranks = C.layout_cost(GPT, 1, 3, batch=2, seq=8, cluster=CL)
    stage = max(3 * c.compute_s + 2 * c.comm_s for c in ranks.values())
    assert one["pipeline_s"] == pytest.approx(6 * stage)
    assert one["grad_allreduce_s"] == 0 and one["tokens_per_s"] == pytest.approx(64 / one["seconds"])
    # dp=2 over 3-rank replicas on nodes of 4: the group of ranks 1 and 4 crosses nodes → the inter link
    dp = C.step_time(GPT, cluster=CL, pp=3, dp=2, batch=8, seq=8, microbatches=2, train=True)
    grads = max(c.param_bytes for c in C.layout_cost(GPT, 1, 3, batch=2, seq=8, cluster=CL).values())
    assert dp["grad_allreduce_s"] == pytest.approx(C.seconds("all_reduce", grads, 2, INTER.alpha, INTER.beta))
    with pytest.raises(Exception, match="does not split"):
        C.step_time(GPT, cluster=CL, dp=3, batch=8, seq=8, train=True)


def test_show_parallel_prints_bytes_per_token_and_per_step(tmp_path):
    from minitx import modelfile
    from minitx.model import Model

    path = str(tmp_path / "gpt.npz")
    modelfile.save(Model.from_config(GPT, seed=1), path)
    env = {**os.environ, "PYTHONPATH": ROOT, "OPENBLAS_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.join(ROOT, "cli.py"), "show", path, "--parallel", "tp=2", "--seq", "6"]
    js = json.loads(subprocess.run([*cmd, "--json"], capture_output=True, text=True, env=env, check=True).stdout)
    text = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    want = C.layout_cost(GPT, 2, batch=1, seq=6, cluster=CL)[0].bytes_sent     # from the same rewrite
    pf = js["steps"]["prefill"]
    assert pf["bytes_sent_per_step"]["0"] == want and pf["bytes_sent_per_token"]["0"] == want / 6
    assert "prefill B/step" in text and f"{want:,.0f}" in text and f"{want / 6:,.0f}" in text
