"""Loading, converting, walking and saving ONNX graphs (onnx-graphsurgeon underneath)."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import google.protobuf.message
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from q4c import external_data
from q4c.errors import ConfigError, ModelLoadError

logger = logging.getLogger(__name__)

#: The oldest default-domain opset q4c accepts; older exports lack ops q4c relies on.
MIN_OPSET = 11
#: Opset q4c emits: the first with INT4/UINT4 and block-wise Q/DQ.
TARGET_OPSET = 21
#: IR version written: onnx 1.23 defaults to 14, which onnxruntime 1.31 refuses; 10 is the
#: first with INT4/UINT4 and is read by every onnxruntime q4c supports.
IR_VERSION = 10
#: protobuf cannot serialize a message over 2 GiB: larger models keep weights as external data.
_PROTOBUF_LIMIT = 2**31 - 1
MS_DOMAIN = "com.microsoft"


def load(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read and validate an ONNX file, with external data, failing with one clear line."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
        external = external_data.has_external_data(model)
        if external:  # relative locations are resolved beside the model, as onnx.load does
            onnx.load_external_data_for_model(model, str(path.parent))
    except (google.protobuf.message.DecodeError, RuntimeError, ValueError) as e:
        raise ModelLoadError(f"{path}: not a readable ONNX model (truncated or not protobuf): {e}") from e
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read: {e}") from e
    except onnx.checker.ValidationError as e:  # onnx.load checks external data paths as it reads them
        raise ModelLoadError(f"{path}: cannot read its external data: {' '.join(str(e).split())}") from e
    if not model.graph.node and not model.graph.output:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph found)")
    opset = default_opset(model)
    if opset is None:
        raise ModelLoadError(f"{path}: imports no default-domain opset; not an ONNX model q4c can read")
    if opset < MIN_OPSET:
        raise ModelLoadError(f"{path}: opset {opset} < minimum {MIN_OPSET}; re-export with opset >= {MIN_OPSET}")
    try:
        # by path for external data: the checker would otherwise get the whole model serialized
        # (a transient copy of every weight, and impossible past protobuf's 2 GiB)
        onnx.checker.check_model(str(path) if external else model)
    except UnicodeDecodeError as e:  # a name or string attribute with bytes that are not UTF-8
        raise ModelLoadError(f"{path}: invalid ONNX model: a string field is not valid UTF-8 ({e.reason} at byte "
                             f"{e.start}); the file is damaged") from e
    except (onnx.checker.ValidationError, ValueError) as e:  # ValueError: C++ protobuf rejects bytes Python read
        # One line: the checker's message may continue over lines (a node dump after "of node:").
        first = " ".join(str(e).split())[:300]
        shapeless = [v.name for v in (*model.graph.input, *model.graph.output)
                     if v.type.HasField("tensor_type") and not v.type.tensor_type.HasField("shape")]
        if "'shape' of 'type' is required" in first and shapeless:  # the checker does not say which
            first += f" (no shape on {', '.join(map(repr, shapeless))}; re-export with shapes, dims may be symbolic)"
        raise ModelLoadError(f"{path}: invalid ONNX model: {first}") from e
    _check_initializer_sizes(model, path)
    _check_strings(model, path)
    return model


def _check_strings(model: onnx.ModelProto, path: Path) -> None:
    """Names are text: protobuf hands back `bytes` for a string field that is not valid UTF-8
    (the checker does not always look), which later breaks every `str` operation on it."""

    def bad(values) -> str | None:
        for v in values:
            if isinstance(v, bytes):
                return v.decode("utf-8", "backslashreplace")
        return None

    for graph in iter_graph_protos(model.graph):
        names = [graph.name, *(v.name for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer))]
        for node in graph.node:
            names += [node.name, node.op_type, node.domain, *node.input, *node.output, *(a.name for a in node.attribute)]
        found = bad(names)
        if found is not None:
            raise ModelLoadError(f"{path}: invalid ONNX model: the name {found!r} is not valid UTF-8; the file is damaged")
    found = bad(v for p in model.metadata_props for v in (p.key, p.value))
    if found is not None:
        raise ModelLoadError(f"{path}: invalid ONNX model: metadata {found!r} is not valid UTF-8; the file is damaged")


#: bits per element of the dtypes whose storage size is fixed (onnx's checker does not compare
#: an initializer's data with its dims; numpy_helper.to_array then fails with a bare ValueError)
_SUB_BYTE_BITS = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4, onnx.TensorProto.FLOAT4E2M1: 4,
                  getattr(onnx.TensorProto, "INT2", -1): 2, getattr(onnx.TensorProto, "UINT2", -1): 2}
_TYPED_FIELDS = {onnx.TensorProto.FLOAT: "float_data", onnx.TensorProto.INT64: "int64_data",
                 onnx.TensorProto.DOUBLE: "double_data", onnx.TensorProto.INT32: "int32_data"}


def _check_initializer_sizes(model: onnx.ModelProto, path: Path) -> None:
    """Every initializer holds as much data as its dims and data type say (a flipped data_type
    or a dims edit otherwise surfaces later as an unexplained reshape error)."""
    for graph in iter_graph_protos(model.graph):
        for t in graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL or any(d < 0 for d in t.dims):
                continue
            n = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1
            if t.HasField("raw_data"):
                try:
                    bits = _SUB_BYTE_BITS.get(t.data_type) or 8 * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                except (KeyError, TypeError):
                    continue  # strings and unknown types: left to the checker and the ops
                want = (n * bits + 7) // 8
                have = len(t.raw_data)
            elif t.data_type in _TYPED_FIELDS:
                want, have = n, len(getattr(t, _TYPED_FIELDS[t.data_type]))
            else:
                continue
            if have != want:
                kind = onnx.TensorProto.DataType.Name(t.data_type) if t.data_type in onnx.TensorProto.DataType.values() else t.data_type
                raise ModelLoadError(f"{path}: initializer {t.name!r} declares {kind}{list(t.dims)} ({want} "
                                     f"{'bytes' if t.HasField('raw_data') else 'values'}) but holds {have}; "
                                     f"the file is damaged or was edited")


def default_opset(model: onnx.ModelProto) -> int | None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return None


def convert_opset(model: onnx.ModelProto, target: int = TARGET_OPSET, *, consume: bool = False) -> onnx.ModelProto:
    """Convert to `target` with onnx's version converter (bumping opset_import alone breaks
    graphs: ReduceMean axes, Unsqueeze/Split arity, ...). Models at or above `target` pass.

    `consume`: the caller drops `model` afterwards, so its weights move into the result (emptied
    in `model` tensor by tensor) instead of existing twice."""
    opset = default_opset(model)
    if opset is not None and opset >= target:
        return model
    try:
        # The converter serializes its input: it gets the model without its large weights (no
        # copy through C++, no 2 GiB limit), which are copied into the result afterwards.
        converted = onnx.version_converter.convert_version(external_data.skeleton(model), target)
    except Exception as e:  # the C++ converter raises bare RuntimeError/IndexError on odd graphs
        raise ModelLoadError(
            f"cannot convert opset {opset} to {target}: {e}; re-export the model at opset >= {target}"
        ) from e
    try:
        external_data.restore(converted, model, consume=consume)
    except KeyError as e:
        raise ModelLoadError(f"cannot convert opset {opset} to {target}: the converter dropped initializer "
                             f"{e.args[0]!r}; re-export the model at opset >= {target}") from e
    converted.ir_version = max(converted.ir_version, IR_VERSION)
    keep_declared_value_info(converted, model)  # the copies passes time must optimize like the input
    return converted


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def export_model(graph: gs.Graph, like: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Export to a ModelProto at `IR_VERSION`, keeping the opsets and metadata of `like`."""
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = IR_VERSION
    if like is not None:
        del model.metadata_props[:]
        model.metadata_props.extend(like.metadata_props)
        model.producer_name = like.producer_name or model.producer_name
    _ensure_domains(model)
    hoist_shared_initializers(model)
    return model


