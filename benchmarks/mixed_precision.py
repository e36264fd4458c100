"""Mixed precision per layer on all-MiniLM-L6-v2: all-int4 against int4 with the most sensitive
layers (measured: relative output error on calibration text) in int8, against all-int8.

    python benchmarks/mixed_precision.py /tmp/minilm.npz [SPEC ...] > benchmarks/results/mixed_precision.md

Sensitivity is measured on 16 lines of docs/backends.md; figures are the quant plugin's own
validation on the held-out text shipped with minitx, at every length (mean and
worst row cosine of the sentence embeddings against fp32), plus the weight bytes.
"""
import sys

from minitx import modelfile, plugin
from minitx.validate import Calibration

SPECS = ("quant:int4", "quant:int4,sensitive=0.1", "quant:int4,sensitive=0.25", "quant:int4,sensitive=0.5",
         "quant:int4,embeddings=int8", "quant:int4,embeddings=int8,sensitive=0.25",
         # control: as many int8 layers as sensitive=0.25, chosen by position (the last ones)
         "quant:int4,embeddings=int8,layers=layers.5.*:int8|layers.4.attn.*:int8",
         "quant:int8",
         # the low-bit codebooks after training alone (they are meant for QAT), and mixed with int8
         "quant:log4,embeddings=int8", "quant:log4,embeddings=int8,sensitive=0.25",
         "quant:int2,embeddings=int8", "quant:ternary,embeddings=int8", "quant:binary,embeddings=int8")


def main(path: str, specs=SPECS) -> None:
    m = modelfile.load(path)
    # fit (measure sensitivity) on prose unrelated to the held-out text it is validated on
    with open("docs/backends.md", encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if len(ln.strip()) > 60][:16]
    cal = Calibration.parse(["text:" + ln for ln in lines], validate=["heldout"])
    print("| spec | int8 layers | mean cos | worst row cos | MiB |\n|---|---|---|---|---|")
    for spec in specs:
        new = plugin.optimize(m, [spec], calib=cal, force=True)
        rep = new.meta["rewrites"][-1]
        out = rep["validation"]["outputs"][0]
        n8 = sum(n.tags.get("quant", "") in ("int8", "int8_channel") for n in new.graph.nodes)
        print(f"| `{spec}` | {n8} | {out['mean_row_cosine']:.5f} | {out['min_row_cosine']:.5f} | "
              f"{rep['bytes_after'] / 2**20:.1f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or SPECS)
