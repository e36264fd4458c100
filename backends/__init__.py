"""Backends shipped with minitx. Installed as ``minitx.backends``; each registers through the
``minitx.backends`` entry-point group exactly as a third party's would."""
