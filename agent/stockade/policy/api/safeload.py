"""YAML and JSON text -> plain dicts, lists and scalars, within fixed limits.

Policy text is hostile input (API bodies, pasted text in the web UI). This module never
crashes, recurses or stalls on it: every problem is a ``ReadError`` that says where it is.

YAML: one pass over libyaml's events (its parser is iterative) builds the documents
directly; PyYAML's composer and constructor (recursive, and blind to alias expansion)
are not used. On the way it enforces:

- nesting depth (``Limits.depth``, collections; a document's root counts as 1);
- nodes, an alias counting as the size of what it expands to (``Limits.nodes``), and the
  nodes aliases add on their own (``Limits.alias_nodes``: the checks after loading walk
  the expanded tree, so a few hundred bytes of anchors must not stand for millions of
  nodes); an alias to a node that is still open (a recursive alias) is refused;
- tags: only the standard str, int, float, bool, null, seq and map;
- mapping keys are strings (a plain ``<<`` is PyYAML's merge key and works as there);
- integers up to ``Limits.int_digits`` decimal digits (Python's own conversion limit).

Plain scalars resolve exactly as PyYAML's SafeLoader resolves them (YAML 1.1: ``0x1f``,
``017`` octal, ``1_000``, ``1:30`` sexagesimal, ``yes``/``off``, ``~``), with its own
table of implicit resolvers, except timestamps: a plain ``2001-12-14`` stays a string.

JSON: ``json.loads`` (bare NaN/Infinity are refused, they are not JSON), then an
iterative walk checks depth and nodes; nesting too deep for ``json``'s C scanner
becomes the same depth error, found by a token scan.

Size: the caller checks ``Limits.bytes`` before decoding (``read_file``, ``check_size``).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml import events as ev
from yaml.resolver import Resolver

_Parser: Any
try:
    from yaml._yaml import CParser as _Parser  # libyaml: the normal case
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    _Parser = yaml.SafeLoader


@dataclass(frozen=True)
class Limits:
    bytes: int = 16 * 1024 * 1024
    depth: int = 64
    nodes: int = 2_000_000
    alias_nodes: int = 100_000
    int_digits: int = 4300


LIMITS = Limits()


class ReadError(Exception):
    """A problem at ``path`` (keys and indexes) of stream document ``doc`` (None: not
    inside a document). ``containers`` are the (partly built) collections along the
    path, outermost first; ``before`` the documents already read. ``line``/``column``
    count from 1."""

    def __init__(self, msg: str, *, doc: int | None = None, path: tuple = (),
                 containers: tuple = (), before: tuple = (), line: int | None = None,
                 column: int | None = None):
        self.msg, self.doc, self.path, self.containers = msg, doc, path, containers
        self.before, self.line, self.column = before, line, column
        super().__init__(msg)

    @property
    def detail(self) -> str:
        """The message with the line and column, where the message lacks them."""
        if self.line is None or self.msg.startswith("cannot parse"):
            return self.msg
        return f"{self.msg} (line {self.line}, column {self.column})"


def _show(value: Any, limit: int = 40) -> str:
    """repr() of a value for an error message, cut to about ``limit`` characters."""
    text = repr(value[:limit + 1] if isinstance(value, str) else value)
    return text if len(text) <= limit + 2 else text[:limit] + "..."


# ---------------------------------------------------------------- size and files
def check_size(text: str, limits: Limits = LIMITS) -> bytes:
    """The UTF-8 bytes of ``text``, or ReadError if it is too large or not encodable."""
    if len(text) > limits.bytes:  # every character is at least one byte
        raise ReadError(_too_large(limits))
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ReadError(f"not valid Unicode text: {exc.reason} at character {exc.start}") from None
    if len(data) > limits.bytes:
        raise ReadError(_too_large(limits))
    return data


def read_file(path: str | Path, limits: Limits = LIMITS) -> str:
    """A file's text, reading at most ``limits.bytes`` + 1 bytes; ReadError if it is
    larger or not UTF-8. OSError passes through (the caller names the file)."""
    with open(path, "rb") as f:
        data = f.read(limits.bytes + 1)
    if len(data) > limits.bytes:
        raise ReadError(_too_large(limits))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ReadError(f"not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line} "
                        f"(offset {exc.start}: {exc.reason})") from None


def _too_large(limits: Limits) -> str:
    mib, rest = divmod(limits.bytes, 1024 * 1024)
    return f"larger than {mib} MiB" if mib and not rest else f"larger than {limits.bytes:,} bytes"


# ---------------------------------------------------------------- scalars
class _Merge:
    """A plain ``<<`` key."""

    def __repr__(self):
        return "<<"


_MERGE = _Merge()


class _Refused(Exception):
    """Input the reader refuses (a scalar that is not of its tag's type, a limit); the
    reader adds where it is."""


_BOOLS = {"yes": True, "no": False, "true": True, "false": False, "on": True, "off": False}
_STR, _INT, _FLOAT, _BOOL, _NULL, _SEQ, _MAP = (
    f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map"))
_ALLOWED_TAGS = "!!str, !!int, !!float, !!bool, !!null, !!seq and !!map"


_SEXAGESIMAL = "(?::[0-5]?[0-9])+"


def _linear(rx: re.Pattern) -> re.Pattern:
    """PyYAML's regex with its sexagesimal group possessive: the same strings match
    (nothing after the group can use a part of it back), but without a backtracking
    state per repetition (about 1 GB for a 16 MiB ``1:1:1...``)."""
    return re.compile(rx.pattern.replace(_SEXAGESIMAL, _SEXAGESIMAL + "+"), rx.flags)


def _implicit_regex(tag: str) -> re.Pattern:
    return next(_linear(rx) for rxs in Resolver.yaml_implicit_resolvers.values()
                for t, rx in rxs if t == tag)


_INT_RX, _FLOAT_RX, _NULL_RX = (_implicit_regex(t) for t in (_INT, _FLOAT, _NULL))
_DECIMAL_RX = re.compile(r"^[-+]?[0-9][0-9_]*$")


def _to_int(text: str, limits: Limits):
    value = text.replace("_", "")
    sign = -1 if value[0] == "-" else 1
    if value[0] in "+-":
        value = value[1:]
    big = 10 ** limits.int_digits
    too_big = f"integer too large (more than {limits.int_digits:,} digits)"
    try:
        if value == "0":
            return 0
        if value.startswith("0b"):
            n = int(value[2:], 2)
        elif value.startswith("0x"):
            n = int(value[2:], 16)
        elif value[0] == "0":
            n = int(value, 8)
        elif ":" in value:  # sexagesimal; the first part is not 0, so each part is a
            n = 0            # factor of 60 at least: int_digits parts are far too many
            for part in value.split(":", limits.int_digits):
                if len(part) > limits.int_digits:
                    raise _Refused(too_big)
                n = n * 60 + int(part)
                if n >= big:
                    raise _Refused(too_big)
        elif len(value) > limits.int_digits:
            raise _Refused(too_big)
        else:
            n = int(value)
    except ValueError:
        raise _Refused(f"{_show(text)} is not an integer") from None
    if n >= big:
        raise _Refused(too_big)
    return sign * n


# PyYAML's own computation (an int base times a float part) overflows at about 174
# parts; more than this many are refused before any work.
_FLOAT_PARTS = 100


def _to_float(text: str) -> float:
    # PyYAML's SafeConstructor.construct_yaml_float, step for step.
    value = text.replace("_", "").lower()
    sign = -1 if value[0] == "-" else 1
    if value[0] in "+-":
        value = value[1:]
    if value == ".inf":
        return sign * math.inf
    if value == ".nan":
        return math.nan
    if ":" in value:
        if value.count(":") > _FLOAT_PARTS:
            raise _Refused(f"{_show(text)} is not a float (more than {_FLOAT_PARTS} ':' parts)")
        digits = [float(part) for part in value.split(":")]
        digits.reverse()
        base, total = 1, 0.0
        try:
            for digit in digits:
                total += digit * base
                base *= 60
        except OverflowError:
            raise _Refused(f"{_show(text)} is not a float (too large)") from None
        return sign * total
    try:
        return sign * float(value)
    except ValueError:  # not reached through the regexes; kept so nothing else escapes
        raise _Refused(f"{_show(text)} is not a float") from None


def _plain_resolvers(limits: Limits) -> dict:
    """First character -> [(regex, convert)], from PyYAML's own implicit resolver table
    (a snapshot: later changes to it do not reach this reader)."""
    convert = {
        _BOOL: lambda v: _BOOLS[v.lower()],
        _FLOAT: _to_float,
        _INT: lambda v: _to_int(v, limits),
        _NULL: lambda v: None,
        "tag:yaml.org,2002:merge": lambda v: _MERGE,
    }
    # timestamp, value (``=``) and yaml stay strings.
    table = {}
    for first, resolvers in Resolver.yaml_implicit_resolvers.items():
        table[first] = [(_linear(rx).match, convert[tag]) for tag, rx in resolvers if tag in convert]
    return table


def _explicit(tag: str, text: str, limits: Limits):
    """A scalar with a standard tag; _Refused if the text is not of that type."""
    if tag == _STR:
        return text
    if tag == _INT:
        if _INT_RX.match(text):
            return _to_int(text, limits)
        raise _Refused(f"{_show(text)} is not an integer")
    if tag == _FLOAT:
        if _FLOAT_RX.match(text) or _DECIMAL_RX.match(text):
            return _to_float(text)
        raise _Refused(f"{_show(text)} is not a float")
    if tag == _BOOL:
        if text.lower() in _BOOLS:
            return _BOOLS[text.lower()]
        raise _Refused(f"{_show(text)} is not a boolean")
    if tag == _NULL:
        if _NULL_RX.match(text):
            return None
        raise _Refused(f"{_show(text)} is not null")
    raise _Refused(_tag_refused(tag, "scalar"))


def _tag_refused(tag: str, kind: str) -> str:
    name = "!!" + tag[len("tag:yaml.org,2002:"):] if tag.startswith("tag:yaml.org,2002:") else tag
    if name in ("!!seq", "!!map", "!!str", "!!int", "!!float", "!!bool", "!!null"):
        return f"tag {name} cannot be used on a {kind}"
    return f"tag {_show(name)[1:-1]} is not allowed (only {_ALLOWED_TAGS})"


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# ---------------------------------------------------------------- YAML
_OPEN = object()  # an anchor whose node is still being read
_NOKEY = object()  # a mapping waiting for its next key


class _YAMLReader:
    """One pass over the parser's events. The collection being filled is kept in
    locals (``cur``, ``cur_map``, ``cur_key``); the ones around it are on ``stack``."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.resolvers = _plain_resolvers(limits)
        self.docs: list = []
        self.doc: int | None = None

    def read(self, data: bytes) -> list:
        parser = _Parser(data)
        try:
            return self._loop(parser.get_event)
        except yaml.YAMLError as exc:
            raise self._syntax(exc, data) from None
        finally:
            parser.dispose()

    def _error(self, msg: str, event, frames: list) -> ReadError:
        """frames: [(container, is_map, pending key)], outermost first."""
        path: list = []
        for value, is_map, key in frames:
            if not is_map:
                path.append(len(value))
            elif key is not _NOKEY:
                path.append("<<" if key is _MERGE else key)
        mark = event.start_mark if event is not None else None
        return ReadError(msg, doc=self.doc, path=tuple(path),
                         containers=tuple(f[0] for f in frames), before=tuple(self.docs),
                         line=mark.line + 1 if mark else None,
                         column=mark.column + 1 if mark else None)

    def _syntax(self, exc: yaml.YAMLError, data: bytes) -> ReadError:
        frames = getattr(self, "_frames", [])
        if isinstance(exc, yaml.reader.ReaderError):
            line = data.count(b"\n", 0, exc.position) + 1
            return self._error(f"cannot parse at line {line}: unacceptable character "
                               f"#x{exc.character:04x}: {exc.reason}", None, frames)
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return self._error(f"cannot parse{where}: {problem}", None, frames)

    def _loop(self, get) -> list:  # noqa: C901 - one flat dispatch over event types, for speed
        limits = self.limits
        max_nodes, max_alias, max_depth = limits.nodes, limits.alias_nodes, limits.depth
        resolvers, docs = self.resolvers, self.docs
        Scalar, MapStart, SeqStart = ev.ScalarEvent, ev.MappingStartEvent, ev.SequenceStartEvent
        MapEnd, SeqEnd, Alias = ev.MappingEndEvent, ev.SequenceEndEvent, ev.AliasEvent
        DocStart, DocEnd, StreamEnd = ev.DocumentStartEvent, ev.DocumentEndEvent, ev.StreamEndEvent
        nodes = alias_nodes = 0
        anchors: dict = {}
        cache: dict = {}
        root = e = None
        # saved frames: (container, is_map, key, anchor, first node, merges)
        stack: list = []
        cur: Any = None
        cur_map, cur_key, cur_anchor, cur_start, cur_merges = None, _NOKEY, None, 0, None
        try:
            while True:
                e = get()
                t = type(e)
                if t is Scalar:
                    nodes += 1
                    if nodes > max_nodes:
                        raise _Refused(_too_many(max_nodes))
                    tag, text = e.tag, e.value
                    # libyaml marks a "!"-tagged scalar, even a quoted one, as plain, and
                    # PyYAML then resolves it as if untagged: so does this reader.
                    if (tag is None or tag == "!") and e.implicit[0]:
                        value = cache.get(text, cache)
                        if value is cache:
                            value = text
                            for match, convert in resolvers.get(text[:1], ()):
                                if match(text):
                                    value = convert(text)
                                    break
                            if len(text) <= 32:
                                cache[text] = value
                        if value is _MERGE and not (cur_map and cur_key is _NOKEY):
                            value = "<<"  # only a key merges
                    elif tag is None or tag == "!" or tag == _STR:
                        value = text
                    else:
                        value = _explicit(tag, text, limits)
                    if e.anchor is not None:
                        if e.anchor in anchors:
                            raise _Refused(_twice(e.anchor))
                        anchors[e.anchor] = (value, 1)
                elif t is MapStart or t is SeqStart:
                    nodes += 1
                    if nodes > max_nodes:
                        raise _Refused(_too_many(max_nodes))
                    if len(stack) >= max_depth:
                        raise _Refused(f"nesting deeper than {max_depth} levels")
                    is_map = t is MapStart
                    if cur_map and cur_key is _NOKEY:
                        raise _Refused(f"keys must be strings, not {'dict' if is_map else 'list'}")
                    tag = e.tag
                    if tag is not None and tag != "!" and tag != (_MAP if is_map else _SEQ):
                        raise _Refused(_tag_refused(tag, "mapping" if is_map else "sequence"))
                    if e.anchor is not None:
                        if e.anchor in anchors:
                            raise _Refused(_twice(e.anchor))
                        anchors[e.anchor] = _OPEN
                    stack.append((cur, cur_map, cur_key, cur_anchor, cur_start, cur_merges))
                    cur, cur_map, cur_key = ({} if is_map else []), is_map, _NOKEY
                    cur_anchor, cur_start, cur_merges = e.anchor, nodes - 1, None
                    continue
                elif t is MapEnd or t is SeqEnd:
                    value = cur
                    if cur_merges:
                        value = {}
                        for m in cur_merges:
                            value.update(m)
                        value.update(cur)
                    if cur_anchor is not None:
                        anchors[cur_anchor] = (value, nodes - cur_start)
                    cur, cur_map, cur_key, cur_anchor, cur_start, cur_merges = stack.pop()
                elif t is Alias:
                    entry = anchors.get(e.anchor)
                    if entry is None:
                        raise _Refused(f"alias *{_show(e.anchor)[1:-1]} refers to no anchor")
                    if entry is _OPEN:
                        raise _Refused(f"alias *{_show(e.anchor)[1:-1]} is recursive (it is "
                                       "inside the node it refers to)")
                    value, size = entry
                    if value is _MERGE and not (cur_map and cur_key is _NOKEY):
                        value = "<<"
                    nodes += size
                    alias_nodes += size
                    if nodes > max_nodes:
                        raise _Refused(_too_many(max_nodes))
                    if alias_nodes > max_alias:
                        raise _Refused(f"aliases expand to more than {max_alias:,} nodes")
                elif t is DocStart:
                    self.doc = len(docs)
                    anchors = {}
                    root = None
                    continue
                elif t is DocEnd:
                    docs.append(root)
                    self.doc = None
                    continue
                elif t is StreamEnd:
                    return docs
                else:
                    continue
                # a complete node: put it into the collection being filled
                if cur_map is None:
                    root = value
                elif not cur_map:
                    cur.append(value)
                elif cur_key is _NOKEY:
                    if type(value) is not str and value is not _MERGE:
                        raise _Refused(f"keys must be strings, not {_type_name(value)}")
                    cur_key = value
                else:
                    if cur_key is _MERGE:
                        cur_merges = (cur_merges or []) + _merge_sources(value)
                    else:
                        cur[cur_key] = value
                    cur_key = _NOKEY
        except _Refused as exc:
            frames = [(f[0], f[1], f[2]) for f in stack[1:]]
            if cur_map is not None:
                frames.append((cur, cur_map, cur_key))
            raise self._error(str(exc), e, frames) from None
        except yaml.YAMLError:
            self._frames = [(f[0], f[1], f[2]) for f in stack[1:]]
            if cur_map is not None:
                self._frames.append((cur, cur_map, cur_key))
            raise


def _too_many(max_nodes: int) -> str:
    return f"more than {max_nodes:,} nodes (an alias counts as what it expands to)"


def _twice(anchor: str) -> str:
    return f"anchor &{_show(anchor)[1:-1]} is defined twice"


def _merge_sources(value) -> list:
    """The mappings a merge key's value adds, in the order to apply them: as PyYAML's
    SafeConstructor.flatten_mapping, the mapping's own keys override merged ones, and
    in a list the earlier mapping wins."""
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        return value[::-1]
    raise _Refused(f"a merge key (<<) needs a mapping or a list of mappings, not "
                   f"{_type_name(value)}")


def read_yaml(data: bytes, limits: Limits = LIMITS) -> list:
    """Every document of a YAML stream (None for an empty one). ``data``: UTF-8 bytes
    (``check_size`` gives them)."""
    return _YAMLReader(limits).read(data)


# ---------------------------------------------------------------- JSON
class _NotJSON:
    """A bare NaN, Infinity or -Infinity, or an integer past the digit limit."""

    def __init__(self, msg: str):
        self.msg = msg


_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{},]')


