"""Small helper shared by the patch modules: replace an attribute once."""
from __future__ import annotations

import inspect
from typing import Any, Callable

_MARK = "__metasd_original__"


def wrap(owner: Any, name: str, make_wrapper: Callable[[Any], Any]) -> None:
    """Replace ``owner.name`` by ``make_wrapper(original)`` unless already done.

    The wrapper keeps a reference to the original so double application is
    detected and tests can reach the unpatched function. A property is wrapped
    through its getter (``make_wrapper`` receives and returns a getter).
    """
    if isinstance(prop := inspect.getattr_static(owner, name), property):
        if getattr(prop.fget, _MARK, None) is None:
            getter = make_wrapper(prop.fget)
            setattr(getter, _MARK, prop.fget)
            setattr(owner, name, property(getter))
        return
    original = getattr(owner, name)
    if getattr(original, _MARK, None) is not None:
        return
    wrapper = make_wrapper(original)
    setattr(wrapper, _MARK, original)
    setattr(owner, name, wrapper)


def original(fn: Any) -> Any:
    return getattr(fn, _MARK, fn)
