"""Training: one loop (:func:`fit`) for every objective, one evaluation, one checkpoint format.

    settings.py     TrainSettings (the flags a resume must repeat) and TrainState
    loop.py         fit(), the Objective protocol, CrossEntropy, training_graph()
    distill.py      the Distillation objective, its plan (teacher → student graph) and report
    qat.py          quantization-aware training: the fake-quant model, conversion, comparison
    evaluation.py   evaluate(): windowed next-token NLL; token_nll()
    checkpoint.py   the checkpoint file: save, load (every field checked), run identity
    progress.py     the progress line
    commands.py     what the train / distill / qat / eval commands do (the CLI parses and prints)
"""
from __future__ import annotations

from .checkpoint import check_run, load as load_checkpoint, save as save_checkpoint
from .evaluation import evaluate, token_nll
from .loop import CrossEntropy, Objective, batch_feeds, fit, training_graph
from .progress import ProgressLine
from .settings import TrainSettings, TrainState, fresh_model, new_state

__all__ = ["CrossEntropy", "Objective", "ProgressLine", "TrainSettings", "TrainState", "batch_feeds", "check_run",
           "evaluate", "fit", "fresh_model", "load_checkpoint", "new_state", "save_checkpoint", "token_nll",
           "training_graph"]
