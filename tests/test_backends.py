"""The backend registry, the numba backend end to end, and its growable KV cache."""
from __future__ import annotations

import os

import importlib.util
import json

import numpy as np
import pytest
from click.testing import CliRunner

from minitx import backend as reg
from minitx.backend import Backend, describe, get_backend, register
from minitx.errors import MinitxError
from minitx.model import Model
from minitx import generate as gen, models

# Only the tests that run numba kernels need numba; the registry tests run without it.
needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba not installed")


def _boom() -> Backend:
    raise ImportError("libwhatever.so: missing (test)")


class _Wrong(Backend):
    """A backend with a subtly wrong GELU: conformance must catch it."""

    name = "wrong"
    dtypes = frozenset({"float32"})

    def __init__(self) -> None:
        super().__init__()
        self.kernels = {"gelu": lambda x, *, approximate="none": x * 0.5 * (1 + np.tanh(0.8 * x)),
                        "relu": lambda x: np.maximum(x, 0)}


@pytest.fixture
def extra_backends():
    saved = dict(reg.entries())
    register("failing", _boom)
    register("wrong", _Wrong)
    yield
    reg.entries().clear()
    reg.entries().update(saved)


def test_failing_backend_is_listed_not_fatal(extra_backends) -> None:
    info = describe("failing")
    assert not info["available"] and "libwhatever.so" in info["reason"] and info["remedy"]
    with pytest.raises(MinitxError, match="unavailable.*libwhatever"):
        get_backend("failing")
    assert get_backend("numpy").name == "numpy"
    r = CliRunner().invoke(__import__("cli").main, ["backends", "--json"])
    assert r.exit_code == 0
    infos = {b["name"]: b for b in json.loads(r.output)["backends"]}
    assert not infos["failing"]["available"] and infos["numpy"]["available"]


@needs_numba
def test_numba_is_listed_with_its_kernels() -> None:
    infos = {b["name"]: b for b in json.loads(CliRunner().invoke(__import__("cli").main,
                                                                 ["backends", "--json"]).output)["backends"]}
    assert infos["numba"]["available"]
    assert "attention" in infos["numba"]["forward"] and "layer_norm" in infos["numba"]["vjp"]


class _EntryPoint:
    """What importlib.metadata yields for one declared entry point (name, target, distribution)."""

    def __init__(self, name: str, value: str, dist: str) -> None:
        self.name, self.value = name, value
        self.dist = type("Dist", (), {"name": dist})()


def test_a_third_party_backend_named_numba_is_an_error_naming_both_packages(monkeypatch) -> None:
    from minitx import registry

    declared = [_EntryPoint("numba", "minitx.backends.numba_cpu:backend", "minitx"),
                _EntryPoint("numba", "evil_backend:backend", "evil-backend"),
                _EntryPoint("good", "good_backend:backend", "good-backend")]
    monkeypatch.setattr(registry.metadata, "entry_points", lambda group: declared if group == reg.GROUP else [])
    monkeypatch.setattr(reg.REGISTRY, "_entries", None)
    with pytest.raises(MinitxError, match=r"'numba' is declared by two packages: minitx .*and evil-backend"):
        get_backend("numba")
    info = describe("numba")
    assert not info["available"] and "evil-backend" in info["reason"] and "uninstall" in info["remedy"]
    assert get_backend("numpy").name == "numpy"   # everything else keeps working


def test_registering_a_taken_name_is_an_error_not_a_replacement() -> None:
    with pytest.raises(MinitxError, match="backend 'numpy' is already registered by minitx"):
        register("numpy", _Wrong)
    assert type(get_backend("numpy")).__name__ == "SpecBackend"
    from minitx import plugin

    with pytest.raises(MinitxError, match="plugin 'quant' is already registered"):
        plugin.register("quant", lambda: None)


class _NoLibrary(ImportError):
    pass


def remedy(error: BaseException) -> str | None:
    """This module's answer to the registry (the way a backend package gives its remedy)."""
    return "build libwhatever first (test remedy)" if isinstance(error, _NoLibrary) else None


def _needs_a_library() -> Backend:
    raise _NoLibrary("libwhatever.so: missing")


def _out_of_memory() -> Backend:
    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_remedies_come_from_the_backend_not_from_its_error_text(extra_backends) -> None:
    register("needs_lib", _needs_a_library)
    register("oom", _out_of_memory)
    assert describe("needs_lib")["remedy"] == "build libwhatever first (test remedy)"
    with pytest.raises(MinitxError, match=r"unavailable: _NoLibrary: libwhatever.so: missing — build libwhatever"):
        get_backend("needs_lib")
    info = describe("oom")   # no remedy of its own: no guess from the words "CUDA" or "GPU"
    assert "GPU" not in info["remedy"] and "reinstall or fix" in info["remedy"]
    with pytest.raises(MinitxError) as e:
        get_backend("oom")
    assert str(e.value).endswith("Tried to allocate 2.00 GiB")


