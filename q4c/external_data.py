"""Models too large for one protobuf message (2 GiB): weights kept out of the C++ round trips.

onnx's checker, version converter and ONNX Runtime's loader all take a *serialized* model from
Python, which fails past 2 GiB and otherwise costs a full transient copy of every weight. These
helpers hand them a skeleton instead: the same model whose large initializers carry no data
(`Placeholder`s, marked as external data at a location that cannot exist), and put the weights
back (converter), or write them one at a time to a data file ONNX Runtime reads itself
(sessions: `write_for_session`; ONNX Runtime copies initializers into its own memory either way,
so buffers handed to it in memory were a second copy of every weight while it loaded).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx

#: initializers at least this large travel outside the skeleton
MIN_DETACHED_BYTES = 1024
#: location of a placeholder's (nonexistent) external data: names the data as q4c's, not a file
PLACEHOLDER = "q4c-detached-initializer"


def _is_large(t: onnx.TensorProto) -> bool:
    return t.data_location != onnx.TensorProto.EXTERNAL and t.HasField("raw_data") and len(t.raw_data) >= MIN_DETACHED_BYTES


def approx_bytes(model: onnx.ModelProto) -> int:
    """The model's serialized size, from its initializers' shapes: ModelProto.ByteSize() under
    upb serializes the whole model (a copy of every weight) and fails past 2 GiB."""
    from q4c.graph import iter_graph_protos

    total = 0
    for graph in iter_graph_protos(model.graph):
        for t in graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                continue
            n = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1
            try:
                item = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            except (KeyError, TypeError):
                item = 8
            total += n * item
    nodes = sum(len(graph.node) for graph in iter_graph_protos(model.graph))
    return total + 200 * nodes  # node protos: a rough bound, weights dominate


def has_external_data(model: onnx.ModelProto) -> bool:
    """True if some initializer (any graph level) names an external data file."""
    from q4c.graph import iter_graph_protos

    return any(t.data_location == onnx.TensorProto.EXTERNAL
               for graph in iter_graph_protos(model.graph) for t in graph.initializer)


def _placeholder(t: onnx.TensorProto) -> onnx.TensorProto:
    p = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims)
    p.data_location = onnx.TensorProto.EXTERNAL
    entry = p.external_data.add()
    entry.key, entry.value = "location", PLACEHOLDER
    return p


def _copy_fields(src, dst, skip: str) -> None:
    for desc, value in src.ListFields():
        if desc.name == skip:
            continue
        if desc.is_repeated:
            getattr(dst, desc.name).extend(value)
        elif desc.message_type is not None:
            getattr(dst, desc.name).CopyFrom(value)
        else:
            setattr(dst, desc.name, value)


def skeleton(model: onnx.ModelProto, keep: Callable[[onnx.TensorProto], bool] | None = None) -> onnx.ModelProto:
    """A copy of `model` whose large main-graph initializers are placeholders (no data copied).

    `keep(tensor)` true keeps a large initializer's data anyway."""
    out = onnx.ModelProto()
    _copy_fields(model, out, skip="graph")
    _copy_fields(model.graph, out.graph, skip="initializer")
    for t in model.graph.initializer:
        out.graph.initializer.append(_placeholder(t) if _is_large(t) and not (keep and keep(t)) else t)
    return out


def placeholders(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL and any(
                e.key == "location" and e.value == PLACEHOLDER for e in t.external_data):
            yield t


def restore(skel: onnx.ModelProto, source: onnx.ModelProto, consume: bool = False) -> None:
    """Fill `skel`'s placeholders (in place) with the data of `source`'s initializers of the same
    name; `consume` empties each source tensor once copied (one tensor at a time in two places,
    not the whole model: for a caller that drops `source` anyway)."""
    full = {t.name: t for t in source.graph.initializer}
    for t in list(placeholders(skel)):
        original = full.get(t.name)
        if original is None:
            raise KeyError(t.name)
        t.CopyFrom(original)
        if consume:
            original.ClearField("raw_data")


#: data file offsets are multiples of this (ONNX Runtime may map page-aligned external data)
ALIGN = 4096


def write_for_session(model: onnx.ModelProto, directory: Path) -> Path:
    """`model` as `directory`/model.onnx (its skeleton) plus model.onnx.data (the large main-graph
    initializers, written one tensor at a time: never a second copy of all of them in memory),
    for ONNX Runtime to load from the path. Returns the model path; the caller deletes the
    directory once the session exists (ONNX Runtime holds its own copy of the weights by then)."""
    skel = skeleton(model)
    large = {t.name for t in placeholders(skel)}
    path = directory / "model.onnx"
    data = path.with_name(path.name + ".data")
    with open(data, "wb") as f:
        by_name = {t.name: t for t in model.graph.initializer if t.name in large}
        for t in placeholders(skel):
            f.write(b"\0" * ((-f.tell()) % ALIGN))
            offset = f.tell()
            f.write(by_name[t.name].raw_data)  # one tensor's bytes alive at a time
            del t.external_data[:]
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(f.tell() - offset))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
    path.write_bytes(skel.SerializeToString())
    return path
