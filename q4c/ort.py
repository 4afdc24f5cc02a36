"""ONNX Runtime sessions the way q4c's outputs need them (session config from metadata)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ORT_STATE

from q4c import external_data
from q4c.errors import DataError, ModelLoadError

#: metadata_props key holding the ONNX Runtime session config entries a model needs (DESIGN.md 6).
SESSION_CONFIG_KEY = "q4c.ort_session_config"
#: ops ONNX Runtime has no low-bit kernel for: a DequantizeLinear weight feeding them is
#: executed on every call unless constant-folded at load with session.disable_quant_qdq.
#: models larger than this reach ONNX Runtime without their large weights serialized (a transient
#: copy of every weight, and impossible past protobuf's 2 GiB): see q4c.external_data
SESSION_DETACH_BYTES = 2**30
_NO_LOWBIT_KERNEL = {"LSTM", "GRU", "Conv", "ConvTranspose", "Gather", "Einsum", "Gemm", "RNN"}


def session_config(model: onnx.ModelProto) -> dict[str, str]:
    for prop in model.metadata_props:
        if prop.key == SESSION_CONFIG_KEY:
            try:
                return {str(k): str(v) for k, v in json.loads(prop.value).items()}
            except (ValueError, AttributeError) as e:  # JSONDecodeError, and UnicodeDecodeError on bytes
                raise ModelLoadError(f"metadata {SESSION_CONFIG_KEY} is not a JSON object: {e}") from e
    return {}


def set_session_config(model: onnx.ModelProto, config: Mapping[str, str]) -> None:
    for i, prop in enumerate(model.metadata_props):
        if prop.key == SESSION_CONFIG_KEY:
            del model.metadata_props[i]
            break
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                        SESSION_CONFIG_KEY: json.dumps(dict(sorted(config.items())))})


#: Ops that carry a dequantized constant on to its consumer (casts and the planes' arithmetic)
_DECODE_OPS = frozenset({"Cast", "Mul", "Add"})


def needed_session_config(model: onnx.ModelProto) -> tuple[dict[str, str], list[str]]:
    """The config a q4c output needs, and the op types that made it so.

    A constant-input DequantizeLinear feeding an op without a low-bit kernel would be executed on
    every call (measured 1.3-36x slower than FP32); `session.disable_quant_qdq` folds it at load,
    which restores FP32 speed with FP32 weights in memory (the file stays small).
    """
    initializers = set()
    slow: set[str] = set()
    from q4c.graph import iter_graph_protos

    graphs = list(iter_graph_protos(model.graph))
    for graph in graphs:
        initializers.update(t.name for t in graph.initializer)
    for graph in graphs:
        dq_outputs = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers}
        # float16 scales put a Cast between the DQ and its consumer; 6-bit planes (q4c.quant.planes)
        # a Mul and an Add on constants: values decoded from constants alone (nodes in order)
        for node in graph.node:
            if (node.op_type in _DECODE_OPS and dq_outputs.intersection(node.input)
                    and all(i in dq_outputs or i in initializers for i in node.input)):
                dq_outputs.add(node.output[0])
        for node in graph.node:
            if node.op_type in _NO_LOWBIT_KERNEL and dq_outputs.intersection(node.input):
                slow.add(node.op_type)
    if slow:
        return {"session.disable_quant_qdq": "1"}, sorted(slow)
    return {}, []


def make_session(
    model: onnx.ModelProto | str,
    *,
    threads: int | None = None,
    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    config: Mapping[str, str] | None = None,
) -> ort.InferenceSession:
    """A CPU session with the model's recorded session config (or `config`) applied."""
    proto = onnx.load(model) if isinstance(model, str) else model
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 4  # q4c reports ORT failures itself, once
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    for key, value in (session_config(proto) if config is None else config).items():
        options.add_session_config_entry(key, value)
    try:
        if external_data.approx_bytes(proto) > SESSION_DETACH_BYTES:  # large: ORT reads the weights from a file
            with tempfile.TemporaryDirectory(prefix="q4c-session-") as tmp:
                path = external_data.write_for_session(proto, Path(tmp))
                return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ModelLoadError(f"ONNX Runtime cannot load the model: {str(e).splitlines()[0]}") from e


def run(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs by name; ORT's runtime failures (mostly shapes the model cannot take) become a
    DataError naming the input shapes."""
    names = [o.name for o in session.get_outputs()]
    try:
        return dict(zip(names, session.run(names, dict(feeds)), strict=True))
    except (_ORT_STATE.Fail, _ORT_STATE.InvalidArgument, _ORT_STATE.RuntimeException) as e:
        shapes = ", ".join(f"{k} {list(np.shape(v))}" for k, v in feeds.items())
        raise DataError(f"ONNX Runtime cannot run the model on inputs {shapes}: "
                        f"{str(e).splitlines()[0][-300:]}") from e
