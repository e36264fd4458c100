"""A third-party backend, for real: installed with pip into a fresh venv, found by entry point.

tests/thirdparty/good_backend implements relu, softmax and add; tests/thirdparty/broken_backend
raises on import; tests/thirdparty/clash_backend declares the name ``numba``, which minitx ships.
With all three installed, ``minitx backends`` must list good as available, broken as unavailable
with its reason, and numba as unavailable naming both packages that declare it, while everything
else keeps working.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent / "thirdparty"

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return p


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("thirdparty")
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp / "venv")], tmp)
    bindir = tmp / "venv" / ("Scripts" if os.name == "nt" else "bin")
    py = str(bindir / "python")
    # Offline and fast when the build backends are already importable; otherwise pip fetches them.
    iso = [] if importlib.util.find_spec("hatchling") is None else ["--no-build-isolation"]
    _run([py, "-m", "pip", "install", "-q", "--no-deps", *iso, str(ROOT)], tmp)
    for pkg in ("good_backend", "broken_backend", "clash_backend"):
        shutil.copytree(HERE / pkg, tmp / pkg)  # build out of tree: no egg-info in the checkout
        _run([py, "-m", "pip", "install", "-q", "--no-deps", *iso, str(tmp / pkg)], tmp)
    return bindir


def test_listing_isolates_the_broken_backend(venv: Path, tmp_path: Path) -> None:
    p = _run([str(venv / "minitx"), "backends", "--json"], tmp_path)
    infos = {b["name"]: b for b in json.loads(p.stdout)["backends"]}
    assert infos["good"]["available"] and infos["good"]["forward"] == ["add", "relu", "softmax"]
    assert infos["good"]["vjp"] == ["relu"] and infos["good"]["distribution"] == "minitx-good-backend"
    assert not infos["broken"]["available"]
    assert "libfancy.so.3" in infos["broken"]["reason"]
    assert infos["numpy"]["available"]
    clash = infos["numba"]
    assert not clash["available"] and "declared by two packages" in clash["reason"]
    assert "minitx (" in clash["reason"] and "minitx-clash-backend (" in clash["reason"]
    text = _run([str(venv / "minitx"), "backends"], tmp_path).stdout
    assert "UNAVAILABLE" in text and "good" in text
    # The installed copy is what ran, not the checkout.
    where = _run([str(venv / "python"), "-c", "import minitx; print(minitx.__file__)"], tmp_path).stdout
    assert str(venv.parent) in where


def test_infer_and_conformance_on_the_good_backend(venv: Path, tmp_path: Path) -> None:
    mx = str(venv / "minitx")
    _run([mx, "init", "--arch", "gpt2", "--preset", "tiny", "-o", str(tmp_path / "m.npz")], tmp_path)
    args = [mx, "infer", str(tmp_path / "m.npz"), "--ids", "1,2,3", "-n", "3", "--json"]
    ref = json.loads(_run(args, tmp_path).stdout)
    p = _run(args + ["--backend", "good", "--explain"], tmp_path)
    assert json.loads(p.stdout) == ref  # same tokens as the spec
    assert "good" in p.stderr and "emb" in p.stderr and "numpy" in p.stderr  # add on good, rest fell back
    bad = _run(args + ["--backend", "good", "--no-fallback"], tmp_path, check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr
    bad = _run(args + ["--backend", "broken"], tmp_path, check=False)
    assert bad.returncode == 2 and "libfancy.so.3" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    p = _run([mx, "conformance", "--backend", "good"], tmp_path)
    assert "good: " in p.stdout and " 0 failed" in p.stdout and "PASS" in p.stdout
