"""Strict readers for files a user (or an attacker) hands vlmpress: JSON, text, safetensors headers.

Each reader turns every way a file can be malformed into one :class:`~vlmpress.errors.VlmpressError`
(the caller picks the subclass) with the file name and what was wrong, instead of a decoder
traceback or a silently lenient parse:

* JSON: duplicate keys refused (Python would keep the last one silently), nesting depth and
  integer size bounded, ``NaN``/``Infinity`` refused unless asked for, UTF-8 required;
* text: UTF-8 required, size bounded;
* safetensors: the header is parsed here before the library sees the file -- its length bounded,
  duplicate tensor names refused (the Rust parser keeps one of them), every entry a known dtype,
  a shape of non-negative integers and offsets inside the file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from vlmpress.errors import VlmpressError

#: deeper JSON than this is refused (configs nest < 10 levels; the decoder recurses per level)
MAX_JSON_DEPTH = 64
#: integers with more digits than this are refused (no config value needs them)
MAX_INT_DIGITS = 64
#: safetensors headers larger than this are refused (the format's own limit is 100 MB)
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
SAFETENSORS_DTYPES = frozenset(
    {"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F16", "BF16", "F32", "F64",
     "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64"}
)


class _Refused(ValueError):
    """Raised inside the JSON decoder hooks; turned into the caller's error type."""


def _pairs_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"the key {key!r} appears twice in one object")
        out[key] = value
    return out


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer has {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS} are accepted)")
    return int(text)


def _no_constant(name: str) -> float:
    raise _Refused(f"it holds the non-standard constant {name}")


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (iterative: safe on any depth the decoder produced)."""
    depth, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            items = item.values()
        elif isinstance(item, list):
            items = item
        else:
            continue
        depth = max(depth, level)
        stack.extend((child, level + 1) for child in items)
    return depth


def loads_strict(text: str, where: str, error: type[VlmpressError] = VlmpressError, *, allow_nan: bool = False) -> Any:
    """``json.loads`` that refuses duplicate keys, huge integers, deep nesting (and NaN unless allowed)."""
    try:
        value = json.loads(
            text,
            object_pairs_hook=_pairs_without_duplicates,
            parse_int=_bounded_int,
            parse_constant=None if allow_nan else _no_constant,
        )
    except _Refused as err:
        raise error(f"{where} is refused: {err}") from None
    except RecursionError:
        raise error(f"{where} is refused: it is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    except (json.JSONDecodeError, ValueError) as err:
        raise error(f"{where} is not valid JSON: {str(err).splitlines()[0]}") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise error(f"{where} is refused: it is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
    return value


def read_text_strict(path: str | Path, what: str, error: type[VlmpressError] = VlmpressError, *, max_bytes: int | None = None) -> str:
    """A UTF-8 text file's content, or one clear error (missing, unreadable, too large, not UTF-8)."""
    path = Path(path)
    try:
        if max_bytes is not None and path.stat().st_size > max_bytes:
            raise error(f"{what} {path} is {path.stat().st_size} bytes, more than the {max_bytes} accepted")
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a directory, not a file") from None
    except OSError as err:
        raise error(f"{what} {path} cannot be read: {err.strerror or err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{what} {path} is not valid UTF-8 (byte {err.start}: {data[err.start:err.start + 1]!r}); save it as UTF-8") from None


def read_json_strict(path: str | Path, what: str, error: type[VlmpressError] = VlmpressError, *, max_bytes: int = 256 << 20, allow_nan: bool = False) -> Any:
    """A JSON file parsed by :func:`loads_strict` (UTF-8, size bounded)."""
    return loads_strict(read_text_strict(path, what, error, max_bytes=max_bytes), f"{what} {path}", error, allow_nan=allow_nan)


