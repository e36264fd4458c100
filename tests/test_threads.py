"""The thread budget (minitx/threads.py): how many cores, and what each pool gets."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from minitx import threads
from minitx.errors import MinitxError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter from the worktree (numba's pool size is fixed when it
    starts, and the test run itself is limited to one thread)."""
    e = {**os.environ, **env}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=e, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or os.cpu_count() < 2, reason="needs 2 cores and affinity")
def test_budget_respects_affinity():
    got = _python("""
        import os
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        from minitx import threads
        print(threads.available_cores(), threads.budget())
    """)
    assert got == "1 1"


def test_cgroup_quota(tmp_path):
    v2 = tmp_path / "cpu.max"
    v2.write_text("150000 100000\n")
    assert threads.quota_cores(str(v2), None) == 2
    v2.write_text("max 100000\n")
    assert threads.quota_cores(str(v2), None) is None
    q, p = tmp_path / "quota", tmp_path / "period"
    q.write_text("-1\n")
    p.write_text("100000\n")
    assert threads.quota_cores(str(tmp_path / "absent"), (str(q), str(p))) is None
    q.write_text("50000\n")
    assert threads.quota_cores(None, (str(q), str(p))) == 1


def test_configure_one_sets_both_pools():
    got = _python("""
        import json, numba
        from threadpoolctl import threadpool_info
        from minitx import threads
        from minitx.backends.numba_cpu import backend
        backend()
        threads.configure(2)
        threads.configure(1)
        blas = sorted({p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"})
        print(json.dumps({"blas": blas, "numba": numba.get_num_threads(), "budget": threads.budget()}))
    """, NUMBA_NUM_THREADS="2", OPENBLAS_NUM_THREADS="2")
    assert json.loads(got) == {"blas": [1], "numba": 1, "budget": 1}


def test_negative_budget_is_a_user_error():
    with pytest.raises(MinitxError, match="--threads"):
        threads.configure(-1)


@pytest.mark.skipif(os.cpu_count() < 2, reason="needs 2 cores")
def test_numba_same_results_on_one_and_two_threads():
    """Big enough that numba's parallel attention and 2-thread BLAS run under configure(2) (the
    pools' sizes are checked inside), checked against the spec so that a wrong kernel cannot pass."""
    got = _python("""
        import json
        import numpy as np
        from threadpoolctl import threadpool_info
        from minitx import threads
        from minitx.backends.numba_cpu import backend
        from minitx.ops import attention as spec_attn, linalg as spec_lin
        import numba
        be = backend()
        rng = np.random.default_rng(0)
        B, T, H, D = 2, 256, 4, 64
        q, k, v = (rng.standard_normal((B, T, H * D), np.float32) for _ in range(3))
        x = rng.standard_normal((1024, 512), np.float32)
        w = rng.standard_normal((512, 512), np.float32) / 20
        def run():  # attention: 2^25 multiply-adds (parallel kernel); linear: 2^28 (2-thread BLAS)
            a = be.kernels["attention"](q, k, v, None, None, None, n_heads=H, n_kv_heads=H, causal=True)[0]
            return a, be.kernels["linear"](x, w, None)
        seen = []
        orig = threads._set_blas
        threads._set_blas = lambda n: (seen.append(n), orig(n))
        out = {}
        for n in (1, 2):
            threads.configure(n)
            seen.clear()
            out[n] = run()
            with threads.blas(threads.BLAS_PARALLEL_MIN):
                blas = max(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")
            out[f"{n}_pools"] = (max(seen or [1]), blas, numba.get_num_threads())
        ref = (spec_attn.attention(q, k, v, None, None, None, n_heads=H, n_kv_heads=H, causal=True)[0],
               spec_lin.linear(x, w, None))
        print(json.dumps({
            "pools1": out["1_pools"], "pools2": out["2_pools"],
            "same": [float(np.abs(a - c).max() / np.abs(c).max()) for a, c in zip(out[1], out[2])],
            "spec": [float(np.abs(a - c).max() / np.abs(c).max()) for a, c in zip(out[2], ref)],
        }))
    """, NUMBA_NUM_THREADS="2", OPENBLAS_NUM_THREADS="2")
    r = json.loads(got)
    assert r["pools1"] == [1, 1, 1] and r["pools2"] == [2, 2, 2]
    assert max(r["same"]) < 1e-5, r
    assert max(r["spec"]) < 1e-4, r