def read_json(text: str, limits: Limits = LIMITS) -> Any:
    def parse_int(s: str):
        if len(s) - (s[0] == "-") > limits.int_digits:
            return _NotJSON(f"integer too large (more than {limits.int_digits:,} digits)")
        return int(s)

    def parse_constant(s: str):
        return _NotJSON(f"{s} is not valid JSON (numbers must be finite)")

    try:
        data = json.loads(text, parse_int=parse_int, parse_constant=parse_constant)
    except RecursionError:
        path = _json_path(text, depth=limits.depth)
        raise ReadError(f"nesting deeper than {limits.depth} levels", doc=0, path=path) from None
    except json.JSONDecodeError as exc:
        raise ReadError(f"cannot parse at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                        doc=0, path=_json_path(text, pos=exc.pos),
                        line=exc.lineno, column=exc.colno) from None
    _check_tree(data, limits)
    return data


def _check_tree(root: Any, limits: Limits) -> None:
    """Depth, node count and refused numbers, without recursion."""
    if isinstance(root, _NotJSON):
        raise ReadError(root.msg, doc=0)
    if not isinstance(root, (dict, list)):
        return
    nodes, max_nodes, max_depth = 1, limits.nodes, limits.depth
    containers = [root]
    iters = [iter(root.items() if isinstance(root, dict) else enumerate(root))]
    keys: list = [None]
    while iters:
        for key, child in iters[-1]:
            keys[-1] = key
            nodes += 2 if type(containers[-1]) is dict else 1  # a key is a node too
            if nodes > max_nodes:
                _tree_fail(f"more than {max_nodes:,} nodes", keys, containers)
            t = type(child)
            if t is dict or t is list:
                if len(iters) >= max_depth:
                    _tree_fail(f"nesting deeper than {max_depth} levels", keys, containers)
                containers.append(child)
                iters.append(iter(child.items() if t is dict else enumerate(child)))
                keys.append(None)
                break
            if t is _NotJSON:
                _tree_fail(child.msg, keys, containers)
        else:
            iters.pop()
            keys.pop()
            containers.pop()


def _tree_fail(msg: str, keys: list, containers: list):
    raise ReadError(msg, doc=0, path=tuple(keys), containers=tuple(containers))


def _json_path(text: str, *, pos: int | None = None, depth: int | None = None) -> tuple:
    """The path at offset ``pos``, or where a collection opens deeper than ``depth``,
    by scanning strings and brackets (the text before that point is valid JSON)."""
    frames: list = []  # [is_map, key or index]
    for m in _JSON_TOKEN.finditer(text, 0, len(text) if pos is None else pos):
        tok = m.group()
        if tok in "[{":
            if depth is not None and len(frames) >= depth:
                break
            frames.append([tok == "{", None if tok == "{" else 0])
        elif tok in "]}":
            if frames:
                frames.pop()
        elif not frames:
            continue
        elif tok == ",":
            frames[-1][1] = None if frames[-1][0] else frames[-1][1] + 1
        elif frames[-1][0] and frames[-1][1] is None:
            try:
                frames[-1][1] = json.loads(tok)
            except ValueError:  # the string the decoder stopped in: good enough for a path
                frames[-1][1] = tok[1:-1]
    path = []
    for _is_map, key in frames:
        if key is None:
            break
        path.append(key)
    return tuple(path)
