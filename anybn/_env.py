"""Environment variables that anybn reads at each call, read cheaply.

``ANYBN_FAST_PATHS`` and ``ANYBN_NUM_THREADS`` are read at each call, so that a process can
change them between calls (the benchmarks and the tests do). A call comes right after the
previous call's passes have swept megabytes through the CPU's caches, and there each line of
Python run is a miss: ``os.environ.get`` runs three Python functions (``Mapping.get``,
``_Environ.__getitem__``, the key's encoder) and, for a variable that is not set, raises and
catches ``KeyError`` twice. After two 64 MiB copies (medians of 60, an empty call's time
subtracted), three such reads took ~28 us for unset variables and ~17 for set ones; three
lookups in the dict behind ``os.environ`` ~3, and three calls of :class:`EnvSetting`, which
adds a method call to each, ~15.

:class:`EnvSetting` therefore looks the variable up in that dict, CPython's
``os.environ._data`` (keys and values as ``os.environ`` encodes them), with the key encoded
once, and parses each distinct value once. Where ``os.environ`` has no such dict (another
Python, or ``os.environ`` replaced by a plain mapping), it reads ``os.environ.get``, and so
it does from the first value the dict gives that ``os.environ.get`` does not (checked once
per distinct value, when it is parsed). Either way it sees every change made through
``os.environ`` (``monkeypatch.setenv``, ``mock.patch.dict``), which is where Python keeps the
environment it reads.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["EnvSetting"]

T = TypeVar("T")

_MISSING = object()
_REMEMBERED = 16  # distinct values parsed and kept per variable (a process sees one or two)


class EnvSetting(Generic[T]):
    """The environment variable ``name``, read at each call and parsed by ``parse``.

    ``parse`` takes the variable's text (None when it is not set) and returns the setting,
    or raises ValueError for a value it refuses; it is called once per distinct value, and
    a refused value is parsed (and refused) again at every call.
    """

    __slots__ = ("name", "_parse", "_key", "_seen")

    def __init__(self, name: str, parse: Callable[[str | None], T]) -> None:
        self.name = name
        self._parse = parse
        encode = getattr(os.environ, "encodekey", None)
        self._key = encode(name) if callable(encode) else None
        self._seen: dict[object, T] = {}

    def __call__(self) -> T:
        environ = os.environ
        data = getattr(environ, "_data", None)
        direct = type(data) is dict and self._key is not None
        raw = data.get(self._key) if direct else environ.get(self.name)  # type: ignore[union-attr]
        value = self._seen.get(raw, _MISSING)
        if value is _MISSING:
            # bytes on POSIX, str on Windows, None when not set
            text = raw if raw is None or type(raw) is str else environ.decodevalue(raw)  # type: ignore[attr-defined]
            if direct and text != environ.get(self.name):
                # the dict does not hold what os.environ says (a Python that keeps it otherwise):
                # read through os.environ.get from now on. Checked once per distinct value.
                self._key = None
                return self()
            value = self._parse(text)
            if len(self._seen) < _REMEMBERED:
                self._seen[raw] = value
        return value  # type: ignore[return-value]