def read_safetensors_header(path: str | Path, error: type[VlmpressError] = VlmpressError) -> dict[str, tuple[str, list[int]]]:
    """Tensor name -> (dtype, shape) from a safetensors file's header, checked before any library reads it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise error(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_SAFETENSORS_HEADER, size - 8):
                raise error(f"{path} is corrupt: its header claims {length} bytes (file is {size} bytes)")
            raw = f.read(length)
    except OSError as err:
        raise error(f"{path} cannot be read: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{path} is corrupt: its header is not UTF-8 JSON") from None
    header = loads_strict(text, f"the safetensors header of {path}", error)
    if not isinstance(header, dict):
        raise error(f"{path} is corrupt: its header is not a JSON object")
    data_size = size - 8 - length
    out: dict[str, tuple[str, list[int]]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise error(f"{path} is corrupt: '__metadata__' must map strings to strings")
            continue
        ok = (
            isinstance(entry, dict)
            and set(entry) == {"dtype", "shape", "data_offsets"}
            and entry["dtype"] in SAFETENSORS_DTYPES
            and isinstance(entry["shape"], list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry["shape"])
            and isinstance(entry["data_offsets"], list)
            and len(entry["data_offsets"]) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in entry["data_offsets"])
            and 0 <= entry["data_offsets"][0] <= entry["data_offsets"][1] <= data_size
        )
        if not ok:
            raise error(f"{path} is corrupt: the header entry of tensor {name!r} is malformed ({str(entry)[:120]})")
        out[name] = (entry["dtype"], list(entry["shape"]))
    return out


#: YAML recipes are small: more aliases, or more values once aliases are expanded, is a bomb
MAX_YAML_ALIASES = 64
MAX_YAML_VALUES = 100_000
MAX_YAML_BYTES = 1 << 20


def _expanded_size(root) -> int:
    """Values a YAML node graph holds once every alias is expanded (memoised: linear in the graph)."""
    import yaml

    sizes: dict[int, int] = {}
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[id(node)] = 1
            continue
        kids = [x for pair in node.value for x in pair] if isinstance(node, yaml.MappingNode) else list(node.value)
        if children_done:
            sizes[id(node)] = min(1 + sum(sizes[id(k)] for k in kids), 1 << 62)
        else:
            stack.append((node, True))
            stack.extend((k, False) for k in kids if id(k) not in sizes)
    return sizes[id(root)]


def short_repr(value: Any, limit: int = 80) -> str:
    """A bounded ``repr`` for error messages (safe on huge or self-similar structures)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother, r.maxlong = 2, 4, 4, limit, limit, 40
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_yaml_strict(path: str | Path, what: str, error: type[VlmpressError] = VlmpressError) -> Any:
    """``yaml.safe_load`` of a UTF-8 file with duplicate keys, alias bombs and deep nesting refused."""
    import yaml

    text = read_text_strict(path, what, error, max_bytes=MAX_YAML_BYTES)

    class Loader(yaml.SafeLoader):
        aliases = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                Loader.aliases += 1
                if Loader.aliases > MAX_YAML_ALIASES:
                    raise _Refused(f"it uses more than {MAX_YAML_ALIASES} aliases (*name), which is an expansion bomb, not a recipe")
            return super().compose_node(parent, index)

        def get_single_node(self):
            node = super().get_single_node()
            if node is not None and _expanded_size(node) > MAX_YAML_VALUES:
                raise _Refused(f"its aliases expand to more than {MAX_YAML_VALUES} values, which is an expansion bomb, not a recipe")
            return node

        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(k, deep=True) for k, _ in node.value]
            dup = next((k for i, k in enumerate(keys) if _hashable(k) and k in keys[:i]), None)
            if dup is not None:
                raise _Refused(f"the key {short_repr(dup)} appears twice in one mapping")
            return super().construct_mapping(node, deep=deep)

    try:
        value = yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
    except _Refused as err:
        raise error(f"{what} {path} is refused: {err}") from None
    except RecursionError:
        raise error(f"{what} {path} is refused: it is nested too deeply") from None
    except yaml.YAMLError as err:
        raise error(f"{what} {path} is not valid YAML: {' '.join(str(err).split())[:200]}") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise error(f"{what} {path} is refused: it is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
    return value


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True