def test_shipped_backends_give_their_own_remedies() -> None:
    import minitx.backends.cupy_gpu as cg
    import minitx.backends.numba_cpu as nb

    assert "minitx[cpu]" in nb.remedy(ModuleNotFoundError("No module named 'numba'", name="numba"))
    assert nb.remedy(RuntimeError("CUDA out of memory")) is None
    assert "minitx[gpu]" in cg.remedy(cg.NoCupy("cupy not installed"))
    assert "no usable NVIDIA GPU" in cg.remedy(cg.NoDevice("no CUDA device: 0 GPUs"))
    assert cg.remedy(RuntimeError("CUDA out of memory")) is None


class _Raising(Backend):
    """A backend whose GELU fails the way a compiled kernel does: a long, multi-line error."""

    name = "raising"
    dtypes = frozenset({"float32"})

    def __init__(self) -> None:
        super().__init__()

        def gelu(x, *, approximate="none"):
            raise RuntimeError("Failed in nopython mode pipeline\nline two\nline three")

        self.kernels = {"gelu": gelu}


def test_a_kernel_that_raises_is_one_line_naming_node_op_and_backend(extra_backends, tmp_path) -> None:
    import cli

    register("raising", _Raising)
    path = str(tmp_path / "m.npz")
    runner = CliRunner()
    assert runner.invoke(cli.main, ["init", "--arch", "gpt2", "--preset", "tiny", "-o", path]).exit_code == 0
    r = runner.invoke(cli.main, ["infer", path, "--ids", "1,2,3", "-n", "1", "--backend", "raising"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    line = r.output.strip().splitlines()[-1]   # the prompt echoed so far, then the error
    assert "line two" not in r.output
    assert "error: node layers.0.mlp.act: the kernel of op gelu on backend raising raised RuntimeError: " \
           "Failed in nopython mode pipeline" in line


def test_unknown_or_unavailable_backend_is_one_line_exit_2(extra_backends, tmp_path) -> None:
    import cli

    r = CliRunner().invoke(cli.main, ["conformance", "--backend", "failing"])
    assert r.exit_code == 2 and "libwhatever" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli.main, ["conformance", "--backend", "nosuch"])
    assert r.exit_code == 2 and "unknown backend 'nosuch'" in r.output


def test_conformance_catches_a_wrong_kernel(extra_backends) -> None:
    from minitx.conformance import run_conformance

    report = run_conformance("wrong")
    bad = {r.op for r in report.failures}
    assert bad == {"gelu"} and not report.ok
    import cli

    r = CliRunner().invoke(cli.main, ["conformance", "--backend", "wrong", "--json"])
    assert r.exit_code == 1 and json.loads(r.output)["counts"]["FAIL"] > 0
    r = CliRunner().invoke(cli.main, ["conformance", "--backend", "wrong", "--exclude", "gelu"])
    assert r.exit_code == 0 and "PASS" in r.output


@needs_numba
def test_ops_without_cases_are_skipped_not_passed(monkeypatch) -> None:
    from minitx import conformance

    monkeypatch.delitem(conformance.CASES, "relu")
    report = conformance.run_conformance("numba", include=["relu"])
    assert [r.status for r in report.rows] == ["SKIPPED"]


@needs_numba
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_numba_decodes_like_the_spec(arch: str) -> None:
    cfg = models.preset(arch, "tiny")
    m = Model.from_config(cfg, seed=1)
    prompts = [[5, 6, 7, 8, 9], [3, 4]]  # left padding in row 2
    st_ref, st_nb = gen.empty_state(m, 2), gen.empty_state(m, 2)
    ids, mask = gen.left_pad(prompts)
    for k in range(4):
        a, st_ref = gen.step(m, ids, st_ref, mask, ("numpy",))
        b, st_nb = gen.step(m, ids, st_nb, mask, ("numba",), strict=True)
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-5)
        for key in st_ref.past:
            np.testing.assert_allclose(st_nb.past[key], st_ref.past[key], rtol=2e-4, atol=2e-5)
        ids, mask = a[:, -1:].argmax(-1), np.ones((2, 1), np.int64)
    ex = m.executor(("numba",), True)
    assert {b for _, _, b in ex.explain()} == {"numba"}


