"""Declared types checked at run time, for configuration values and checkpoint metadata.

``conform(value, tp, where)`` returns ``value`` as type ``tp`` or raises :class:`TypeMismatch`
naming the place (``optim.betas``, ``state.history[2].val_acc``), what it expects in words and
what came. Supported: ``bool``, ``int``, ``float`` (ints widen), ``str``, ``None``, unions (members tried in order, so ``int | float``
keeps ints as ints), ``list[T]``, ``tuple[T, ...]``, fixed ``tuple[T1, T2]``, ``dict[K, V]``,
``TypedDict`` (required keys and their types; other keys pass through) and ``Any``.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Union

__all__ = ["TypeMismatch", "conform", "describe_value", "type_text"]


class TypeMismatch(ValueError):
    """``where`` is missing, or is not ``expected``."""

    def __init__(self, where: str, expected: str, value: Any = None, missing: bool = False):
        self.where, self.expected, self.value, self.missing = where, expected, value, missing
        if missing:
            text = f"{where} is missing (expected {expected})"
        else:
            text = f"{where} must be {expected}, got {describe_value(value)}"
        super().__init__(text)


def describe_value(value: Any) -> str:
    """A value and its kind, briefly: ``5 (int)``, ``[0.9] (1 item)``."""
    if isinstance(value, (list, tuple)):
        n = len(value)
        text = repr(list(value))
        text = text if len(text) <= 80 else text[:77] + "..."
        return f"{text} ({n} item{'s' * (n != 1)})"
    text = repr(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _is_variadic(args: tuple) -> bool:
    return len(args) == 2 and args[1] is Ellipsis


_WORDS = {
    bool: ("true or false", "booleans"),
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
    type(None): ("null", "nulls"),
    Any: ("any value", "values"),
}


def type_text(tp: Any, plural: bool = False) -> str:
    """A declared type in words: ``tuple[float, float]`` -> 'a list of 2 numbers'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in _WORDS:
        return _WORDS[tp][plural]
    if _is_union(tp):
        return " or ".join(type_text(a, plural) for a in args)
    if typing.is_typeddict(tp):
        keys = ", ".join(sorted(tp.__required_keys__))
        return f"mappings with {keys}" if plural else f"a mapping with {keys}"
    if origin in (list, tuple):
        if origin is list or _is_variadic(args):
            what = f"of {type_text(args[0], True)}" if args else ""
        elif len(set(args)) == 1:
            what = f"of {len(args)} {type_text(args[0], True)}"
        else:
            what = "of " + ", ".join(type_text(a) for a in args)
        return f"lists {what}".rstrip() if plural else f"a list {what}".rstrip()
    if origin is dict or tp is dict:
        value = type_text(args[1], True) if args and args[1] is not Any else "values"
        return f"mappings of names to {value}" if plural else f"a mapping of names to {value}"
    return getattr(tp, "__name__", str(tp))


def conform(value: Any, tp: Any, where: str) -> Any:
    """``value`` as type ``tp`` (ints widen to floats, lists to tuples); else TypeMismatch."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if _is_union(tp):
        for member in args:
            try:
                return conform(value, member, where)
            except TypeMismatch:
                pass
        raise TypeMismatch(where, type_text(tp), value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeMismatch(where, type_text(tp), value)
    if tp in (bool, int, str, type(None)):
        ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
        if not ok:
            raise TypeMismatch(where, type_text(tp), value)
        return value
    if typing.is_typeddict(tp):
        if not isinstance(value, dict):
            raise TypeMismatch(where, type_text(tp), value)
        hints = typing.get_type_hints(tp)
        out = dict(value)
        for key in sorted(tp.__required_keys__ | tp.__optional_keys__):
            if key in value:
                out[key] = conform(value[key], hints[key], f"{where}.{key}")
            elif key in tp.__required_keys__:
                raise TypeMismatch(f"{where}.{key}", type_text(hints[key]), missing=True)
        return out
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeMismatch(where, type_text(tp), value)
        kind = list if origin is list else tuple
        if origin is list or _is_variadic(args):
            item = args[0] if args else Any
            return kind(conform(v, item, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise TypeMismatch(where, type_text(tp), value)
        return tuple(conform(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        key_tp, value_tp = args or (Any, Any)
        if not isinstance(value, dict) or not all(_fits(k, key_tp) for k in value):
            raise TypeMismatch(where, type_text(tp), value)
        return {k: conform(v, value_tp, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"type {tp!r} of {where} is not supported")  # a declaration needs adding


def _fits(value: Any, tp: Any) -> bool:
    try:
        conform(value, tp, "")
    except TypeMismatch:
        return False
    return True
