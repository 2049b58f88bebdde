"""A spec's YAML read with limits: file size, nesting, aliases and their expansion, all checked while composing.

A YAML alias shares a node instead of copying it, so a small document can stand for an exponentially large (or,
through a self-reference, infinite) one: every later walk over it (line numbers, validation, dumps) would expand
it. The composer therefore records each node's expanded size and height as it builds the node, from those of its
children, and refuses a document past the limits before anything walks it.
"""

from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 512 * 1024
MAX_DEPTH = 64  # levels of nesting, counting through aliases; a spec needs fewer than 10
MAX_ALIASES = 100
MAX_NODES = 10_000  # scalars, lists and mappings once every alias is expanded; a spec has a few hundred


class DocumentError(Exception):
    """A YAML document refused before validation: malformed, too large, too deep, or aliased too much."""

    def __init__(self, message: str, line: int | None = None):
        self.message, self.line = message, line
        super().__init__(message)


def read_document(path: Path) -> tuple[Any, dict[tuple, int]]:
    """The YAML file at `path` as plain data, and the 1-based line of every key path in it."""
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_BYTES + 1)
    except OSError as err:
        raise DocumentError(f"cannot read the spec file: {err.strerror or err}") from None
    if len(data) > MAX_BYTES:
        raise DocumentError(f"the spec file is larger than {MAX_BYTES // 1024} KiB; a job spec is a few KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DocumentError(f"not a UTF-8 text file (byte {err.start} cannot be decoded); is it a YAML spec?") from None
    node = compose(text)
    return construct(node), key_lines(node)


def read_value(text: str) -> Any:
    """A YAML scalar or small collection (the value of a `--set`), under the same limits as a spec."""
    return construct(compose(text))


def compose(text: str) -> yaml.Node | None:
    """The single document's node graph; raise DocumentError past a limit or on malformed YAML."""
    if len(text) > MAX_BYTES:
        raise DocumentError(f"the YAML is longer than {MAX_BYTES // 1024} KiB; a job spec is a few KiB")
    try:
        loader = _LimitedLoader(text)  # the reader refuses control characters here, before any parsing
        try:
            return loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise DocumentError(f"malformed YAML: {getattr(err, 'problem', None) or err}", _line(mark)) from None


def construct(node: yaml.Node | None) -> Any:
    """Plain Python data of a composed node (safe types only)."""
    if node is None:
        return None
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise DocumentError(f"malformed YAML: {getattr(err, 'problem', None) or err}", _line(mark)) from None
    except (ValueError, OverflowError) as err:
        # An impossible date (2024-13-40) or an integer of thousands of digits: a scalar no field can take.
        raise DocumentError(f"a value cannot be read: {err}") from None
    finally:
        loader.dispose()


def key_lines(node: yaml.Node | None, prefix: tuple = ()) -> dict[tuple, int]:
    """Map every key path of a composed document to its 1-based line."""
    out: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, child in node.value:
            if not isinstance(key, yaml.ScalarNode):
                continue  # a list or mapping as a key: refused when the document is constructed
            path = (*prefix, key.value)
            out[path] = key.start_mark.line + 1
            out.update(key_lines(child, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, child in enumerate(node.value):
            out[(*prefix, i)] = child.start_mark.line + 1
            out.update(key_lines(child, (*prefix, i)))
    return out


class _LimitedLoader(yaml.SafeLoader):
    """A composer that counts aliases, refuses self-references, and bounds every node's expanded size and height."""

    def __init__(self, text: str):
        super().__init__(text)
        self.depth, self.aliases = 0, 0
        self.open_anchors: set[str] = set()
        self.expanded: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, height) with aliases expanded

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:  # type: ignore[override]
        event = self.peek_event()
        line = _line(event.start_mark)
        if isinstance(event, yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise DocumentError(f"more than {MAX_ALIASES} aliases (*name); write the values out", line)
            if event.anchor in self.open_anchors:
                raise DocumentError(f"alias *{event.anchor} refers to a node that contains it (a cycle)", line)
            return super().compose_node(parent, index)
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise DocumentError(f"nested deeper than {MAX_DEPTH} levels", line)
        anchor = getattr(event, "anchor", None)
        if anchor:
            self.open_anchors.add(anchor)
        try:
            node = super().compose_node(parent, index)
        finally:
            self.depth -= 1
            self.open_anchors.discard(anchor or "")
        self._measure(node, line)
        return node

    def _measure(self, node: yaml.Node, line: int | None) -> None:
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        sizes = [self.expanded.get(id(child), (1, 1)) for child in children]
        nodes = 1 + sum(n for n, _ in sizes)
        height = 1 + max((h for _, h in sizes), default=0)
        if nodes > MAX_NODES:
            raise DocumentError(f"expands to more than {MAX_NODES:,} values (through aliases?); a spec is small", line)
        if height > MAX_DEPTH:
            raise DocumentError(f"nested deeper than {MAX_DEPTH} levels once aliases are expanded", line)
        self.expanded[id(node)] = (nodes, height)


def _line(mark: Any) -> int | None:
    return mark.line + 1 if mark is not None else None
