"""Writing outputs safely: every file minitx writes goes through here.

Why a module of its own: an output path given on the command line can be anything — a device
node, a FIFO, a symlink, a file the same command reads, a folder that turns out read-only after
an hour of training. The rules, applied by :func:`check_output` before a command starts its work
and by :func:`atomic_write` when it writes:

* the target must be a regular file or not exist yet: a device node, FIFO or socket is refused
  (replacing ``/dev/null`` with a regular file is never what was meant), a folder likewise;
* a symlink is written *through*: its target gets the new content and the link stays a link;
* an output that is the same file (same inode) as an input of the command is refused, unless the
  command documents writing in place (``optimize m.npz -o m.npz``);
* the folder must exist and be writable — checked by creating and removing a probe file, so a
  read-only mount is found before the work, not after it;
* content goes to a temporary file ``.NAME.minitx-tmp-PID`` beside the target, is synced, then
  renamed over it: a reader never sees half a file. Temporary files left by a killed run (their
  PID no longer alive) for the same output are removed;
* every ``OSError`` while writing (disk full, permission denied) becomes one
  :class:`MinitxError` line naming the path.
"""
from __future__ import annotations

import errno
import os
import stat
from contextlib import contextmanager
from typing import BinaryIO, Iterable, Iterator, Mapping

import numpy as np

from .errors import MinitxError

TMP_TAG = ".minitx-tmp-"


def resolve(path: str | os.PathLike) -> str:
    """The file a write to ``path`` must change: a symlink's final target, else the path itself."""
    path = os.fspath(path)
    if path == "":
        raise MinitxError("the output path is empty")
    return os.path.realpath(path) if os.path.islink(path) else os.path.abspath(path)


def _check_target(path: str, target: str) -> os.stat_result | None:
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise MinitxError(f"{path}: folder {folder} does not exist")
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise MinitxError(f"{path}: cannot use as output: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise MinitxError(f"{path}: is a folder; give a file name to write")
    if not stat.S_ISREG(st.st_mode):
        raise MinitxError(f"{path}: is not a regular file (a device, FIFO or socket); refusing to replace it "
                          f"— give the path of a regular file")
    return st


def check_output(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (),
                 in_place: Iterable[str | os.PathLike | None] = ()) -> str:
    """Refuse, before any work, an output that cannot or must not be written; returns the path
    that will be written (a symlink's target).

    ``inputs`` are the files the command reads; ``in_place`` those of them the output may be
    (only for commands documented to rewrite their input, as ``optimize m.npz -o m.npz``).
    """
    path = os.fspath(path)
    target = resolve(path)
    st = _check_target(path, target)
    if st is not None:
        allowed = {os.fspath(p) for p in in_place if p is not None}
        for inp in inputs:
            if inp is None or os.fspath(inp) in allowed:
                continue
            try:
                si = os.stat(inp)
            except OSError:
                continue
            if (si.st_dev, si.st_ino) == (st.st_dev, st.st_ino):
                raise MinitxError(f"{path}: is the same file as the input {os.fspath(inp)}; writing it would "
                                  f"destroy that input — choose another output path")
    folder = os.path.dirname(target)
    _remove_stale(target)
    probe = _tmp_name(target)
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise MinitxError(f"{path}: cannot write in folder {folder}: {e.strerror}") from None
    return target


def _tmp_name(target: str, n: int = 0) -> str:
    folder, base = os.path.split(target)
    return os.path.join(folder, f".{base}{TMP_TAG}{os.getpid()}" + (f"-{n}" if n else ""))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(target: str) -> None:
    """Delete temporary files of earlier runs writing ``target`` whose process is gone."""
    folder, base = os.path.split(target)
    prefix = f".{base}{TMP_TAG}"
    try:
        names = [n for n in os.listdir(folder) if n.startswith(prefix)]
    except OSError:
        return
    for n in names:
        pid_text = n[len(prefix):].split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _pid_alive(int(pid_text)):
            continue
        try:
            os.unlink(os.path.join(folder, n))
        except OSError:
            pass


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file that appears at ``path`` only once the block completes without error.

    It is written beside the target (same filesystem, so the rename is atomic), synced, given the
    usual umask permissions, then renamed; on any failure it is removed. A symlink's target is
    written, a non-regular target refused (see the module docstring).
    """
    path = os.fspath(path)
    target = resolve(path)
    _check_target(path, target)
    _remove_stale(target)
    tmp, n = _tmp_name(target), 0
    while True:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            break
        except FileExistsError:
            n += 1
            tmp = _tmp_name(target, n)
        except OSError as e:
            raise MinitxError(f"{path}: cannot write in folder {os.path.dirname(target)}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and e.errno is not None:
            if e.filename not in (None, tmp, target) and e.errno != errno.ENOSPC:
                raise MinitxError(f"{e.filename}: {e.strerror}") from None
            raise MinitxError(f"{path}: writing failed: {e.strerror}") from None
        raise


def write_npz_atomic(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """np.savez into a temporary file beside ``path``, then rename: no half-written outputs."""
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