def hoist_shared_initializers(model: onnx.ModelProto) -> int:
    """Store once, in the main graph, an initializer that several subgraphs hold identically.

    graph-surgeon exports a constant used by nested graphs (the If branches real exports use to
    switch on batch size or sample rate) as an initializer of every one of them, so the same
    weight codes would be written several times. Subgraphs read main-graph initializers as outer-
    scope values, so one copy serves all. Returns the number of subgraph copies removed."""
    main = model.graph
    main_names = {t.name for t in main.initializer} | {v.name for v in main.input}
    main_names |= {o for n in main.node for o in n.output}
    held: dict[str, list[tuple[onnx.GraphProto, int]]] = {}
    for sub in list(iter_graph_protos(main))[1:]:
        for i, t in enumerate(sub.initializer):
            held.setdefault(t.name, []).append((sub, i))
    removed: dict[int, set[int]] = {}
    owners: dict[int, onnx.GraphProto] = {}
    for name, places in held.items():
        if len(places) < 2 or name in main_names:
            continue
        first = places[0][0].initializer[places[0][1]]
        key = first.SerializeToString()
        if any(sub.initializer[i].SerializeToString() != key for sub, i in places[1:]):
            continue  # same name, different values: leave them where they are
        hoisted = main.initializer.add()
        hoisted.CopyFrom(first)
        for sub, i in places:
            removed.setdefault(id(sub), set()).add(i)
            owners[id(sub)] = sub
    for key, indices in removed.items():
        sub = owners[key]
        kept = [t for i, t in enumerate(sub.initializer) if i not in indices]
        del sub.initializer[:]
        sub.initializer.extend(kept)
    return sum(len(v) for v in removed.values())


