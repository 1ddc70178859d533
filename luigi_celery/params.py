"""Luigi's ``Task.get_params``, remembered per task class in the dispatcher.

Luigi lists a class's parameters by walking ``dir(cls)`` on every call, so that a class
can gain parameters after it is defined; it calls it about 15 times per task it schedules
(the task's id, its string parameters, its repr, ...): on a wide DAG, 11% of the
dispatcher's CPU. :func:`install` makes the list remembered, and checked before each use,
so that it cannot go stale: it is used again only while the class and every class of its
MRO has as many attributes as when it was listed, and each parameter listed is still the
class's attribute of that name. A parameter added, removed or replaced is seen, on the
class or on any base. (The one change not seen: a parameter set on a class under a name
that class already had for something else; Luigi's own tests never do it, nor any pipeline
we know of.)
"""

from __future__ import annotations

import weakref
from typing import Any

import luigi

_luigis_get_params = luigi.Task.get_params.__func__  # type: ignore[attr-defined]

# class -> (the sizes of its MRO's namespaces, its parameters) when they were listed
_listed: weakref.WeakKeyDictionary[type, tuple[tuple[int, ...], list[tuple[str, Any]]]] = weakref.WeakKeyDictionary()


def _shape(cls: type) -> tuple[int, ...]:
    return tuple(len(vars(c)) for c in cls.__mro__)


def get_params(cls: type) -> list[tuple[str, Any]]:
    shape = _shape(cls)
    listed = _listed.get(cls)
    if listed is not None and listed[0] == shape and all(getattr(cls, n, None) is p for n, p in listed[1]):
        return list(listed[1])  # (a copy: callers may change the list they get, as Luigi's is new each time)
    params: list[tuple[str, Any]] = _luigis_get_params(cls)
    _listed[cls] = (shape, list(params))
    return params


def install() -> None:
    """Remember ``get_params`` for every task class in this process (idempotent)."""
    luigi.Task.get_params = classmethod(get_params)  # type: ignore[method-assign,assignment]


def uninstall() -> None:
    luigi.Task.get_params = classmethod(_luigis_get_params)  # type: ignore[method-assign,assignment]
