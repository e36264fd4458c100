"""Optimization plugins shipped with minitx (installed as ``minitx.plugins``); each registers
through the ``minitx.plugins`` entry-point group exactly as a third party's would."""