def _ensure_domains(model: onnx.ModelProto) -> None:
    """Import every domain a node uses (com.microsoft ops added by passes need their opset)."""
    used = {n.domain for g in iter_graph_protos(model.graph) for n in g.node}
    have = {imp.domain for imp in model.opset_import}
    for domain in sorted(used - have - {"", "ai.onnx"}):
        model.opset_import.append(onnx.helper.make_opsetid(domain, 1))


def keep_declared_value_info(model: onnx.ModelProto, original: onnx.ModelProto) -> int:
    """Drop the value_info entries `original` did not declare (the version converter's inferred
    shapes, graph-surgeon's typed intermediates), in every graph; returns how many. With them
    ONNX Runtime fuses Add + LayerNormalization into SkipLayerNormalization, which ran the
    conformer 7-10 % slower than FP32 (ORT 1.32, 1 thread): the output must optimize like its input."""
    declared = {v.name for sub in iter_graph_protos(original.graph) for v in sub.value_info}
    dropped = 0
    for sub in iter_graph_protos(model.graph):
        kept = [v for v in sub.value_info if v.name in declared]
        dropped += len(sub.value_info) - len(kept)
        del sub.value_info[:]
        sub.value_info.extend(kept)
    return dropped


def iter_graph_protos(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graph_protos(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graph_protos(g)


def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """The graph and every nested subgraph (If branches, Loop/Scan bodies), outermost first."""
    yield graph
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                yield from iter_graphs(value)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    if isinstance(item, gs.Graph):
                        yield from iter_graphs(item)


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node that writes `tensor` (in gs, `tensor.inputs` are producers), or None."""
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    """A copy of the nodes that read `tensor`, across every graph level it is visible in."""
    return list(tensor.outputs)


def unique_name(graph: gs.Graph, base: str) -> str:
    """A tensor/node name not yet used anywhere in `graph` or its subgraphs (q4c.names has the rule)."""
    from q4c import names  # q4c.names builds on iter_graphs above

    return names.unique_name(graph, base)


def _used_names(graph: gs.Graph) -> set[str]:
    from q4c import names

    return names.used_names(graph)


def op_histogram(model: onnx.ModelProto | gs.Graph) -> dict[str, int]:
    """Op type counts over the graph and all subgraphs; non-default domains as 'domain::Op'."""
    counts: collections.Counter[str] = collections.Counter()
    if isinstance(model, gs.Graph):
        for g in iter_graphs(model):
            counts.update(n.op if n.domain in ("", "ai.onnx", None) else f"{n.domain}::{n.op}" for n in g.nodes)
    else:
        for g in iter_graph_protos(model.graph):
            counts.update(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in g.node)
    return dict(sorted(counts.items()))


def fingerprint(model: onnx.ModelProto) -> str:
    """A digest of the serialized model: equal digests mean an unchanged graph."""
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def check(model: onnx.ModelProto) -> None:
    """The full ONNX checker (with shape inference); raises onnx.checker.ValidationError."""
    onnx.checker.check_model(model, full_check=True)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` (with the permissions
    a plain open() would give it, not mkstemp's owner-only 0600), on failure it is removed, so a
    failed write never leaves a partial file."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent if str(path.parent) else ".")
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from e
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except OSError as e:  # disk full, a directory in the way, ...: one line, nothing left behind
        tmp_path.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def check_writable(path: str | os.PathLike[str], what: str, directory: bool = False) -> None:
    """Fail in one line, before anything is computed or written, if `path` (a file, or with
    `directory` a directory) cannot be written: a compile must not write its output and then
    fail on --save-plan or --report, leaving the output of a failed run behind."""
    path = Path(path)
    folder = path if directory else (path.parent if str(path.parent) else Path("."))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".q4c-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot write there: {e.strerror or e}") from e


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file (plan, calibration table, report) atomically, like `save`."""
    with atomic_write(path, suffix=".tmp") as tmp_path:
        tmp_path.write_text(text)


def write_json(path: str | os.PathLike[str], doc: object, indent: int = 2) -> None:
    """Write a JSON document (plan, calibration table) atomically, keys sorted: an interrupted
    --save-plan / --save-calib leaves no partial file."""
    write_text(path, json.dumps(doc, indent=indent, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike[str], what: str) -> object:
    """The JSON document at `path`, or a one-line ConfigError: "<path>: cannot read <what>: ..."."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{path}: cannot read {what}: {e}") from e


def save(model: onnx.ModelProto, path: str | os.PathLike[str]) -> int:
    """Write atomically: a temporary file beside `path`, then rename. Returns bytes written.

    Models whose protobuf would exceed 2 GiB keep their weights in `<name>.data` beside it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data.approx_bytes(model) > _PROTOBUF_LIMIT:
        _save_with_external_data(model, path)
        return path.stat().st_size
    with atomic_write(path) as tmp_path:
        with open(tmp_path, "wb") as f:
            f.write(model.SerializeToString())
    return path.stat().st_size


def _save_with_external_data(model: onnx.ModelProto, path: Path) -> None:
    """`path` and `<name>.data` written in a staging directory beside them, then renamed into
    place (data first): an interrupted or failed save leaves neither half-written, and two
    compiles to one path never write into the same data file."""
    data_name = path.name + ".data"
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        onnx.save_model(model, str(staging / path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        os.replace(staging / data_name, path.parent / data_name)
        os.replace(staging / path.name, path)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def make_constant(name: str, values: np.ndarray) -> gs.Constant:
    """A gs.Constant for any dtype onnx.numpy_helper knows, sub-byte ml_dtypes included
    (gs's own exporter cannot pack INT4/INT2, so the TensorProto is built here)."""
    proto = numpy_helper.from_array(np.asarray(values), name)
    return gs.Constant(name, LazyValues(proto))


def is_float_constant(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant) and np.dtype(tensor.dtype) in (np.float32, np.float16, np.float64)
