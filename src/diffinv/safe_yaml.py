"""Every YAML the project reads goes through :func:`load`: the safe loader, bounded.

``yaml.safe_load`` runs no code, but it still expands aliases: a few hundred bytes of nested
``&a [*b, *b, ...]`` anchors ("billion laughs") stand for billions of values the moment anything
walks them. A study may use an anchor to repeat a block (``train: &ft {...}`` then ``*ft``), so
aliases are allowed, but the number of values the document stands for once every alias is
expanded is counted on its node graph (shared nodes counted once per use, without expanding
anything) and bounded, as are the text and its nesting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from diffinv.errors import UserError

MAX_BYTES = 1 << 20  # a study or config file is a few KiB; a saved config.yaml of a run a few more
MAX_VALUES = 100_000  # values once aliases are expanded; a real study has a few hundred
MAX_DEPTH = 64


class YamlError(UserError, yaml.YAMLError):
    """A YAML text is refused (too large once expanded, too deep); every ``except yaml.YAMLError`` reports it as bad YAML."""


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader with bounded nesting."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        depth = getattr(self, "_depth", 0)
        if depth > MAX_DEPTH:
            raise YamlError(f"{self.name}: nested more than {MAX_DEPTH} levels deep; configs are a few levels deep")
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        # A key written twice keeps its last value silently in PyYAML: the first (maybe the one meant) would be lost.
        seen: set[Any] = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if key.value in seen:
                    raise YamlError(f"{self.name}: the key {key.value!r} is written twice in one mapping (line "
                                    f"{key.start_mark.line + 1}); keep one")
                seen.add(key.value)
        return super().construct_mapping(node, deep=deep)


def expanded_size(node: yaml.Node) -> int:
    """How many values ``node`` stands for with every alias expanded: each node's size computed once (its aliases share
    the node object), so a bomb is measured in microseconds, never built."""

    def children(n: yaml.Node) -> list[yaml.Node]:
        if isinstance(n, yaml.SequenceNode):
            return list(n.value)
        if isinstance(n, yaml.MappingNode):
            return [x for pair in n.value for x in pair]
        return []

    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(node, False)]
    while stack:  # post-order, iteratively: a node's size once all its children's are known
        n, ready = stack.pop()
        if id(n) in sizes:
            continue
        if ready:
            sizes[id(n)] = min(1 + sum(sizes[id(c)] for c in children(n)), MAX_VALUES + 1)
        else:
            stack.append((n, True))
            stack.extend((c, False) for c in children(n) if id(c) not in sizes)
    return sizes[id(node)]


def load(text: str, source: str = "<text>") -> Any:
    """The value of YAML ``text`` (``source`` names it in messages); over 1 MiB, 64 levels or 100,000 expanded values is
    refused."""
    if len(text) > MAX_BYTES:
        raise YamlError(f"{source} is {len(text):,} characters; a YAML config is at most {MAX_BYTES:,} (is it the right file?)")
    loader = _BoundedLoader(text)
    loader.name = source
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if expanded_size(node) > MAX_VALUES:
            raise YamlError(f"{source}: its aliases (*name) expand to more than {MAX_VALUES:,} values (a 'billion laughs' "
                            f"file?); a config is a few hundred; write the values out or use fewer aliases")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read(path: str | Path) -> Any:
    """:func:`load` of a file, read only up to the bound."""
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        text = fh.read(MAX_BYTES + 1)
    return load(text, str(path))
