"""Entry-point discovery with lazy, fault-isolated loading — shared by backends and plugins.

A :class:`Registry` lists what an entry-point group declares (plus what minitx ships, so that a
source checkout that was never installed finds its own), imports nothing until a name is first
used, and records a failure to load with its reason instead of raising, so that one broken
package never takes the others down (the JAX PJRT plugin pattern).

Names are unique. When two packages declare the same name (a third-party backend called
``numba``), neither silently replaces the other: the name is unusable and its error names both
packages. ``register`` (tests, notebooks) refuses a name already taken for the same reason.

Remedies come from the package that failed, not from guessing at its error text: the module that
defines the entry point's target may define ``remedy(error) -> str | None``, which is asked what
the user can do about ``error`` (``pip install 'minitx[cpu]'`` when numba is missing).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import threading
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Generic, Mapping, TypeVar

from .errors import MinitxError

T = TypeVar("T")
SHIPPED = "minitx"   # the distribution name of what minitx ships itself


@dataclass
class Entry(Generic[T]):
    """One declared name: where it points, which distribution declared it, and — once loaded — the
    object or the reason it could not be made (``error``) with the package's ``remedy``."""

    name: str
    target: str
    dist: str = ""
    factory: Callable[[], T] | None = None
    obj: T | None = None
    error: str | None = None
    remedy: str | None = None
    loaded: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def resolve(target: str) -> Any:
    """``package.module:attr.path`` → the object it names (imports the module)."""
    mod, _, attr = target.partition(":")
    obj: Any = importlib.import_module(mod)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


def _asked_remedy(factory: Any, error: BaseException) -> str | None:
    """What the module defining ``factory`` says the user can do about ``error``, if anything."""
    fn = getattr(inspect.getmodule(factory), "remedy", None)
    if not callable(fn):
        return None
    try:
        hint = fn(error)
    except Exception:  # noqa: BLE001 — a broken hint must not hide the error it explains
        return None
    return str(hint) if hint else None


def _present(target: str) -> bool:
    try:
        return importlib.util.find_spec(target.partition(":")[0]) is not None
    except (ImportError, ValueError):
        return False


class Registry(Generic[T]):
    """The names declared in entry-point group ``group`` for things of one ``kind`` ("backend",
    "plugin"). ``make(factory)`` turns a loaded target into the object (calling it and checking
    the result's type; raise to reject it). ``shipped`` maps the names minitx itself provides to
    their targets, found even without installed entry points."""

    def __init__(self, group: str, kind: str, make: Callable[[Any], T], shipped: Mapping[str, Any]) -> None:
        self.group = group
        self.kind = kind
        self.make = make
        self.shipped = dict(shipped)
        self._entries: dict[str, Entry[T]] | None = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- discovery
    def entries(self) -> dict[str, Entry[T]]:
        """Every declared name (nothing imported yet). The dict is live: tests may add or pop."""
        with self._lock:
            if self._entries is None:
                self._entries = self._discover()
            return self._entries

    def _discover(self) -> dict[str, Entry[T]]:
        declared: dict[str, list[Entry[T]]] = {}
        for ep in metadata.entry_points(group=self.group):
            dist = getattr(getattr(ep, "dist", None), "name", "") or ""
            same = declared.setdefault(ep.name, [])
            if not any(e.dist == dist for e in same):   # one distribution seen twice on the path
                same.append(Entry(ep.name, ep.value, dist))
        for name, target in self.shipped.items():
            same = declared.setdefault(name, [])
            if any(e.dist == SHIPPED for e in same):
                continue
            if isinstance(target, str):
                if _present(target):
                    same.append(Entry(name, target, SHIPPED))
            else:
                same.append(Entry(name, f"{target.__module__}:{target.__qualname__}", SHIPPED, factory=target))
        found: dict[str, Entry[T]] = {}
        for name, same in declared.items():
            if not same:
                continue
            found[name] = same[0] if len(same) == 1 else self._clash(name, same)
        return found

    def _clash(self, name: str, same: list[Entry[T]]) -> Entry[T]:
        who = " and ".join(f"{e.dist or 'an unnamed package'} ({e.target})" for e in same)
        e = Entry[T](name, " | ".join(x.target for x in same), ", ".join(x.dist for x in same))
        e.loaded = True
        e.error = f"{self.kind} name {name!r} is declared by two packages: {who}"
        e.remedy = "uninstall one of them, or ask its author to pick another name"
        return e

    def register(self, name: str, factory: Callable[[], T]) -> None:
        """Add ``name`` in-process (tests, notebooks); installed packages use the entry point.
        A name already taken is an error naming its owner: nothing is silently replaced."""
        table = self.entries()
        if name in table:
            old = table[name]
            raise MinitxError(f"{self.kind} {name!r} is already registered by {old.dist or 'this process'} "
                              f"({old.target}); choose another name")
        mod = getattr(factory, "__module__", "") or ""
        table[name] = Entry(name, f"<registered {name}>", mod, factory=factory)

    # ---------------------------------------------------------------- loading
    def load(self, entry: Entry[T]) -> T | None:
        """The entry's object, made on first call; None (with ``error``/``remedy``) if that failed."""
        with entry.lock:
            if not entry.loaded:
                entry.loaded = True
                factory: Any = entry.factory
                try:
                    if factory is None:
                        factory = resolve(entry.target)
                    entry.obj = self.make(factory)
                except Exception as e:  # noqa: BLE001 — fault isolation is the point
                    entry.error = f"{type(e).__name__}: {e}".strip()
                    entry.remedy = _asked_remedy(factory, e) if factory is not None else None
            return entry.obj

    def get(self, name: str) -> T:
        """The named object, loaded on first use; unknown or unavailable is a one-line error."""
        table = self.entries()
        if name not in table:
            raise MinitxError(f"unknown {self.kind} {name!r}; available: {', '.join(sorted(table)) or 'none'} "
                              f"(a third-party {self.kind} registers in the entry-point group {self.group!r})")
        entry = table[name]
        obj = self.load(entry)
        if obj is None:
            hint = f" — {entry.remedy}" if entry.remedy else ""
            raise MinitxError(f"{self.kind} {name!r} is unavailable: {entry.error}{hint}")
        return obj

    def loaded(self) -> list[T]:
        """The objects loaded so far (nothing is imported to answer)."""
        return [e.obj for e in list(self.entries().values()) if e.obj is not None]
