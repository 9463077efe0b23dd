"""Recipe <-> plain dict <-> TOML, `--set` overrides, canonical hash.

Conversion is strict: unknown keys and wrong types are errors naming the
dotted field; ints are accepted where floats are expected (and stored as
floats, so `1` and `1.0` hash equal); bools are never accepted as numbers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import typing
from functools import lru_cache
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

import tomli_w

from ..errors import RecipeError


@lru_cache(maxsize=None)
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dc(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def to_dict(obj) -> Any:
    """Dataclass tree -> plain dict (tuples become lists, map keys strings)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in sorted(obj.items(), key=lambda kv: _sort_key(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _sort_key(k):
    # integer map keys sort numerically, others as text
    return (0, k, "") if isinstance(k, int) else (1, 0, str(k))


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value, tp, field: str):
    origin = typing.get_origin(tp)
    if _is_dc(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"must be a table, got {type(value).__name__}", field)
        return from_dict(tp, value, field)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"must be true or false, got {value!r}", field)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"must be an integer, got {value!r}", field)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"must be a number, got {value!r}", field)
        value = float(value)
        if not math.isfinite(value):
            raise RecipeError(f"must be finite, got {value!r}", field)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"must be a string, got {value!r}", field)
        return value
    if origin is tuple:
        (item_tp, _ell) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"must be a list, got {value!r}", field)
        return tuple(_convert(v, item_tp, f"{field}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise RecipeError(f"must be a table, got {value!r}", field)
        out = {}
        for k, v in value.items():
            kf = f"{field}.{k}"
            if key_tp is int:
                try:
                    key = int(k) if not isinstance(k, bool) else None
                except (TypeError, ValueError):
                    key = None
                if key is None or str(key) != str(k).strip():
                    raise RecipeError(f"key must be an integer layer index, got {k!r}", kf)
            else:
                key = str(k)
            out[key] = _convert(v, val_tp, kf)
        return out
    raise TypeError(f"unsupported field type {tp!r} at {field}")  # programming error


def from_dict(cls, data: dict, prefix: str = ""):
    """Plain dict -> dataclass, strict about unknown keys and types.

    Keys missing from `data` take the dataclass default.
    """
    if not isinstance(data, dict):
        raise RecipeError(f"must be a table, got {type(data).__name__}", prefix or "<root>")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            close = [n for n in sorted(names) if n.startswith(str(key)[:3])]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"unknown key{hint}; allowed: {', '.join(sorted(names))}", where)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            where = f"{prefix}.{f.name}" if prefix else f.name
            value = _convert(data[f.name], hints[f.name], where)
            if typing.get_origin(hints[f.name]) is dict and f.default_factory is not dataclasses.MISSING:
                # maps (per-family settings, patches) fill in from their defaults:
                # a recipe names only the entries it changes
                value = {**f.default_factory(), **value}
            kwargs[f.name] = value
    return cls(**kwargs)


def deep_merge(base: dict, top: dict) -> dict:
    """`top` over `base`; tables merge key by key, everything else replaces."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def set_dotted(data: dict, dotted: str, value) -> dict:
    """Return a copy of `data` with `dotted` (a.b.c) set to `value`."""
    parts = dotted.split(".")
    if not all(parts):
        raise RecipeError(f"bad dotted name {dotted!r}", dotted, "--set")
    out = dict(data)
    cur = out
    for p in parts[:-1]:
        nxt = cur.get(p)
        nxt = dict(nxt) if isinstance(nxt, dict) else {}
        cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value
    return out


def parse_set(item: str) -> tuple[str, Any]:
    """`key=value` with value read as a TOML value, or as a bare string."""
    if "=" not in item:
        raise RecipeError(f"--set expects key=value, got {item!r}", item, "--set")
    key, raw = item.split("=", 1)
    key = key.strip()
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def canonical_json(obj) -> str:
    return json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def canonical_hash(obj) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def dumps_toml(data: dict) -> str:
    return tomli_w.dumps(_toml_safe(data))


def _toml_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _toml_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_toml_safe(v) for v in obj]
    return obj


def loads_toml(text: str, file: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        raise RecipeError(f"malformed TOML: {e}", "", file, int(m.group(1)) if m else None) from None


_HEADER = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\"' -]+?)\s*\]\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_.\"'-]+)\s*=")


def key_lines(text: str) -> dict[str, int]:
    """Map each dotted key written in a TOML text to its 1-based line.

    Good enough for error messages: handles table headers, dotted keys and
    inline tables (whose inner keys map to the line of the table's key).
    """
    lines: dict[str, int] = {}
    table = ""
    for n, line in enumerate(text.splitlines(), 1):
        h = _HEADER.match(line)
        if h and not line.lstrip().startswith("[["):
            table = h.group(1).replace('"', "").replace("'", "").replace(" ", "")
            lines.setdefault(table, n)
            continue
        k = _KEY.match(line)
        if k:
            key = k.group(1).replace('"', "").replace("'", "")
            dotted = f"{table}.{key}" if table else key
            lines[dotted] = n
    return lines


def line_of(lines: dict[str, int], field: str) -> int | None:
    """Line of `field` or of its nearest written ancestor."""
    f = re.sub(r"\[\d+\]", "", field)
    while f:
        if f in lines:
            return lines[f]
        if "." not in f:
            break
        f = f.rsplit(".", 1)[0]
    return None
