"""Plugin registry and option strings: lazy, fault-isolated, one-line errors, deterministic order."""
import os
import subprocess
import sys

import pytest

from minitx import plugin
from minitx.errors import MinitxError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shorthand_and_key_values():
    s = plugin.parse_spec("quant:int4,group=64")
    assert s.name == "quant" and s.options["mode"] == "int4" and s.options["group"] == 64
    assert s.options["block"] == 32  # defaults filled in
    assert plugin.parse_spec("quant").options["mode"] == "int8"
    assert plugin.parse_spec("recompute:policy=every_k,k=3").options == {"policy": "every_k", "k": 3,
                                                                          "attention": "keep"}


@pytest.mark.parametrize("text,msg", [
    ("nosuch", "unknown plugin 'nosuch'"),
    ("quant:int5", "bad value 'int5' for mode"),
    ("quant:bits=4", "unknown option 'bits'"),
    ("quant:mode=int4,group=0", "bad value '0' for group: must be a positive integer"),
    ("quant:int4,group=3", "must be even"),
    ("quant:int8,int4", "must be key=value"),
    ("quant:group=32,group=64", "given twice"),
    ("quant:int8,", "empty option"),
])
def test_bad_options_are_one_line_errors(text, msg):
    with pytest.raises(MinitxError, match=msg) as e:
        plugin.parse_spec(text)
    assert "\n" not in str(e.value)


def test_composition_order_is_deterministic():
    order = [s.name for s in plugin.plan(["recompute:every", "quant:int8"])]
    assert order == ["quant", "recompute"]  # by declared order, whatever the command-line order
    with pytest.raises(MinitxError, match="given twice"):
        plugin.plan(["quant:int8", "quant:int4"])


def test_in_process_registration_and_fault_isolation():
    class Noop(plugin.Plugin):
        name = "noop_test"
        options = {"x": plugin.Option(1, int, "a number")}

        def rules(self, opts):
            return []

    def broken():
        raise ImportError("libfoo.so missing")

    plugin.register("noop_test", Noop)
    plugin.register("broken_test", broken)
    try:
        assert plugin.parse_spec("noop_test:x=5").options == {"x": 5}
        with pytest.raises(MinitxError, match="broken_test.*unavailable.*libfoo"):
            plugin.get_plugin("broken_test")
        rows = {r["name"]: r for r in plugin.describe()}
        assert rows["broken_test"]["available"] is False and rows["quant"]["available"] is True
    finally:
        plugin.entries().pop("noop_test")
        plugin.entries().pop("broken_test")


def _cli(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), *args], capture_output=True, text=True,
                          cwd=cwd)


def test_cli_plugins_and_optimize_errors(tmp_path):
    r = _cli("plugins", cwd=tmp_path)
    assert r.returncode == 0 and "quant" in r.stdout and "recompute" in r.stdout
    assert _cli("init", "--arch", "gpt2", "-o", "m.npz", cwd=tmp_path).returncode == 0
    r = _cli("optimize", "m.npz", "--plugin", "quant:int4,group=24", "-o", "out.npz", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "group size 24 does not divide" in r.stderr
    assert not (tmp_path / "out.npz").exists()
    r = _cli("optimize", "m.npz", "--plugin", "quant:int8", "--plugin", "recompute:every", "--calib", "random:2x16",
             "-o", "out.npz", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "PASS" in r.stdout and "x smaller" in r.stdout
    r = _cli("infer", "out.npz", "--ids", "1,2,3", "-n", "4", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("1 2 3")


def test_calibration_reaches_only_plugins_that_ask_for_it():
    """A plugin declaring uses_calibration gets the user's sequences, tokenized for the model; one
    written before calibration existed (apply without ``calib``) is called as before."""
    from minitx import models, rewrite
    from minitx.model import Model
    from minitx.validate import Calibration

    seen = []

    class Legacy(plugin.Plugin):
        name = "legacy_test"

        def apply(self, graph, params, opts):   # the pre-calibration signature
            seen.append("legacy")
            return rewrite.apply(graph, params, [], options=opts)

    class Aware(plugin.Plugin):
        name = "aware_test"

        def uses_calibration(self, opts):
            return True

        def rules(self, opts):
            return []

        def apply(self, graph, params, opts, *, calib=None):
            seen.append(calib)
            return super().apply(graph, params, opts, calib=calib)

    plugin.register("legacy_test", Legacy)
    plugin.register("aware_test", Aware)
    try:
        m = Model.from_config(models.preset("gpt2", "tiny"), seed=0)
        new = plugin.optimize(m, ["legacy_test", "aware_test"], calib=Calibration(ids=[[4, 5, 6], [7, 8]], source="ids"))
        assert seen[0] == "legacy"
        assert seen[1] == plugin.CalibrationData(((4, 5, 6), (7, 8)), "ids", 0)
        assert [("calibration" in e) for e in new.meta["rewrites"]] == [False, True]
        warnings: list[str] = []
        plugin.optimize(m, ["aware_test"], warn=warnings.append)     # nothing given: seeded random tokens
        assert seen[2].random and len(seen[2].sequences) == 4
        assert any("aware_test collected its activations on random tokens" in w for w in warnings), warnings
    finally:
        plugin.entries().pop("legacy_test")
        plugin.entries().pop("aware_test")


def test_cli_optimize_calibrates_on_the_given_text_and_reports_the_random_fallback(tmp_path):
    import json

    from minitx.bundled import default_model_path

    spec = "sparsity:weights=wanda,sparsity=0.5"
    r = _cli("optimize", default_model_path(), "--plugin", spec, "-o", "rand.npz", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "random tokens" in r.stderr and "--calib" in r.stderr
    (tmp_path / "calib.txt").write_text("Emma was very much pleased with the visit.\n\n"
                                        "Her father talked of it all the evening.\n", encoding="utf-8")
    r = _cli("optimize", default_model_path(), "--plugin", spec, "--calib", "file:calib.txt", "--json",
             "-o", "text.npz", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "random tokens" not in r.stderr
    cal = json.loads(r.stdout)[0]["calibration"]
    assert cal["source"].startswith("file:calib.txt (2 lines)") and cal["sequences"] == 2 and not cal["random"]
