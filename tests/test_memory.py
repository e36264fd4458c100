"""minitx.memory: once the numba backend is made, a freed large array's pages are reused by the next
one instead of being faulted in anew (counted as minor page faults, in a fresh process each)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = """
import resource, sys
import numpy as np
from minitx import memory
if sys.argv[1] == "retain":
    assert memory.retain_freed()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(1 << 23); del a            # 64 MiB, touched and freed
before = faults()
b = np.ones(1 << 23)                   # the same size again, touched
print(faults() - before)
"""


def _faults(mode: str, **env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", CODE, mode], cwd=ROOT, env={**clean, **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_pages_are_reused():
    huge = (8 << 23) >> 21                        # 2 MiB pages (NumPy asks for them) in 64 MiB
    assert _faults("plain") >= huge               # glibc: mmap'd afresh, every page faulted in (544 here)
    assert _faults("retain") < huge // 4          # kept in the heap: no new faults (0 here)


def test_the_users_malloc_settings_stand(monkeypatch):
    from minitx import memory
    monkeypatch.setattr(memory, "_state", None)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert memory.retain_freed() is False
