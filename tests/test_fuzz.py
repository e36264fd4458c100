"""Fuzzing the loaders (issue #14): a seeded mutator turns a valid model file, golden file and
Hugging Face folder into hostile ones, and each case runs a real command in its own process,
under a memory limit and a timeout. The only acceptable outcomes: success (exit 0; a ``verify``
that ran and found a mismatch, exit 1), or exit 2 with exactly one ``error:`` line — never a
traceback, a hang or unbounded memory.

Cases run in children forked from one server process (``python tests/test_fuzz.py serve``) that
has imported minitx once, so a case costs milliseconds, not an interpreter start; the fork gives
each case its own address space for ``RLIMIT_AS`` and can be killed at its timeout.

The short run (default suite) takes a few seconds; ``pytest -m slow tests/test_fuzz.py`` runs 1,200
cases (the long run is skipped unless ``slow`` is selected explicitly).
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
MEMORY = 1536 * 2**20     # address space a case may add to the server's
TIMEOUT = 30.0            # seconds per case (a tiny model runs in well under one)

HOSTILE = [10**9, 2**63, -1, 0, "2", "", 2.5, None, True, [], {}, [1, 2], {"a": 1}, float("inf"),
           float("nan"), 1e308, -1e-300, "x" * 5000, "../../etc/passwd", "/etc/passwd"]


# ------------------------------------------------------------------------------------- mutator
def _deep(n: int) -> str:
    return "[" * n + "]" * n


def hostile_json(rng: random.Random) -> str:
    """A JSON text for a value: one of the hostile values, or nesting beyond any recursion limit."""
    if rng.random() < 0.1:
        return _deep(rng.choice([100, 5000, 100_000]))
    return json.dumps(rng.choice(HOSTILE))


def mutate_json(text: str, rng: random.Random) -> str:
    """Replace one value somewhere in a JSON document (or the whole document) with a hostile one."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return hostile_json(rng)
    if not isinstance(doc, (dict, list)) or not doc or rng.random() < 0.03:
        return hostile_json(rng)
    node = doc
    for _ in range(rng.randint(0, 4)):        # walk down a little way
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        inner = [k for k in keys if isinstance(node[k], (dict, list)) and node[k]]
        if not inner:
            break
        node = node[rng.choice(inner)]
    keys = list(node) if isinstance(node, dict) else list(range(len(node)))
    marker = "\u0000HOSTILE\u0000"
    if isinstance(node, dict) and rng.random() < 0.2:
        node[rng.choice(["extra", "n_layers", "arch", "__proto__"])] = marker   # a new (or known) key
    else:
        node[rng.choice(keys)] = marker
    return json.dumps(doc).replace(json.dumps(marker), hostile_json(rng), 1)


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, allow_pickle=False)
    return buf.getvalue()


def _split_npy(b: bytes) -> tuple[dict, bytes] | None:
    f = io.BytesIO(b)
    try:
        np.lib.format.read_magic(f)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    except Exception:
        return None
    return {"shape": shape, "fortran_order": fortran, "descr": np.lib.format.dtype_to_descr(dtype)}, b[f.tell():]


def _with_header(header: dict, data: bytes) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + data


