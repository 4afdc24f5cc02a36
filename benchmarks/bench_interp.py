"""Run time of q4c.interp against onnx.reference.ReferenceEvaluator on the same models and inputs.

Usage:
    python benchmarks/bench_interp.py [MODEL.onnx ...] [--reps N] [--inline]

Without arguments it times models/bilstm_am.onnx and models/conformer.onnx when present (inputs
from the .npz beside each model, keys = input names), else two graphs built inline: a 2-layer
bidirectional LSTM (hidden 256, 100 frames x 80 features) and a small Conformer-like block.
Both executors run the same feeds, interleaved, `--reps` times after one warm-up each; the
table reports median CPU time per run (process time: steadier than wall time on a shared
machine, and equal to it when the machine is idle, BLAS being single-threaded), the speed-up
by CPU and by wall time, and the largest difference between the two executors' outputs.
BLAS runs single-threaded for both (OPENBLAS_NUM_THREADS=1 unless already set): on a small
shared machine, threaded BLAS spins and swamps the differences being measured.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads OpenBLAS

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from q4c.timing import interleaved  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = [REPO / "models" / "bilstm_am.onnx", REPO / "models" / "conformer.onnx"]


def _init(rng: np.random.Generator, name: str, shape: tuple[int, ...], scale: float = 0.1) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def build_bilstm(rng: np.random.Generator, frames: int = 100, features: int = 80, hidden: int = 256,
                 layers: int = 2) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Stacked bidirectional LSTM acoustic model: [T, 1, F] -> [T, 1, 2H] per layer."""
    nodes, inits = [], []
    x, size = "x", features
    for layer in range(layers):
        inits += [_init(rng, f"W{layer}", (2, 4 * hidden, size)), _init(rng, f"R{layer}", (2, 4 * hidden, hidden)),
                  _init(rng, f"B{layer}", (2, 8 * hidden))]
        nodes.append(helper.make_node("LSTM", [x, f"W{layer}", f"R{layer}", f"B{layer}"], [f"y{layer}"],
                                      hidden_size=hidden, direction="bidirectional", name=f"lstm{layer}"))
        # Y [T, 2, 1, H] -> [T, 1, 2H]
        nodes.append(helper.make_node("Transpose", [f"y{layer}"], [f"yt{layer}"], perm=[0, 2, 1, 3]))
        nodes.append(helper.make_node("Reshape", [f"yt{layer}", "shape"], [f"h{layer}"]))
        x, size = f"h{layer}", 2 * hidden
    inits.append(numpy_helper.from_array(np.array([frames, 1, 2 * hidden], np.int64), "shape"))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, (frames, 1, features))]
    graph = helper.make_graph(nodes, "bilstm", inputs,
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return model, {"x": rng.standard_normal((frames, 1, features)).astype(np.float32)}


def build_conformer(rng: np.random.Generator, frames: int = 100, dim: int = 144, heads: int = 4,
                    kernel: int = 31) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """One Conformer-like block: FFN (Swish), self-attention (Softmax), depthwise Conv1d, LayerNorms."""
    d_head = dim // heads
    inits = [
        _init(rng, "ff1", (dim, 4 * dim)), _init(rng, "ff2", (4 * dim, dim)),
        _init(rng, "wq", (dim, dim)), _init(rng, "wk", (dim, dim)), _init(rng, "wv", (dim, dim)),
        _init(rng, "wo", (dim, dim)), _init(rng, "pw1", (dim, 2 * dim)), _init(rng, "pw2", (dim, dim)),
        _init(rng, "dw", (dim, 1, kernel)), _init(rng, "dwb", (dim,)),
        numpy_helper.from_array(np.ones(dim, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(dim, np.float32), "beta"),
        numpy_helper.from_array(np.array([frames, heads, d_head], np.int64), "split_heads"),
        numpy_helper.from_array(np.array([frames, dim], np.int64), "merge_heads"),
        numpy_helper.from_array(np.array(1 / np.sqrt(d_head), np.float32), "inv_sqrt_d"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        numpy_helper.from_array(np.array([1, dim, frames], np.int64), "to_conv"),
        numpy_helper.from_array(np.array([dim, frames], np.int64), "from_conv"),
    ]
    n = helper.make_node
    nodes = [
        # Macaron feed-forward with Swish = x * sigmoid(x)
        n("LayerNormalization", ["x", "gamma", "beta"], ["ln1"]),
        n("MatMul", ["ln1", "ff1"], ["f1"]), n("Sigmoid", ["f1"], ["f1s"]), n("Mul", ["f1", "f1s"], ["f1a"]),
        n("MatMul", ["f1a", "ff2"], ["f2"]), n("Mul", ["f2", "half"], ["f2h"]), n("Add", ["x", "f2h"], ["r1"]),
        # Multi-head self-attention
        n("LayerNormalization", ["r1", "gamma", "beta"], ["ln2"]),
        n("MatMul", ["ln2", "wq"], ["q"]), n("MatMul", ["ln2", "wk"], ["k"]), n("MatMul", ["ln2", "wv"], ["v"]),
        n("Reshape", ["q", "split_heads"], ["qh"]), n("Reshape", ["k", "split_heads"], ["kh"]),
        n("Reshape", ["v", "split_heads"], ["vh"]),
        n("Transpose", ["qh"], ["qt"], perm=[1, 0, 2]), n("Transpose", ["kh"], ["kt"], perm=[1, 2, 0]),
        n("Transpose", ["vh"], ["vt"], perm=[1, 0, 2]),
        n("MatMul", ["qt", "kt"], ["scores"]), n("Mul", ["scores", "inv_sqrt_d"], ["scaled"]),
        n("Softmax", ["scaled"], ["attn"], axis=-1), n("MatMul", ["attn", "vt"], ["ctx"]),
        n("Transpose", ["ctx"], ["ctx_t"], perm=[1, 0, 2]), n("Reshape", ["ctx_t", "merge_heads"], ["ctx_m"]),
        n("MatMul", ["ctx_m", "wo"], ["att_out"]), n("Add", ["r1", "att_out"], ["r2"]),
        # Convolution module: pointwise + GLU, depthwise Conv1d, Swish, pointwise
        n("LayerNormalization", ["r2", "gamma", "beta"], ["ln3"]),
        n("MatMul", ["ln3", "pw1"], ["pw"]), n("Split", ["pw"], ["glu_a", "glu_b"], axis=-1, num_outputs=2),
        n("Sigmoid", ["glu_b"], ["glu_g"]), n("Mul", ["glu_a", "glu_g"], ["glu"]),
        n("Transpose", ["glu"], ["glu_t"], perm=[1, 0]), n("Reshape", ["glu_t", "to_conv"], ["conv_in"]),
        n("Conv", ["conv_in", "dw", "dwb"], ["conv"], group=dim, pads=[kernel // 2, kernel // 2]),
        n("Sigmoid", ["conv"], ["conv_s"]), n("Mul", ["conv", "conv_s"], ["conv_a"]),
        n("Reshape", ["conv_a", "from_conv"], ["conv_2d"]), n("Transpose", ["conv_2d"], ["conv_t"], perm=[1, 0]),
        n("MatMul", ["conv_t", "pw2"], ["conv_out"]), n("Add", ["r2", "conv_out"], ["r3"]),
        n("LayerNormalization", ["r3", "gamma", "beta"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "conformer_block",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, (frames, dim))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    return model, {"x": rng.standard_normal((frames, dim)).astype(np.float32)}


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def bench(name: str, model: onnx.ModelProto, feeds: dict[str, np.ndarray], reps: int) -> dict[str, object]:
    from onnx.reference import ReferenceEvaluator

    from q4c.interp import Interpreter

    interp = Interpreter(model)
    reference = ReferenceEvaluator(model)
    ref_out = reference.run(None, feeds)  # warm-up both
    ours = interp.run(feeds)
    worst = max(
        float(np.max(np.abs(ours[o.name] - r))) for o, r in zip(model.graph.output, ref_out)
    )
    # interleaved, so drift on a shared machine hits both alike (q4c.timing: process-CPU time)
    timing = interleaved({"interp": lambda: interp.run(feeds), "reference": lambda: reference.run(None, feeds)},
                         rounds=reps, warmup=0)
    return {
        "model": name,
        "nodes": len(model.graph.node),
        "interp_ms": _median_ms(timing.cpu["interp"]),
        "reference_ms": _median_ms(timing.cpu["reference"]),
        "speedup": timing.ratio("reference", "interp"),
        "wall_speedup": timing.ratio("reference", "interp", wall=True),
        "max_abs_diff": worst,
    }


def _load(path: Path) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    model = onnx.load(path)
    sample = path.with_suffix(".npz")
    if not sample.exists():
        sys.exit(f"{path}: no sample inputs at {sample} (an .npz keyed by input name)")
    return model, dict(np.load(sample))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path, help="ONNX models with .npz sample inputs beside them")
    parser.add_argument("--reps", type=int, default=15, help="timed runs per executor (default 15)")
    parser.add_argument("--inline", action="store_true", help="time the two inline-built graphs as well")
    args = parser.parse_args(argv)

    cases: list[tuple[str, onnx.ModelProto, dict[str, np.ndarray]]] = []
    paths = args.models or [p for p in DEFAULT_MODELS if p.exists() and p.with_suffix(".npz").exists()]
    for path in paths:
        cases.append((path.name, *_load(path)))
    if args.inline or (not args.models and len(cases) < len(DEFAULT_MODELS)):
        rng = np.random.default_rng(0)
        inline = [("bilstm (inline: 2 layers, 256 bidir, 100x80)", *build_bilstm(rng)),
                  ("conformer block (inline: 100x144)", *build_conformer(rng))]
        cases = cases + inline if args.inline else inline

    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, model, feeds in cases:
            try:
                rows.append(bench(name, model, feeds, args.reps))
            except Exception as e:  # e.g. an op ReferenceEvaluator does not implement
                print(f"{name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:100]})", file=sys.stderr)
    print("| model | nodes | q4c.interp CPU ms | ReferenceEvaluator CPU ms | speed-up (CPU) | speed-up (wall) "
          "| max abs diff |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['nodes']} | {r['interp_ms']:.1f} | {r['reference_ms']:.1f} | "
              f"{r['speedup']:.1f}x | {r['wall_speedup']:.1f}x | {r['max_abs_diff']:.1e} |")
    print(f"\nmedian of {args.reps} interleaved runs after one warm-up each; numpy {np.__version__}, "
          f"onnx {onnx.__version__}, OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
