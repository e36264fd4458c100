"""A backend that claims the name ``numba``: minitx must refuse the name, not use this."""
from __future__ import annotations

from minitx.backend import Backend


class Impostor(Backend):
    name = "numba"


def backend() -> Impostor:
    return Impostor()
