"""The machine line every benchmark result carries: the CPU's name alone ("AMD EPYC" in a VM)
hides what decides a kernel's speed, so the family/model and the SIMD sets come with it."""
from __future__ import annotations

from minitx import machine

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni avx_vnni

processor\t: 1
model name\t: another CPU
flags\t\t: amx_int8
"""


def test_cpu_model_names_the_family_and_the_simd_sets_of_the_first_cpu(tmp_path):
    p = tmp_path / "cpuinfo"
    p.write_text(CPUINFO)
    assert machine.cpu_model(str(p)) == "AMD EPYC (family 26 model 2; avx2 fma avx512f avx_vnni avx512_vnni)"
    p.write_text("processor\t: 0\nmodel name\t: Old CPU\ncpu family\t: 6\nmodel\t\t: 1\nflags\t\t: sse2\n")
    assert machine.cpu_model(str(p)) == "Old CPU (family 6 model 1; no AVX2)"
    assert machine.cpu_model(str(tmp_path / "missing")) != ""        # no /proc: the platform's name


def test_summary_says_which_kernels_openblas_runs():
    m = {"cpu": "X", "cores": 2, "numpy_blas": "scipy-openblas 0.3.31",
         "threadpools": [{"internal_api": "openblas", "architecture": "Haswell"}], "versions": {"python": "3.11"}}
    assert "BLAS scipy-openblas 0.3.31 (Haswell kernels)" in machine.summary(m)
    m["threadpools"] = []
    assert "BLAS scipy-openblas 0.3.31;" in machine.summary(m)
