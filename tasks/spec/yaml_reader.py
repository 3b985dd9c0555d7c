"""Reading a spec file's YAML within bounds: size, nesting depth, nodes after alias expansion, and time.

A spec file is external input: the dag-processor parses every file of the pipelines folder every few seconds, so
one hostile or broken file must cost a bounded amount of time and memory and never stall the others. PyYAML
shares an anchored node between its aliases, so a 2 KB "billion laughs" file composes quickly but expands into
billions of values in whatever walks it next (validation, error messages, the spec hash). The loader therefore
counts every node *as expanded* while composing and stops at the first limit crossed.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, SequenceNode
from yaml.resolver import Resolver

from kiln.tasks.spec.base import SpecError


@dataclass(frozen=True)
class SpecLimits:
    """Bounds on reading one spec file. The shipped specs are 2 KB, 150 nodes and 5 levels deep."""

    max_bytes: int = 256 * 1024
    """Largest spec file, in bytes: data belongs in ``source.uri``, not in the spec."""
    max_depth: int = 32
    """Deepest nesting of mappings and lists."""
    max_nodes: int = 10_000
    """Most YAML nodes once every alias is expanded (an alias counts as the whole block it repeats)."""
    parse_budget_s: float = 2.0
    """Time allowed to read one file; a file past it is reported, and the other files keep their own budgets."""

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) >= 0 or (f.name != "parse_budget_s" and getattr(self, f.name) < 1):
                raise ValueError(f"SpecLimits.{f.name} must be positive, got {getattr(self, f.name)!r}")


#: The limits every spec file is read with.
SPEC_LIMITS = SpecLimits()


class _LimitError(Exception):
    """A limit was crossed while composing; the message is the spec problem line."""


class _BoundedComposer(Composer):
    """PyYAML's composer, bounding depth, expanded node count and time while it builds the node graph."""

    def _bound(self, limits: SpecLimits, deadline: float) -> None:
        self._limits = limits
        self._deadline = deadline
        self._depth = 0
        # Expanded size of each finished node, by identity: an alias reuses its anchor's node, so its size is
        # known without walking it, and a node still being composed (an alias to it is recursive) has none.
        self._sizes: dict[int, int] = {}
        self._expanded = 0  # nodes so far with every alias expanded: the whole document's size, kept as it grows

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        limits = self._limits
        if time.monotonic() > self._deadline:
            raise _LimitError(f"reading took longer than {limits.parse_budget_s:g} s (SpecLimits.parse_budget_s); "
                              "a spec is a short file of settings: simplify this one")
        event = self.peek_event()
        line = event.start_mark.line + 1 if event.start_mark else 0
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if id(node) not in self._sizes:
                raise _LimitError(f"the alias *{event.anchor} at line {line} refers to itself (a recursive "
                                  "structure); a spec is a tree: remove that alias")
            self._count(self._sizes[id(node)], line)
            return node
        self._count(1, line)
        self._depth += 1
        if self._depth > limits.max_depth:
            raise _LimitError(f"nesting deeper than {limits.max_depth} levels at line {line} "
                              "(SpecLimits.max_depth); a spec needs a handful of levels: flatten this structure")
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        size = 1
        if isinstance(node, SequenceNode):
            size += sum(self._sizes[id(child)] for child in node.value)
        elif isinstance(node, MappingNode):
            size += sum(self._sizes[id(k)] + self._sizes[id(v)] for k, v in node.value)
        self._sizes[id(node)] = size
        return node

    def _count(self, nodes: int, line: int) -> None:
        self._expanded += nodes
        if self._expanded > self._limits.max_nodes:
            raise _LimitError(f"more than {self._limits.max_nodes} YAML nodes once aliases are expanded, at line "
                              f"{line} (SpecLimits.max_nodes): aliases (*name) that repeat large blocks multiply "
                              "(an alias bomb), and a spec is a short file of settings; write the values out or "
                              "remove the aliases")


class _PyLoader(_BoundedComposer, yaml.SafeLoader):
    """The bounded safe loader in pure Python."""

    def __init__(self, text: str, limits: SpecLimits, deadline: float):
        yaml.SafeLoader.__init__(self, text)
        self._bound(limits, deadline)


_LOADERS: list[type] = [_PyLoader]
if yaml.__with_libyaml__:
    from yaml.cyaml import CParser

    class _CLoader(_BoundedComposer, CParser, SafeConstructor, Resolver):  # type: ignore[misc]
        """The bounded safe loader on libyaml's parser (3x faster; composing stays in Python, bounded)."""

        def __init__(self, text: str, limits: SpecLimits, deadline: float):
            CParser.__init__(self, text)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)
            self._bound(limits, deadline)

    _LOADERS.insert(0, _CLoader)


def read_spec_yaml(path: str | Path, limits: SpecLimits = SPEC_LIMITS) -> Any:
    """The parsed YAML document of the spec file ``path``, read within ``limits``.

    Raises:
        SpecError: the file is unreadable, not a regular file, too large, not UTF-8, not valid YAML, or crosses
            a limit; the message names the file, the limit and what to change.
    """
    source = str(path)
    deadline = time.monotonic() + limits.parse_budget_s
    try:
        # Non-blocking, so that a FIFO named like a spec cannot stall the parse; the checks use the opened file.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise SpecError(source, [f"cannot read the file: {exc.strerror}"]) from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise SpecError(source, ["not a regular file (a FIFO, device or folder is never a spec); remove it "
                                     "from the pipelines folder or rename it without .yaml/.yml"])
        raw = f.read(limits.max_bytes + 1)
    if len(raw) > limits.max_bytes:
        raise SpecError(source, [f"the file is larger than {limits.max_bytes} bytes (SpecLimits.max_bytes); keep "
                                 "data out of the spec (point source.uri at it) and shorten long text"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(source, [f"not UTF-8 text ({exc}); save the file as UTF-8"]) from None
    loader = _LOADERS[0](text, limits, deadline)
    try:
        return loader.get_single_data()
    except _LimitError as exc:
        raise SpecError(source, [str(exc)]) from None
    except yaml.YAMLError as exc:
        raise SpecError(source, [f"not valid YAML: {exc}"]) from None
    except ValueError as exc:  # e.g. an integer literal longer than Python converts (4,300 digits)
        raise SpecError(source, [f"not valid YAML: {exc}"]) from None
    finally:
        loader.dispose()
