"""Generate a Whisper-large-like FP32 encoder (about 636M parameters) as ONNX with external data.

Not committed (2.5 GB): run `python models/make_large.py [OUT_DIR]` (default ~/.cache/q4c/large/);
it writes OUT_DIR/whisper_large_enc.onnx and whisper_large_enc.onnx.data and prints the paths.

Architecture (Whisper large-v2/v3 encoder): mel [1, 80, frames] -> Conv1d(80->1280, k3, p1) ->
GELU -> Conv1d(1280->1280, k3, s2, p1) -> GELU -> [1, frames/2, 1280] + sinusoid-like position
table (1500 rows, sliced to the length) -> 32 pre-norm blocks (LayerNorm, 20-head self
attention with q/v/out biases and no k bias, LayerNorm, FFN 1280->5120->1280 with exact GELU)
-> LayerNorm. Opset 17 (LayerNormalization), GELU written as x * 0.5 * (1 + erf(x / sqrt 2)).

Weights are random with trained-like statistics (the things quantizers are sensitive to):
N(0, 1/fan_in) rows scaled per output channel by a log-normal factor (sigma 0.5), a few input
channels carrying outliers (1 % of them x6, as large transformers' outlier features), and
LayerNorm gains near 1 with a handful of large ones. Each tensor is written to the data file as
soon as it is drawn, so generation holds one tensor at a time (peak ~ one FFN matrix).

`--layers/--d-model/--heads/--ffn` make smaller members of the same family (tests and the
sensitivity benchmark use them).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

DEFAULT_DIR = Path.home() / ".cache" / "q4c" / "large"
NAME = "whisper_large_enc.onnx"
OPSET = 17
IR_VERSION = 10


class _Writer:
    """Initializers whose bytes go straight to one external data file (nothing kept in memory)."""

    def __init__(self, data_path: Path, threshold: int) -> None:
        self.data_path = data_path
        self.file = open(data_path, "wb")  # noqa: SIM115 (closed by close(), after the last tensor)
        self.threshold = threshold
        self.initializers: list[TensorProto] = []
        self.params = 0

    def add(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        self.params += array.size
        if array.nbytes < self.threshold:
            self.initializers.append(onnx.numpy_helper.from_array(array, name))
            return name
        offset = self.file.tell()
        pad = (-offset) % 4096  # page-aligned tensors: ONNX Runtime can map them
        self.file.write(b"\0" * pad)
        offset += pad
        self.file.write(array.tobytes())
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_path.name), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(tensor)
        return name

    def close(self) -> None:
        self.file.close()


class _Builder:
    def __init__(self, writer: _Writer, rng: np.random.Generator) -> None:
        self.w = writer
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.count = 0

    def tmp(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def node(self, op: str, inputs: list[str], base: str, **attrs) -> str:
        out = self.tmp(base)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out + "_node", **attrs))
        return out

    def const(self, name: str, values) -> str:
        return self.w.add(name, np.asarray(values))

    def matrix(self, name: str, fan_in: int, shape: tuple[int, ...], out_axis: int) -> str:
        """Trained-like weight: N(0, 1/fan_in), log-normal per-output-channel scales, 1 % outlier inputs."""
        w = self.rng.standard_normal(shape, dtype=np.float32)
        w *= np.float32(1.0 / math.sqrt(fan_in))
        out_scale = np.exp(self.rng.normal(0.0, 0.5, shape[out_axis])).astype(np.float32)
        bshape = [1] * len(shape)
        bshape[out_axis] = shape[out_axis]
        w *= out_scale.reshape(bshape)
        in_axis = 0 if out_axis != 0 else 1
        outliers = self.rng.choice(shape[in_axis], size=max(1, shape[in_axis] // 100), replace=False)
        index = [slice(None)] * len(shape)
        index[in_axis] = outliers
        w[tuple(index)] *= np.float32(6.0)
        return self.w.add(name, w)

    def vector(self, name: str, n: int, center: float, spread: float) -> str:
        v = (center + spread * self.rng.standard_normal(n)).astype(np.float32)
        if center == 1.0:  # a few large LayerNorm gains, as trained transformers have
            v[self.rng.choice(n, size=max(1, n // 200), replace=False)] *= 8.0
        return self.w.add(name, v)

    def gelu(self, x: str) -> str:
        half = self.node("Div", [x, "sqrt2"], "gelu_div")
        erf = self.node("Erf", [half], "gelu_erf")
        one_plus = self.node("Add", [erf, "one"], "gelu_add")
        prod = self.node("Mul", [x, one_plus], "gelu_mul")
        return self.node("Mul", [prod, "half"], "gelu")

    def linear(self, x: str, prefix: str, d_in: int, d_out: int, bias: bool = True) -> str:
        w = self.matrix(f"{prefix}.weight", d_in, (d_in, d_out), out_axis=1)  # stored [in, out] for MatMul
        y = self.node("MatMul", [x, w], prefix.replace(".", "_") + "_mm")
        if bias:
            b = self.vector(f"{prefix}.bias", d_out, 0.0, 0.02)
            y = self.node("Add", [y, b], prefix.replace(".", "_") + "_b")
        return y

    def layer_norm(self, x: str, prefix: str, d: int) -> str:
        gain = self.vector(f"{prefix}.weight", d, 1.0, 0.1)
        bias = self.vector(f"{prefix}.bias", d, 0.0, 0.05)
        return self.node("LayerNormalization", [x, gain, bias], prefix.replace(".", "_"), axis=-1, epsilon=1e-5)


def _attention(b: _Builder, x: str, prefix: str, d: int, heads: int) -> str:
    def split(t: str) -> str:  # [1, T, d] -> [1, heads, T, head_dim]
        r = b.node("Reshape", [t, "heads_shape"], "split")
        return b.node("Transpose", [r], "split_t", perm=[0, 2, 1, 3])

    q = split(b.linear(x, f"{prefix}.q_proj", d, d))
    k = split(b.linear(x, f"{prefix}.k_proj", d, d, bias=False))
    v = split(b.linear(x, f"{prefix}.v_proj", d, d))
    kt = b.node("Transpose", [k], "kt", perm=[0, 1, 3, 2])
    scores = b.node("MatMul", [q, kt], "scores")
    scaled = b.node("Mul", [scores, "attn_scale"], "scaled")
    probs = b.node("Softmax", [scaled], "probs", axis=-1)
    ctx = b.node("MatMul", [probs, v], "ctx")
    merged = b.node("Transpose", [ctx], "merge_t", perm=[0, 2, 1, 3])
    flat = b.node("Reshape", [merged, "model_shape"], "merge")
    return b.linear(flat, f"{prefix}.out_proj", d, d)


def build(out_dir: Path, *, layers: int = 32, d_model: int = 1280, heads: int = 20, ffn: int = 5120,
          mels: int = 80, positions: int = 1500, seed: int = 0, threshold: int = 1024,
          name: str = NAME) -> Path:
    """Write `out_dir/name` and `out_dir/name.data`; returns the model path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    writer = _Writer(out_dir / (name + ".data"), threshold)
    b = _Builder(writer, np.random.default_rng(seed))
    d = d_model
    for cname, value in (("sqrt2", math.sqrt(2.0)), ("one", 1.0), ("half", 0.5),
                         ("attn_scale", 1.0 / math.sqrt(d // heads))):
        b.const(cname, np.array(value, np.float32))
    b.const("heads_shape", np.array([1, -1, heads, d // heads], np.int64))
    b.const("model_shape", np.array([1, -1, d], np.int64))
    b.const("zero_1d", np.array([0], np.int64))
    b.const("one_1d", np.array([1], np.int64))

    c1 = b.matrix("conv1.weight", mels * 3, (d, mels, 3), out_axis=0)
    x = b.node("Conv", ["mel", c1, b.vector("conv1.bias", d, 0.0, 0.02)], "conv1", pads=[1, 1], kernel_shape=[3])
    x = b.gelu(x)
    c2 = b.matrix("conv2.weight", d * 3, (d, d, 3), out_axis=0)
    x = b.node("Conv", [x, c2, b.vector("conv2.bias", d, 0.0, 0.02)], "conv2", pads=[1, 1], strides=[2],
               kernel_shape=[3])
    x = b.gelu(x)
    x = b.node("Transpose", [x], "to_tokens", perm=[0, 2, 1])  # [1, T, d]
    # Whisper's sinusoids: position p, channel pair i: sin/cos(p / 10000^(i / (d/2 - 1)))
    inv = np.exp(-math.log(10000.0) * np.arange(d // 2) / (d // 2 - 1))
    angles = np.arange(positions)[:, None] * inv[None, :]
    b.const("embed_positions", np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32))
    shape = b.node("Shape", [x], "tokens_shape")
    length = b.node("Gather", [shape, "one_1d"], "tokens_len", axis=0)
    pos = b.node("Slice", ["embed_positions", "zero_1d", length, "zero_1d"], "pos")
    x = b.node("Add", [x, pos], "with_pos")
    for i in range(layers):
        p = f"layers.{i}"
        h = b.layer_norm(x, f"{p}.self_attn_layer_norm", d)
        x = b.node("Add", [x, _attention(b, h, f"{p}.self_attn", d, heads)], f"{p}_res1".replace(".", "_"))
        h = b.layer_norm(x, f"{p}.final_layer_norm", d)
        h = b.gelu(b.linear(h, f"{p}.fc1", d, ffn))
        x = b.node("Add", [x, b.linear(h, f"{p}.fc2", ffn, d)], f"{p}_res2".replace(".", "_"))
    x = b.layer_norm(x, "layer_norm", d)
    b.nodes.append(helper.make_node("Identity", [x], ["hidden"], name="hidden_node"))
    writer.close()

    graph = helper.make_graph(
        b.nodes, "whisper_large_like_encoder",
        [helper.make_tensor_value_info("mel", TensorProto.FLOAT, [1, mels, "frames"])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, "tokens", d])],
        initializer=writer.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="q4c models/make_large.py")
    onnx.helper.set_model_props(model, {"params": str(writer.params),
                                        "config": f"layers={layers} d_model={d} heads={heads} ffn={ffn} mels={mels}"})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(model.SerializeToString())
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=1280)
    parser.add_argument("--heads", type=int, default=20)
    parser.add_argument("--ffn", type=int, default=5120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=NAME)
    args = parser.parse_args(argv)
    path = build(args.out_dir, layers=args.layers, d_model=args.d_model, heads=args.heads, ffn=args.ffn,
                 seed=args.seed, name=args.name)
    params = next(p.value for p in onnx.load(str(path), load_external_data=False).metadata_props if p.key == "params")
    data = path.with_name(path.name + ".data")
    print(f"{path} ({path.stat().st_size:,} bytes)\n{data} ({data.stat().st_size:,} bytes)\nparams: {int(params):,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