@needs_numba
def test_a_broken_kernel_module_does_not_take_the_backend_down(monkeypatch) -> None:
    import minitx.backends.numba_cpu as nb

    monkeypatch.setattr(nb, "_submodules", lambda: ["norms", "does_not_exist"])
    b = nb.backend()
    assert "layer_norm" in b.kernels and "does_not_exist" in b.problems


@needs_numba
def test_kv_cache_appends_in_place_and_never_clobbers_a_branch() -> None:
    from minitx.backends.numba_cpu.kvcache import append

    r = np.random.default_rng(0)
    k0 = r.standard_normal((2, 3, 4)).astype(np.float32)
    K1 = append(None, k0)
    k1 = r.standard_normal((2, 1, 4)).astype(np.float32)
    K2 = append(K1, k1)
    assert np.shares_memory(K1, K2)  # grew in place
    np.testing.assert_array_equal(K2, np.concatenate([k0, k1], axis=1))
    # Branch: a second continuation of K1 must not overwrite K2's last row.
    k1b = r.standard_normal((2, 1, 4)).astype(np.float32)
    K2b = append(K1, k1b)
    np.testing.assert_array_equal(K2, np.concatenate([k0, k1], axis=1))
    np.testing.assert_array_equal(K2b, np.concatenate([k0, k1b], axis=1))
    # A plain array that is not ours is copied, never written into.
    past = r.standard_normal((2, 5, 4)).astype(np.float32)
    keep = past.copy()
    out = append(past[:, :3], k1)
    np.testing.assert_array_equal(past, keep)
    np.testing.assert_array_equal(out, np.concatenate([keep[:, :3], k1], axis=1))
    # Growing far beyond the first capacity stays equal to concatenation.
    K, ref = K2, np.concatenate([k0, k1], axis=1)
    for _ in range(200):
        n = r.standard_normal((2, 1, 4)).astype(np.float32)
        K, ref = append(K, n), np.concatenate([ref, n], axis=1)
    np.testing.assert_array_equal(K, ref)


@needs_numba
def test_cli_infer_explain_and_no_fallback_with_numba(tmp_path) -> None:
    import cli

    path = str(tmp_path / "m.npz")
    runner = CliRunner()
    assert runner.invoke(cli.main, ["init", "--arch", "gpt2", "--preset", "tiny", "-o", path]).exit_code == 0
    base = ["infer", path, "--ids", "1,2,3", "--ids", "4,5", "-n", "4", "--json"]
    ref = runner.invoke(cli.main, base)
    got = runner.invoke(cli.main, base + ["--backend", "numba", "--no-fallback", "--explain"])
    assert got.exit_code == 0, got.output
    assert json.loads(got.output.splitlines()[-1]) == json.loads(ref.output)
    assert "numba" in got.output and "ran on: numba" in got.output


@needs_numba
def test_numba_cache_is_dropped_when_any_kernel_source_changes(tmp_path, monkeypatch) -> None:
    """numba re-validates a cached kernel against its own file only; a helper it inlines (``_vmath``)
    can change underneath it. The package digest beside the cache must catch that — and leave a
    current cache alone."""
    from types import SimpleNamespace

    from minitx.backends.numba_cpu import _jit

    def cached(folder):
        (folder / "quant._rows_dot-112.py311.nbi").write_bytes(b"index")
        (folder / "quant._rows_dot-112.py311.1.nbc").write_bytes(b"code")
        (folder / "keep.txt").write_text("not numba's")
        return SimpleNamespace(_cache=SimpleNamespace(_cache_path=str(folder)))

    monkeypatch.setattr(_jit, "_checked", set())
    monkeypatch.setattr(_jit, "sources_digest", lambda: "digest-1")
    _jit._drop_stale_cache(cached(tmp_path))  # no stamp yet: whatever is there is of unknown age
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", _jit.STAMP]
    assert (tmp_path / _jit.STAMP).read_text().strip() == "digest-1"

    monkeypatch.setattr(_jit, "_checked", set())
    _jit._drop_stale_cache(cached(tmp_path))  # same sources: the cache stays
    assert len(list(tmp_path.glob("*.nb*"))) == 2

    monkeypatch.setattr(_jit, "_checked", set())
    monkeypatch.setattr(_jit, "sources_digest", lambda: "digest-2")  # a helper was edited
    _jit._drop_stale_cache(cached(tmp_path))
    assert not list(tmp_path.glob("*.nb*"))
    assert (tmp_path / _jit.STAMP).read_text().strip() == "digest-2"


