"""What a training run is: its settings (the flags a resume must repeat) and its state."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from ..errors import MinitxError
from ..model import Model
from ..optim import AdamW
from ..precision import LossScaler, check_precision


@dataclass
class TrainSettings:
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 0            # 0 = the model's context length
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip: float = 1.0           # global gradient norm; 0 = off
    eval_every: int = 50        # 0 = only at the end
    eval_batches: int = 4
    checkpoint_every: int = 100  # 0 = only at the end
    val_fraction: float = 0.05
    seed: int = 0
    precision: str = "float32"  # compute precision: float32, float16 or bfloat16 (weights stay float32)
    loss_scale: float = 2.0 ** 15           # initial loss scale (float16/bfloat16 only)
    loss_scale_growth_interval: int = 200   # good steps in a row before the scale doubles
    loss_scale_backoff: float = 0.5         # factor applied to the scale on overflow
    plugins: tuple[str, ...] = ()           # exact graph rewrites for training, e.g. "recompute:sqrt"

    def check(self) -> None:
        """Refuse impossible values with the flag's name (every caller: CLI, library, checkpoint)."""
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "plugins":
                ok = isinstance(v, tuple) and all(isinstance(p, str) for p in v)
            elif f.name == "precision":
                ok = isinstance(v, str)
            elif f.type == "int":
                ok = isinstance(v, (int, np.integer)) and not isinstance(v, bool)
            else:
                ok = isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok:
                raise MinitxError(f"--{_flag(f.name)} must be a {f.type.replace('tuple[str, ...]', 'list')}, got {v!r}")
        for k in ("steps", "batch_size", "grad_accum", "eval_batches"):
            if getattr(self, k) <= 0:
                raise MinitxError(f"--{_flag(k)} must be a positive integer, got {getattr(self, k)}")
        for k in ("seq_len", "warmup", "eval_every", "checkpoint_every", "seed", "clip", "weight_decay"):
            if getattr(self, k) < 0:
                raise MinitxError(f"--{_flag(k)} must be >= 0, got {getattr(self, k)}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise MinitxError(f"need 0 < lr and 0 <= min-lr <= lr, got lr={self.lr}, min-lr={self.min_lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise MinitxError("betas must be in [0, 1)")
        if not 0 <= self.val_fraction < 1:
            raise MinitxError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        check_precision(self.precision)
        if not self.loss_scale > 0:
            raise MinitxError(f"--loss-scale must be a positive number, got {self.loss_scale}")
        if self.loss_scale_growth_interval <= 0:
            raise MinitxError("--loss-scale-growth-interval must be a positive integer, "
                              f"got {self.loss_scale_growth_interval}")
        if not 0 < self.loss_scale_backoff < 1:
            raise MinitxError(f"--loss-scale-backoff must be in (0, 1), got {self.loss_scale_backoff}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainSettings":
        """Settings from a checkpoint's JSON (unknown keys ignored, missing ones default), checked."""
        if not isinstance(d, dict):
            raise MinitxError(f"the settings must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if isinstance(kw.get("plugins"), list):  # a JSON list in a checkpoint
            kw["plugins"] = tuple(kw["plugins"])
        s = cls(**kw)
        s.check()
        return s

    def optimizer(self, params: dict[str, np.ndarray]) -> AdamW:
        return AdamW(params, (self.beta1, self.beta2), self.eps, self.weight_decay)


def _flag(name: str) -> str:
    return name.replace("_", "-")


@dataclass
class TrainState:
    """Everything a checkpoint holds: the model being trained, its optimizer, the data stream's
    generator, the settings, the step and the held-out history."""

    model: Model
    opt: AdamW
    rng: np.random.Generator
    settings: TrainSettings
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    scaler: LossScaler | None = None  # mixed precision only; made by fit() when missing
    kind: str = "train"               # the command whose run this is: train, distill or qat
    run: dict[str, Any] = field(default_factory=dict)   # what a resume must repeat (check_run)
    aux: dict[str, np.ndarray] = field(default_factory=dict)  # trainables outside the model
    aux_opt: AdamW | None = None      # their optimizer
    source: str | None = None         # the checkpoint this state was loaded from


def new_state(model: Model, settings: TrainSettings, kind: str = "train") -> TrainState:
    """A fresh run over ``model``'s weights (trained in place); the data stream gets its own
    generator, seeded apart from the weights' initialisation."""
    settings.check()   # whether the model can be trained is the objective's question (fit)
    rng = np.random.Generator(np.random.PCG64([settings.seed, 1]))
    return TrainState(model, settings.optimizer(model.params), rng, settings, kind=kind)


def fresh_model(config: dict[str, Any], tokenizer_json: str | None, settings: TrainSettings,
                kind: str = "train") -> TrainState:
    """A run from a new model initialised from ``settings.seed`` (``minitx train``, a student)."""
    settings.check()
    return new_state(Model.from_config(config, seed=settings.seed, tokenizer_json=tokenizer_json), settings, kind)