def mutate_npz(src: str, dst: str, rng: random.Random) -> str:
    """One to three mutations of an npz's members, then (sometimes) of the archive bytes."""
    with zipfile.ZipFile(src) as z:
        ms = {i.filename: z.read(i) for i in z.infolist()}
    done = []
    for _ in range(rng.randint(1, 3)):
        texts = [k for k in sorted(ms) if k.startswith("__") and k != "__format_version__.npy"]
        texts += ["__graph__.npy"] * 3 if "__graph__.npy" in ms else []
        name = rng.choice(texts if texts and rng.random() < 0.4 else sorted(ms))
        parts = _split_npy(ms[name])
        kind = "json" if name.startswith("__") and rng.random() < 0.6 else rng.choice(["json", "shape", "dtype", "flip", "truncate", "drop", "add", "values"])
        if kind == "json" and parts and parts[0]["descr"] == "|u1":
            try:
                text = parts[1].decode("utf-8")
            except UnicodeDecodeError:
                text = ""
            ms[name] = npy(np.frombuffer(mutate_json(text, rng).encode(), np.uint8))
        elif kind == "shape" and parts:
            h = dict(parts[0])
            shape = list(h["shape"]) or [1]
            shape[rng.randrange(len(shape))] = rng.choice([0, 1, 3, 2**20, 2**40, 2**62])
            if rng.random() < 0.3:
                shape.append(rng.choice([1, 2, 2**31]))
            h["shape"] = tuple(shape)
            ms[name] = _with_header(h, parts[1])
        elif kind == "dtype" and parts:
            h = dict(parts[0])
            h["descr"] = rng.choice(["<f8", "<f2", "<i8", "|u1", "<c8", "|O", "<U5", "|b1", ">f4", "|V8"])
            ms[name] = _with_header(h, parts[1])
        elif kind == "flip":
            b = bytearray(ms[name])
            for _ in range(rng.randint(1, 8)):
                if b:
                    b[rng.randrange(len(b))] = rng.randrange(256)
            ms[name] = bytes(b)
        elif kind == "truncate":
            ms[name] = ms[name][: rng.randrange(max(len(ms[name]), 1))]
        elif kind == "drop":
            del ms[name]
        elif kind == "add":
            ms[rng.choice(["extra.npy", "__graph__.npy", "__tokenizer__.npy", "notes.txt", name[:-4]])] = (
                npy(np.frombuffer(hostile_json(rng).encode(), np.uint8)) if rng.random() < 0.5
                else npy(np.zeros(rng.choice([1, 7, 64]), rng.choice([np.float32, np.int64]))))
        elif kind == "values" and parts and parts[0]["descr"] in ("<f4", "<f8"):
            a = np.frombuffer(parts[1], dtype=parts[0]["descr"]).copy()
            a[:] = rng.choice([3e38, -3e38, np.nan, np.inf, 0.0, 1e-45])
            ms[name] = _with_header(parts[0], a.tobytes())
        done.append(f"{kind}:{name}")
    with zipfile.ZipFile(dst, "w", rng.choice([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])) as z:
        for k, v in ms.items():
            z.writestr(k, v)
    if rng.random() < 0.15:
        b = bytearray(open(dst, "rb").read())
        if rng.random() < 0.5:
            b = b[: rng.randrange(len(b))]
            done.append("truncate-archive")
        else:
            for _ in range(rng.randint(1, 16)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            done.append("flip-archive")
        open(dst, "wb").write(bytes(b))
    return ", ".join(done)


def mutate_hf(src: str, dst: str, rng: random.Random) -> str:
    """A copy of an HF folder with one or two of its files made hostile."""
    shutil.copytree(src, dst)
    done = []
    for _ in range(rng.randint(1, 2)):
        kind = rng.choice(["config", "config", "config", "index", "modules", "tokenizer", "st-header", "st-truncate"])
        if kind == "config":
            p = os.path.join(dst, "config.json")
            open(p, "w").write(mutate_json(open(p).read(), rng))
        elif kind == "index" and os.path.exists(os.path.join(dst, "model.safetensors")):
            os.rename(os.path.join(dst, "model.safetensors"), os.path.join(dst, "w.safetensors"))
            wm = rng.choice([{"x": "w.safetensors"}, {"x": "../w.safetensors"}, {"x": "/etc/passwd"}, ["w.safetensors"],
                             {"x": 5}, {"x": "missing.safetensors"}])
            open(os.path.join(dst, "model.safetensors.index.json"), "w").write(
                mutate_json(json.dumps({"weight_map": wm}), rng) if rng.random() < 0.5 else json.dumps({"weight_map": wm}))
        elif kind == "modules":
            mods = [{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
                    {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
            os.makedirs(os.path.join(dst, "1_Pooling"), exist_ok=True)
            open(os.path.join(dst, "1_Pooling", "config.json"), "w").write(
                mutate_json(json.dumps({"pooling_mode_mean_tokens": True}), rng))
            open(os.path.join(dst, "modules.json"), "w").write(mutate_json(json.dumps(mods), rng))
            open(os.path.join(dst, "sentence_bert_config.json"), "w").write(
                mutate_json(json.dumps({"max_seq_length": 12, "do_lower_case": False}), rng))
        elif kind == "tokenizer" and not os.path.exists(os.path.join(dst, "tokenizer.json")):
            p = os.path.join(dst, "tokenizer.json")
            if rng.random() < 0.3:
                os.makedirs(p, exist_ok=True)
            else:
                open(p, "w").write(mutate_json(json.dumps({"model": {"type": "BPE"}, "normalizer": None}), rng))
        elif kind in ("st-header", "st-truncate"):
            p = next((os.path.join(dst, n) for n in os.listdir(dst) if n.endswith(".safetensors")), None)
            if p is None:
                continue
            b = bytearray(open(p, "rb").read())
            if kind == "st-truncate":
                b = b[: rng.randrange(len(b))]
            else:
                n = int.from_bytes(b[:8], "little")
                for _ in range(rng.randint(1, 6)):
                    b[rng.randrange(min(8 + n, len(b)))] = rng.choice(b'{}[]":,0123456789-e.x ')
            open(p, "wb").write(bytes(b))
        done.append(kind)
    return ", ".join(done)


# --------------------------------------------------------------------------------- case server
def serve(cases_path: str, results_path: str) -> None:
    """Run each case (cwd, args) in a forked child under RLIMIT_AS and a timeout."""
    import resource
    import signal
    import time
    import traceback

    sys.path.insert(0, ROOT)
    from minitx.cli import main

    cases = json.load(open(cases_path))
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    results = []
    for case in cases:
        out, err = os.path.join(case["cwd"], "stdout"), os.path.join(case["cwd"], "stderr")
        pid = os.fork()
        if pid == 0:   # the child: limits, redirected output, the command, and nothing else
            code = 98
            try:
                resource.setrlimit(resource.RLIMIT_AS, (vm + MEMORY, vm + MEMORY))
                os.chdir(case["cwd"])
                for fd, path in ((1, out), (2, err)):
                    h = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(h, fd)
                    os.close(h)
                try:
                    main.main(args=case["args"], prog_name="minitx", standalone_mode=True)
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                except BaseException:
                    traceback.print_exc()
                    code = 99
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        t0 = time.monotonic()
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rc = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() - t0 > TIMEOUT:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                rc = "timeout"
                break
            time.sleep(0.002)
        results.append({**case, "rc": rc, "stderr": open(err, errors="replace").read()[:20000],
                        "seconds": round(time.monotonic() - t0, 3)})
    json.dump(results, open(results_path, "w"))


# ------------------------------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, str]:
    """Valid inputs to mutate: a GPT-2 model with a tokenizer, a golden file of it, a rewritten
    model (HF folders come from tests/fixtures)."""
    from minitx import data, modelfile, models
    from minitx import golden as gd
    from minitx.model import Model

    d = tmp_path_factory.mktemp("seeds")
    tok = data.train_tokenizer("hello world, the quick brown fox jumps over the lazy dog. " * 20, 300)
    m = Model.from_config(models.preset("gpt2", "tiny"), seed=0, tokenizer_json=tok)
    modelfile.save(m, d / "m.npz")
    g = gd.record(m, gd.make_feeds(m, [[1, 2, 3], [4, 5]]))
    gd.save(g, d / "g.npz")
    # a rewritten LLaMA carries its own __graph__ (quantized ops, int8 KV cache): hostile graphs too
    from minitx.plugin import optimize

    q = optimize(Model.from_config(models.preset("llama", "tiny"), seed=0), ["quant:int8,kv=int8"], validate=False)
    modelfile.save(q, d / "q.npz")
    return {"model": str(d / "m.npz"), "golden": str(d / "g.npz"), "rewritten": str(d / "q.npz")}


def make_cases(seeds: dict[str, str], root, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    cases = []
    for k in range(n):
        cwd = root / f"case{k}"
        cwd.mkdir()
        target = ["model", "golden", "hf"][k % 3]
        if target == "model":
            what = mutate_npz(seeds["model" if k % 2 else "rewritten"], str(cwd / "m.npz"), rng)
            args = rng.choice([["infer", "m.npz", "--prompt", "hello", "-n", "2", "--json"],
                               ["infer", "m.npz", "--ids", "1,2", "-n", "2", "--json"],
                               ["show", "m.npz", "--json"]])
        elif target == "golden":
            what = mutate_npz(seeds["golden"], str(cwd / "g.npz"), rng)
            args = ["verify", seeds["model"], "g.npz", "--json"]
        else:
            name = ["hf-gpt2-tiny", "hf-llama-tiny", "hf-bert-tiny"][(k // 3) % 3]
            what = mutate_hf(os.path.join(FIX, name), str(cwd / "hf"), rng)
            args = ["convert", "hf", "-o", "out.npz"]
        cases.append({"cwd": str(cwd), "args": args, "mutation": what})
    return cases


def run_cases(cases: list[dict], tmp_path) -> list[dict]:
    cp, rp = tmp_path / "cases.json", tmp_path / "results.json"
    json.dump(cases, open(cp, "w"))
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, __file__, "serve", str(cp), str(rp)], cwd=ROOT, env=env, check=True,
                   timeout=TIMEOUT * len(cases) + 120)
    return json.load(open(rp))


def check(results: list[dict]) -> None:
    bad = []
    for r in results:
        lines = [x for x in r["stderr"].splitlines() if x.strip()]
        ok_codes = (0, 1) if r["args"][0] == "verify" else (0,)
        if r["rc"] in ok_codes:
            continue
        if r["rc"] == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r["stderr"]:
            continue
        bad.append(f"{r['args']} after [{r['mutation']}] in {r['cwd']}: rc={r['rc']}, stderr:\n{r['stderr'][-1500:]}")
    assert not bad, f"{len(bad)} of {len(results)} cases misbehaved:\n\n" + "\n\n".join(bad[:5])


def test_fuzz_short(seeds, tmp_path):
    results = run_cases(make_cases(seeds, tmp_path, 36, seed=14), tmp_path)
    check(results)
    assert {r["rc"] for r in results} & {2}, "the mutator produced no hostile input at all"


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_fuzz_long(seeds, tmp_path, seed):
    check(run_cases(make_cases(seeds, tmp_path, 300, seed=1000 + seed), tmp_path))


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    serve(sys.argv[2], sys.argv[3])
