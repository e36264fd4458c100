"""AdamW, the learning-rate schedule and gradient clipping, in plain NumPy.

    m ← β₁m + (1−β₁)g;   v ← β₂v + (1−β₂)g²
    θ ← θ − lr·( m̂/(√v̂ + ε) + λ·θ )          m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ)

Weight decay is decoupled (Loshchilov & Hutter) and applied only to the matrices of linear
layers: norms, biases and embeddings (the tied GPT-2 output matrix is the token embedding) are
not pulled towards zero.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np


def decays(name: str, shape: tuple[int, ...]) -> bool:
    """Whether weight decay applies to a parameter: linear-layer matrices only."""
    return len(shape) >= 2 and "emb" not in name and "norm" not in name


def lr_at(step: int, lr: float, warmup: int, total: int, min_lr: float) -> float:
    """Linear warm-up from 0 over ``warmup`` steps, then cosine decay to ``min_lr`` at ``total``.

    ``step`` counts from 0; the update with index ``step`` uses this rate.
    """
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(total - warmup, 1)
    t = min(max(step - warmup, 0) / span, 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))


def clip_global_norm(grads: dict[str, np.ndarray], max_norm: float) -> float:
    """Scale all gradients together so their joint L2 norm is at most ``max_norm`` (in place);
    returns the norm before clipping. ``max_norm <= 0`` turns clipping off."""
    norm = math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for k in grads:
            grads[k] = grads[k] * np.asarray(scale, grads[k].dtype)
    return norm


class AdamW:
    def __init__(self, params: Mapping[str, np.ndarray], betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.1) -> None:
        self.b1, self.b2 = betas
        self.eps, self.wd = eps, weight_decay
        self.t = 0
        self.m = {k: np.zeros_like(a) for k, a in params.items()}
        self.v = {k: np.zeros_like(a) for k, a in params.items()}

    def step(self, params: dict[str, np.ndarray], grads: Mapping[str, np.ndarray], lr: float) -> None:
        """One update of every parameter that has a gradient, in place."""
        self.t += 1
        c1 = 1.0 - self.b1 ** self.t
        c2 = 1.0 - self.b2 ** self.t
        for k, g in grads.items():
            p, m, v = params[k], self.m[k], self.v[k]
            dt = p.dtype.type
            m *= dt(self.b1)
            m += dt(1.0 - self.b1) * g
            v *= dt(self.b2)
            v += dt(1.0 - self.b2) * (g * g)
            upd = (m / dt(c1)) / (np.sqrt(v / dt(c2)) + dt(self.eps))
            if self.wd and decays(k, p.shape):
                upd += dt(self.wd) * p
            p -= dt(lr) * upd

    def state(self) -> dict[str, np.ndarray]:
        out = {f"opt.m.{k}": a for k, a in self.m.items()}
        out.update({f"opt.v.{k}": a for k, a in self.v.items()})
        return out

    def load_state(self, arrays: Mapping[str, np.ndarray], t: int) -> None:
        for k in self.m:
            self.m[k] = np.array(arrays[f"opt.m.{k}"], dtype=self.m[k].dtype)
            self.v[k] = np.array(arrays[f"opt.v.{k}"], dtype=self.v[k].dtype)
        self.t = t
