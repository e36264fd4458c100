#!/usr/bin/env python
"""Rebuild the bundled default model (minitx/data/default.npz) from scratch.

1. Download the Debian package r-cran-janeaustenr (``apt-get download``; MIT-licensed packaging
   of Jane Austen's six novels, which are in the public domain) — or pass ``--deb FILE``.
2. Extract the novels from the R lazy-load database inside it (``data/Rdata.rdb``: zlib-
   compressed R serializations of character vectors, one element per line of text) and join
   each paragraph onto one line.
3. Run ``minitx train`` on the text, writing the model.

Usage: python scripts/train_default.py [--deb r-cran-janeaustenr_*.deb] [--workdir DIR] [--steps N]
See DATA_SOURCES.md for the source and its licence.
"""
from __future__ import annotations

import argparse
import glob
import os
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"

# The recipe of the shipped model; changing it changes the model.
CONFIG = {"arch": "gpt2", "vocab_size": 2048, "n_ctx": 128, "d_model": 128, "n_layers": 4, "n_heads": 4,
          "d_ff": 512}
TRAIN_ARGS = ["--steps", "900", "--batch", "12", "--lr", "4e-3", "--min-lr", "4e-4", "--warmup", "40",
              "--eval-every", "100", "--eval-batches", "2", "--checkpoint-every", "50", "--val-fraction", "0.02",
              "--seed", "0"]


def download_deb(workdir: str) -> str:
    subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=workdir, check=True)
    debs = sorted(glob.glob(os.path.join(workdir, "r-cran-janeaustenr_*.deb")))
    if not debs:
        sys.exit("apt-get download r-cran-janeaustenr produced no .deb")
    return debs[-1]


def member(deb: str, name: str) -> bytes:
    """One file from a .deb (an ar archive holding data.tar.{xz,gz,zst})."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "--fsys-tarfile", deb], check=True, stdout=open(os.path.join(tmp, "d.tar"), "wb"))
        with tarfile.open(os.path.join(tmp, "d.tar")) as t:
            return t.extractfile("./" + name).read()


def r_strings(blob: bytes) -> list[list[str]]:
    """Every character vector in an R lazy-load database (.rdb): each record is a 4-byte length
    followed by a zlib stream holding an R XDR serialization (format version 2 or 3)."""
    out, pos = [], 0
    while pos < len(blob):
        d = zlib.decompressobj()
        raw = d.decompress(blob[pos + 4:])
        pos = len(blob) - len(d.unused_data)
        if raw[:2] != b"X\n":
            continue
        i = 2
        version = struct.unpack(">i", raw[i:i + 4])[0]
        i += 12
        if version == 3:
            n = struct.unpack(">i", raw[i:i + 4])[0]
            i += 4 + n
        flags, length = struct.unpack(">ii", raw[i:i + 8])
        i += 8
        if flags & 0xFF != 16:      # STRSXP: a character vector
            continue
        strs = []
        for _ in range(length):
            cflags, n = struct.unpack(">ii", raw[i:i + 8])
            i += 8
            if n < 0:
                strs.append("")     # NA_character_
                continue
            strs.append(raw[i:i + n].decode("utf-8" if cflags & (1 << 3) else "latin-1"))
            i += n
        out.append(strs)
    return out


def to_text(novels: list[list[str]]) -> str:
    """Paragraphs on one line each, separated by blank lines."""
    paras: list[str] = []
    for lines in novels:
        cur: list[str] = []
        for line in lines + [""]:
            line = line.strip()
            if line:
                cur.append(line)
            elif cur:
                paras.append(" ".join(cur))
                cur = []
    return "\n\n".join(paras) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deb", help="r-cran-janeaustenr .deb (default: apt-get download it)")
    ap.add_argument("--workdir", default=os.path.join(ROOT, "build", "default-model"))
    ap.add_argument("-o", "--output", default=os.path.join(ROOT, "minitx", "data", "default.npz"))
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    ap.add_argument("--resume", action="store_true", help="continue from the workdir's checkpoint")
    a = ap.parse_args()
    os.makedirs(a.workdir, exist_ok=True)
    text_path = os.path.join(a.workdir, "austen.txt")
    if not os.path.exists(text_path):
        deb = a.deb or download_deb(a.workdir)
        novels = r_strings(member(deb, RDB))
        if len(novels) != 6:
            sys.exit(f"expected 6 novels in {deb}, found {len(novels)}")
        with open(text_path, "w", encoding="utf-8") as f:
            f.write(to_text(novels))
    cfg_path = os.path.join(a.workdir, "config.json")
    import json

    with open(cfg_path, "w") as f:
        json.dump(CONFIG, f)
    args = list(TRAIN_ARGS)
    if a.steps is not None:
        args[args.index("--steps") + 1] = str(a.steps)
    ckpt = os.path.join(a.workdir, "default.ckpt.npz")
    cmd = [sys.executable, os.path.join(ROOT, "cli.py"), "train", "--config", cfg_path, "--data", text_path,
           "--vocab-size", str(CONFIG["vocab_size"]), "-o", a.output, "--checkpoint", ckpt, *args]
    try:  # the numba backend (the cpu extra) is ~1.5x faster here; the spec runs what it lacks
        import numba  # noqa: F401

        cmd += ["--backend", "numba,numpy"]
    except ImportError:
        pass
    if a.resume and os.path.exists(ckpt):
        cmd += ["--resume", ckpt]
    print(" ".join(cmd), flush=True)
    # One BLAS thread: on a busy 2-core machine OpenBLAS's spinning threads cost more than they give.
    env = {**os.environ, "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1")}
    sys.exit(subprocess.call(cmd, cwd=ROOT, env=env))


if __name__ == "__main__":
    main()