@needs_numba
def test_parallel_and_serial_builds_of_a_kernel_keep_their_own_cache_entries(tmp_path) -> None:
    """numba's cache keys a kernel by name, bytecode and signature, not by its flags: the serial
    and the parallel build of one function must not load each other's code. Each process
    compiles or loads both, serial first (as decode runs before prefill), and reports how many
    threads each build's iterations ran on."""
    import subprocess
    import sys

    (tmp_path / "thread_ids.py").write_text(
        "import numba\nfrom numba import prange\nfrom minitx.backends.numba_cpu._jit import kernel\n"
        "def _ids(out):\n    for i in prange(out.shape[0]):\n        out[i] = numba.get_thread_id()\n"
        "PAR, SER = kernel(_ids)\n")
    # the pool started first: numba.get_thread_id in a serial build loaded from the cache needs it
    probe = ("import numba, numpy as np\nnumba.np.ufunc.parallel._launch_threads()\nimport thread_ids as t\n"
             "def n(f):\n    out = np.zeros(256, np.int64)\n    f(out)\n    return len(set(out.tolist()))\n"
             "print(n(t.SER), n(t.PAR))\n")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "NUMBA_NUM_THREADS": "2",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))])}
    for run in ("compiles", "loads from the cache"):
        r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["1", "2"], f"{run}: threads used by serial, parallel = {r.stdout}"


@needs_numba
def test_no_two_numba_builds_share_a_cache_name() -> None:
    """The same rule over the whole backend: two compiled builds (dispatchers) of one function
    under one name would share a cache entry — kernel() renames its serial build; a module that
    jitted one function twice itself (as the int8 quantizers did) is caught here."""
    import importlib
    import pkgutil

    import numba.core.registry

    import minitx.backends.numba_cpu as pkg

    seen: dict[tuple[str, str], object] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        found = [v for v in vars(mod).values() if isinstance(v, numba.core.registry.CPUDispatcher)]
        found += [d for v in vars(mod).values() if isinstance(v, tuple)
                  for d in v if isinstance(d, numba.core.registry.CPUDispatcher)]
        for d in found:
            key = (d.py_func.__module__, d.py_func.__qualname__)
            other = seen.setdefault(key, d)
            assert other is d or other.targetoptions == d.targetoptions, f"{key}: two builds, one cache name"


@needs_numba
def test_numba_sources_digest_covers_the_inlined_helpers(tmp_path, monkeypatch) -> None:
    import os
    import shutil

    from minitx.backends.numba_cpu import _jit
    from minitx.backends.numba_cpu import quant

    assert quant._ROWS_DOT[0]._cache._cache_path  # the attribute the check relies on still exists
    here = os.path.dirname(os.path.abspath(_jit.__file__))
    for name in os.listdir(here):
        if name.endswith(".py"):
            shutil.copy(os.path.join(here, name), tmp_path / name)
    monkeypatch.setattr(_jit, "__file__", str(tmp_path / "_jit.py"))
    before = _jit.sources_digest()
    assert before == _jit.sources_digest()
    with open(tmp_path / "_vmath.py", "a") as f:
        f.write("# a helper edited\n")
    assert _jit.sources_digest() != before


def _gelu_in_fresh_process(root, env) -> float:
    import subprocess
    import sys

    script = ("import numpy as np, nbcopy.activations as a; x = np.linspace(-3, 3, 64, dtype=np.float32); "
              "print(float(a.KERNELS['gelu'](x, approximate='tanh').sum()))")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]
    return float(r.stdout)


@needs_numba
def test_an_edited_helper_reaches_kernels_cached_on_disk(tmp_path) -> None:
    """End to end, in fresh processes as a user would meet it: GELU's kernel is cached on disk,
    then ``_vmath.exp``, which it inlines, is edited. The next process must run the edited code;
    numba alone would load the cached machine code of the old one."""
    import os
    import shutil

    from minitx.backends.numba_cpu import _jit

    pkg = tmp_path / "nbcopy"  # a private copy of the backend package, cache and all
    shutil.copytree(os.path.dirname(os.path.abspath(_jit.__file__)), pkg,
                    ignore=shutil.ignore_patterns("__pycache__"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), root])
    before = _gelu_in_fresh_process(root, env)
    assert list((pkg / "__pycache__").glob("activations.*.nbi")), "the kernel was not cached on disk"
    assert _gelu_in_fresh_process(root, env) == before
    vmath = pkg / "_vmath.py"
    text = vmath.read_text()
    assert "return p * _f32_from_bits" in text
    vmath.write_text(text.replace("return p * _f32_from_bits", "return f(2.0) * p * _f32_from_bits"))  # eˣ → 2eˣ
    assert _gelu_in_fresh_process(root, env) != before
