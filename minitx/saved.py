"""Saved activations stored compressed between the forward and the backward pass.

Training holds, from each forward node until its VJP runs, the values that VJP reads; they are
most of the activation memory. Storing them in 8 bits with one float32 scale per ``block``
consecutive values cuts that memory about 4x (float32) at the cost of a perturbed backward pass:
each VJP is evaluated at ``decompress(compress(x))`` instead of ``x``. The forward pass, and so
the loss, is untouched. This module is the one definition of the two formats:

* ``int8``: ``s = max|block| / 127``, ``q = round(x / s)`` in [-127, 127], ``x ≈ q · s``.
  Relative error per value at most ``0.5 / 127`` of its block's largest magnitude.
* ``fp8``:  float8 e4m3 (1 sign, 4 exponent, 3 mantissa bits, bias 7, no infinities, largest
  448, as in Micikevicius et al., "FP8 formats for deep learning", 2022) emulated in NumPy,
  after scaling each block so its largest magnitude maps to 448. Rounding to the nearest code,
  ties to even (as IEEE rounding and PyTorch's ``float8_e4m3fn`` cast); relative error at most
  2^-4 of the value itself for normal codes — finer than int8 for the small values of a block,
  coarser for its large ones.

Both keep zeros exact and are deterministic. An all-zero block gets scale 0 and decodes to zeros.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import MinitxError

FORMATS = ("int8", "fp8")
FP8_MAX = 448.0


def _e4m3_values() -> np.ndarray:
    """The 127 non-negative finite e4m3 magnitudes, ascending (code 0..126; 127 is NaN)."""
    vals = []
    for code in range(127):
        e, m = code >> 3, code & 7
        vals.append(m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return np.array(vals)


_E4M3 = _e4m3_values()


def _e4m3_code(v: np.ndarray) -> np.ndarray:
    """Code of the e4m3 magnitude nearest to each float32 ``v`` in [0, 448], ties to the even code
    (even mantissa), as IEEE rounding does: normals round float32's mantissa to 3 bits on the bit
    pattern, subnormals (below 2^-6) to a multiple of 2^-9."""
    v = np.minimum(v.astype(np.float32), np.float32(FP8_MAX))
    bits = v.view(np.uint32)
    rounded = (bits + np.uint32((1 << 19) - 1) + ((bits >> 20) & 1)) & np.uint32(~((1 << 20) - 1) & 0xFFFFFFFF)
    exp = (rounded >> 23).astype(np.int32) - 127 + 7          # e4m3 exponent field after rounding
    normal = ((exp << 3) | ((rounded >> 20) & 7).astype(np.int32))
    sub = np.rint(v * np.float32(2.0 ** 9)).astype(np.int32)  # 0..8; 8 is the smallest normal, code 8
    return np.where(v < np.float32(2.0 ** -6), sub, normal).astype(np.uint8)


@dataclass(frozen=True)
class Compressed:
    """A float array held as one byte per value plus one float32 scale per block."""

    codes: np.ndarray          # int8 (int8 format) or uint8 (fp8 codes), flat, padded to blocks
    scales: np.ndarray         # float32, one per block
    shape: tuple[int, ...]
    dtype: np.dtype
    fmt: str
    block: int

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.scales.nbytes)


def _blocks(x: np.ndarray, block: int) -> np.ndarray:
    flat = np.asarray(x, np.float32).reshape(-1)
    pad = -flat.size % block
    if pad:
        flat = np.concatenate([flat, np.zeros(pad, np.float32)])
    return flat.reshape(-1, block)


def compress(x: np.ndarray, fmt: str = "int8", block: int = 64) -> Compressed:
    """``x`` in ``fmt`` with one scale per ``block`` consecutive values (C order)."""
    if fmt not in FORMATS:
        raise MinitxError(f"saved-activation format {fmt!r} is not one of {', '.join(FORMATS)}")
    if block < 1:
        raise MinitxError(f"saved-activation block must be >= 1, got {block}")
    b = _blocks(x, block)
    amax = np.abs(b).max(axis=1)
    top = 127.0 if fmt == "int8" else FP8_MAX
    scales = (amax / top).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)[:, None]
    y = b / safe
    if fmt == "int8":
        codes = np.clip(np.rint(y), -127, 127).astype(np.int8)
    else:
        codes = _e4m3_code(np.abs(y)) | (np.signbit(y).astype(np.uint8) << 7)
    return Compressed(codes.reshape(-1), scales, tuple(x.shape), np.dtype(x.dtype), fmt, block)


def decompress(c: Compressed) -> np.ndarray:
    """The array ``c`` approximates, in its original shape and dtype."""
    codes = c.codes.reshape(-1, c.block)
    if c.fmt == "int8":
        y = codes.astype(np.float32)
    else:
        y = _E4M3[codes & 127].astype(np.float32)
        y = np.where(codes & 128, -y, y)
    x = (y * c.scales[:, None]).reshape(-1)[: int(np.prod(c.shape, dtype=np.int64))]
    return x.reshape(c.shape).astype(c.dtype, copy=False)


def compressible(a: object) -> bool:
    """Only floating host arrays are compressed: masks, ids and positions stay exact."""
    return isinstance(a, np.ndarray) and a.dtype.kind == "f" and a.size > 0
