"""Fresh tensor and node names: the one rule every rewrite uses.

A name is `base` when nothing in the model (the graph and all its subgraphs) uses it, else the
first free `base_1`, `base_2`, ... `NameGenerator` walks the model once and remembers what it
handed out, so a rewrite emitting many nodes (or tensors not attached yet) stays unique;
`unique_name` is the one-off form.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx_graphsurgeon as gs

from q4c.graph import iter_graphs


def used_names(root: gs.Graph) -> set[str]:
    """Every tensor and node name in `root` and its subgraphs."""
    names: set[str] = set()
    for sub in iter_graphs(root):
        names.update(sub.tensors().keys())
        names.update(n.name for n in sub.nodes if n.name)
    return names


class NameGenerator:
    """Names unique in one model; `prefix` (when given, even empty) is prepended as `prefix/base`."""

    def __init__(self, root: gs.Graph, prefix: str | None = None) -> None:
        self.taken = used_names(root)
        self.prefix = prefix

    def __call__(self, base: str) -> str:
        stem = base if self.prefix is None else f"{self.prefix}/{base}"
        name, i = stem, 0
        while name in self.taken:
            i += 1
            name = f"{stem}_{i}"
        self.taken.add(name)
        return name

    def reserve(self, names: Iterable[str]) -> None:
        """Mark names as used (tensors added to the model by other means)."""
        self.taken.update(names)


def fresh_tag(root: gs.Graph, stem: str, strip: str = "") -> str:
    """A short tag ("q3" for `stem` "q") that no tensor or node name in `root` starts with as
    "<tag>." (also after removing the prefix `strip`): names "<tag>.<label>" are then fresh.

    Decoders q4c appends name their tensors and nodes this way, not after the weight they
    decode: a name is stored once per reference, so a 60-character weight name repeated over a
    DequantizeLinear -> Cast chain costs more bytes than a small weight's scales."""
    names = used_names(root)
    prefixes = {n.split(".", 1)[0] for n in names}
    if strip:
        prefixes |= {n[len(strip):].split(".", 1)[0] for n in names if n.startswith(strip)}
    i = 0
    while f"{stem}{i}" in prefixes:
        i += 1
    return f"{stem}{i}"


def unique_name(root: gs.Graph, base: str) -> str:
    """A name not yet used anywhere in `root` or its subgraphs (not reserved: call once per name
    actually added, or use a NameGenerator)."""
    return NameGenerator(root)(base)
