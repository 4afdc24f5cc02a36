"""Which 4-bit quantizer does the least damage on a trained streaming model (issue 13)?

On silero_vad_16k_op15 (models/real/fetch.py), for each of its 7 weight tensors quantized to 4 bits
alone (every other weight FP32), and for all 7 at once, the speech probabilities are run closed
loop (state carried call to call, models/real/silero.py's driver) over the calibration audio and
compared with FP32: mean |dp| and decision flips at 0.5 (q4c.metrics); the methods of
--test-methods also on the held-out test audio. The quantized weight is
fed to ONNX Runtime as its dequantized float values (what DequantizeLinear reproduces), so every
quantizer is measured with one session.

Quantizers (all 4 bits): symmetric per channel (q4c's "symmetric", MSE clipping), GPTQ per channel
(Hessians of the layer inputs: Conv patches, LSTM x and h), symmetric blocks of 32 / 16 along
the reduction axis (q4c's Conv block layout), GPTQ in blocks of 32 (q4c's default layout) and 16,
GPTQ with act-order (columns by decreasing Hessian diagonal, scales fixed beforehand) in blocks of 32, k-means / mu-law codebooks per channel,
ASYMMETRIC per channel (zero point per channel, MSE range search), and bias correction on top of
symmetric and asymmetric (b' = b - dW E[x] with E[x] the mean Conv patch / LSTM x and h over the
calibration calls; a Conv without a bias gets one).

    python benchmarks/bench_quantizers.py [--methods ...] [--test-methods ...] [--write]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models" / "real"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import audio  # noqa: E402
from asymmetric import quantize_asymmetric  # noqa: E402
import fetch  # noqa: E402
import silero  # noqa: E402

from q4c import ort as q4ort  # noqa: E402
from q4c.metrics import decision_flips  # noqa: E402
from q4c.quant.codebook import quantize_codebook  # noqa: E402
from q4c.quant.gptq import error_spread, gptq_rows  # noqa: E402
from q4c.quant.gptq_conv import gptq_conv  # noqa: E402
from q4c.quant.qparams import CLIP_RATIOS, quantize  # noqa: E402
from q4c.quant.weights import conv_block_layout  # noqa: E402

EXPORT = "silero_vad_16k_op15"
BITS = 4
LSTM_X = "/model/encoder/3/activation/Relu_output_0"  # the LSTM's input (one frame per call)
LSTM_W, LSTM_R, LSTM_B = ("model.decoder.rnn.weight_ih", "model.decoder.rnn.weight_hh", "model.decoder.rnn.bias_ih")
METHODS = ("sym", "gptq", "block32", "gptq32", "block16", "gptq16", "actorder32", "kmeans", "mulaw", "asym", "sym+bc", "asym+bc")


def conv_nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Weight name -> the main-graph Conv reading it (weights of >= 2 dims, over 1000 values)."""
    sizes = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
    return {n.input[1]: n for n in model.graph.node if n.op_type == "Conv" and sizes.get(n.input[1], 0) > 1000}


def as_inputs(model: onnx.ModelProto, names: list[str], extra_outputs: list[str]) -> onnx.ModelProto:
    """`model` with the initializers `names` turned into graph inputs and `extra_outputs` added."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep = [i for i in m.graph.initializer if i.name not in names]
    moved = {i.name: i for i in m.graph.initializer if i.name in names}
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    for name in names:
        m.graph.input.append(helper.make_tensor_value_info(name, moved[name].data_type, list(moved[name].dims)))
    for out in extra_outputs:
        m.graph.output.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    return m


def with_conv_biases(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Every big Conv with a bias input (zeros where it had none); weight name -> bias name."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    biases = {}
    for w, node in conv_nodes(m).items():
        if len(node.input) < 3 or not node.input[2]:
            shape = next(i.dims for i in m.graph.initializer if i.name == w)
            name = w + ".q4c_bias"
            m.graph.initializer.append(numpy_helper.from_array(np.zeros(shape[0], np.float32), name))
            del node.input[2:]
            node.input.append(name)
        biases[w] = node.input[2]
    return m, biases


def patches(x: np.ndarray, node: onnx.NodeProto, kernel: int) -> np.ndarray:
    """im2col of a 1-D Conv input x [1, C, T]: [frames, C * K] in W.reshape(O, C * K)'s order."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    pads, stride = attrs.get("pads", [0, 0]), attrs.get("strides", [1])[0]
    xp = np.pad(x[0], ((0, 0), (pads[0], pads[1])))
    n = (xp.shape[1] - kernel) // stride + 1
    idx = np.arange(n)[:, None] * stride + np.arange(kernel)[None, :]
    return np.transpose(xp[:, idx], (1, 0, 2)).reshape(n, -1).astype(np.float64)


class Study:
    def __init__(self, split: str = "calib"):
        base = onnx.load(str(fetch.model_path(EXPORT)))
        self.model, self.biases = with_conv_biases(base)
        self.convs = conv_nodes(self.model)
        self.weights = [*self.convs, LSTM_W, LSTM_R]
        self.biases[LSTM_W] = self.biases[LSTM_R] = LSTM_B
        self.fp32 = {i.name: numpy_helper.to_array(i).astype(np.float32) for i in self.model.graph.initializer
                     if i.name in {*self.weights, *self.biases.values()}}
        taps = [n.input[0] for n in self.convs.values()] + [LSTM_X]
        fed = sorted({*self.weights, *self.biases.values()})
        self.session = q4ort.make_session(as_inputs(self.model, fed, taps), threads=1)
        self.taps = taps
        self.calib = audio.load("calib", 16000)
        self.eval_audio = self.calib if split == "calib" else audio.load(split, 16000)
        self.stats = self._statistics()
        self.reference = self.run({})

    def _statistics(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(mean input row, Hessian sum(x x^T)/n) per weight, over the FP32 calibration calls."""
        sums: dict[str, list] = {}

        def add(key: str, rows: np.ndarray) -> None:
            s = sums.setdefault(key, [0.0, 0.0, 0])
            s[0] = s[0] + rows.sum(axis=0)
            s[1] = s[1] + rows.T @ rows
            s[2] += rows.shape[0]

        def run(feeds: dict) -> dict:
            out = q4ort.run(self.session, {**feeds, **self.fp32})
            for w, node in self.convs.items():
                add(w, patches(out[node.input[0]], node, self.fp32[w].shape[2]))
            x = out[LSTM_X]  # [1, C, T]
            add(LSTM_W, np.transpose(x[0]).astype(np.float64))
            add(LSTM_R, feeds["state"][0].reshape(1, -1).astype(np.float64))
            return out

        for _, wave in self.calib:
            silero.probs(run, wave, EXPORT)
        return {k: (s[0] / s[2], s[1] / s[2]) for k, s in sums.items()}

    def run(self, changes: dict[str, np.ndarray]) -> np.ndarray:
        values = {**self.fp32, **changes}
        def step(feeds: dict) -> dict:
            return q4ort.run(self.session, {**feeds, **values})
        return np.concatenate([silero.probs(step, wave, EXPORT) for _, wave in self.eval_audio])

    # -- quantizers -------------------------------------------------------------------------
    def quantized(self, name: str, method: str) -> np.ndarray:
        w = self.fp32[name]
        rows = w.reshape(w.shape[0], -1)
        if method in ("sym", "sym+bc"):
            return quantize(w, BITS, granularity="channel", axis=0, scale_dtype=np.float16).dequantize()
        if method in ("asym", "asym+bc"):
            return quantize_asymmetric(w, BITS, scale_dtype=np.float16).dequantize()
        if method.startswith("block"):
            block = int(method[5:])
            if name in self.convs:
                kind, axis, size = conv_block_layout(w.shape, block)
            else:
                kind, axis, size = "block", 1, block
            return quantize(w, BITS, granularity=kind, axis=axis, block_size=size, scale_dtype=np.float16).dequantize()
        if method.startswith("actorder"):  # "actorderN": GPTQ, columns by decreasing H diagonal, static scales
            n = int(method[8:])
            kind, axis, size = conv_block_layout(w.shape, n) if name in self.convs else ("block", 1, n)
            return act_order(w, self.stats[name][1], kind, axis, size)
        if method.startswith("gptq"):  # "gptq": per channel; "gptqN": blocks of N
            hessian = self.stats[name][1]
            n = int(method[4:] or 0)
            if name in self.convs:
                kind, axis, size = conv_block_layout(w.shape, n) if n else ("channel", 0, 0)
                return gptq_conv(w, hessian, BITS, kind=kind, axis=axis, block_size=size, clip_ratios=CLIP_RATIOS,
                                 scale_dtype=np.float16).dequantize()
            block = n or rows.shape[1]
            codes, scales = gptq_rows(rows, hessian, BITS, block, CLIP_RATIOS, np.float16)
            return (codes.astype(np.float32) * np.repeat(scales.astype(np.float32), block, axis=1)[:, : rows.shape[1]])
        if method in ("kmeans", "mulaw"):
            reduce_axis = 1
            return quantize_codebook(w, BITS, method, channel_axis=0, reduce_axis=reduce_axis,
                                     granularity="channel").dequantize().reshape(w.shape)
        raise ValueError(method)

    def changes(self, names: list[str], method: str) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name in names:
            wq = self.quantized(name, method)
            out[name] = wq.astype(np.float32)
            if method.endswith("+bc"):
                dw = (wq - self.fp32[name]).reshape(wq.shape[0], -1).astype(np.float64)
                bias = self.biases[name]
                prev = out.get(bias, self.fp32[bias]).astype(np.float64)
                out[bias] = (prev - dw @ self.stats[name][0]).astype(np.float32)
        return out

    def use_split(self, split: str) -> None:
        """Evaluate on `split` from now on (statistics stay those of the calibration audio)."""
        self.eval_audio = self.calib if split == "calib" else audio.load(split, 16000)
        self.reference = self.run({})

    def measure(self, names: list[str], method: str, split: str = "calib") -> dict:
        p = self.run(self.changes(names, method))
        return {"split": split, "tensor": names[0] if len(names) == 1 else "all 7", "method": method,
                "mean_abs_dp": float(np.mean(np.abs(p - self.reference))),
                "flips_pct": 100 * decision_flips(self.reference, p)}


def act_order(w: np.ndarray, hessian: np.ndarray, kind: str, axis: int, block: int) -> np.ndarray:
    """GPTQ with act-order (columns by decreasing Hessian diagonal) and static groups: each
    group's scale chosen from the original weights (q4c's MSE clipping), as the group layout of
    quantize(); returns the dequantized weight (an experiment: not a q4c scheme)."""
    base = quantize(w, BITS, granularity=kind, axis=axis, block_size=block, scale_dtype=np.float16)
    scale = base._expand(base.scale).astype(np.float64).reshape(w.shape[0], -1)  # per weight
    rows = w.reshape(w.shape[0], -1).astype(np.float64)
    order = np.argsort(-np.diag(hessian), kind="stable")
    wp = rows[:, order].copy()
    u = error_spread(np.asarray(hessian)[np.ix_(order, order)], wp)
    sp = scale[:, order]
    qmin, qmax = -(2 ** (BITS - 1)), 2 ** (BITS - 1) - 1
    out = np.zeros_like(wp)
    for j in range(wp.shape[1]):
        q = np.clip(np.rint(wp[:, j] / sp[:, j]), qmin, qmax)
        out[:, j] = q * sp[:, j]
        err = (wp[:, j] - out[:, j]) / u[j, j]
        wp[:, j + 1:] -= np.outer(err, u[j, j + 1:])
    result = np.zeros_like(out)
    result[:, order] = out
    return result.reshape(w.shape).astype(np.float32)


def table(rows: list[dict], names: list[str], methods: list[str]) -> str:
    short = {n: n.replace("model.", "").replace(".reparam_conv.weight", "").replace("decoder.rnn.", "lstm.")
             for n in names}
    head = "| tensor | " + " | ".join(methods) + " |\n|---|" + "---:|" * len(methods) + "\n"
    lines = []
    for name in [*names, "all 7"]:
        cells = []
        for m in methods:
            r = next(r for r in rows if r["tensor"] == name and r["method"] == m)
            cells.append(f"{r['flips_pct']:.2f} % / {r['mean_abs_dp']:.4f}")
        lines.append(f"| {short.get(name, name)} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines)


def verdict(rows: list[dict]) -> str:
    """One line per split: all 7 weights at 4 bits, each method's flips, best first."""
    out = []
    for split in dict.fromkeys(r["split"] for r in rows):
        alls = sorted((r for r in rows if r["split"] == split and r["tensor"] == "all 7"), key=lambda r: r["flips_pct"])
        out.append(f"All 7 at 4 bits, {split} audio: " + ", ".join(f"{r['method']} {r['flips_pct']:.2f} %" for r in alls) + ".")
    return " ".join(out)


def section(rows: list[dict], sizes: dict[str, tuple[int, int]], plan: dict[str, list[str]], weights: list[str]) -> str:
    tables = "\n\n".join(
        f"{split} audio ({sizes[split][0]} clips, {sizes[split][1]} chunks):\n\n"
        + table([r for r in rows if r["split"] == split], weights, methods)
        for split, methods in plan.items() if methods)
    return (
        "<!-- quantizers:begin -->\n## 4-bit quantizers on a trained streaming model (issue 13)\n\n"
        f"{EXPORT}, one weight at 4 bits (all others FP32) or all 7 at 4 bits, closed-loop streaming "
        "probabilities vs FP32. Each cell: decision flips at 0.5 / mean |dp|. GPTQ Hessians, bias-correction "
        "means and codebooks come from the calibration audio only; the test rows are held out. "
        "sym = q4c symmetric per channel (MSE clipping, float16 scales); gptq = per channel with "
        "GPTQ rounding against the layer inputs' Hessian (Conv patches, LSTM x / h); gptqN = the same in "
        "blocks of N (32: q4c's default layout); actorder32 = GPTQ with act-order (columns by decreasing Hessian "
        "diagonal, block scales fixed from the FP32 weights); blockN = symmetric blocks of N along the reduction axis "
        "(q4c's Conv layout); kmeans / mulaw = 16-entry codebook per channel; asym = per channel with "
        "a zero point (MSE search over both range ends); +bc = bias correction b' = b - dW E[x].\n\n"
        + tables + "\n\n" + verdict(rows) + " GPTQ rounding (output-aware) is the mechanism that wins on "
        "every tensor, on both splits; asymmetric zero points and bias correction do not beat symmetric on these "
        "weights (all-7 rows), so q4c gains GPTQ for Conv weights "
        "(q4c/quant/gptq_conv.py) rather than a zero-point scheme.\n<!-- quantizers:end -->"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS), help="measured on the calibration audio")
    ap.add_argument("--test-methods", default="sym,block32,gptq,gptq32,gptq16,actorder32,asym",
                    help="measured on the test audio too (statistics from the calibration audio)")
    ap.add_argument("--write", action="store_true", help="publish the tables as BENCHMARKS.md section 'quantizers'")
    ap.add_argument("--from-results", action="store_true", help="re-render the section from benchmarks/results/quantizers.json")
    args = ap.parse_args()
    from _common import RESULTS, publish

    plan = {"calib": [m for m in args.methods.split(",") if m], "test": [m for m in args.test_methods.split(",") if m]}
    if args.from_results:
        rows = json.loads((RESULTS / "quantizers.json").read_text())
        sizes = {r["split"]: (r["clips"], r["chunks"]) for r in rows}
        weights = list(dict.fromkeys(r["tensor"] for r in rows if r["tensor"] != "all 7"))
        plan = {split: list(dict.fromkeys(r["method"] for r in rows if r["split"] == split)) for split in sizes}
        publish("quantizers", rows, section(rows, sizes, plan, weights), command=RERENDER)
        return
    t0 = time.time()
    study = Study()
    rows, sizes = [], {}
    for split, methods in plan.items():
        if not methods:
            continue
        study.use_split(split)
        sizes[split] = (len(study.eval_audio), study.reference.size)
        for method in methods:
            for names in [[w] for w in study.weights] + [study.weights]:
                r = {**study.measure(names, method, split), "clips": sizes[split][0], "chunks": sizes[split][1]}
                rows.append(r)
                print(f"{split:5s} {r['tensor']:40s} {method:8s} flips {r['flips_pct']:6.2f} %  "
                      f"mean|dp| {r['mean_abs_dp']:.5f}", flush=True)
    print(f"{time.time() - t0:.0f} s")
    if args.write:
        publish("quantizers", [{**r, "model": EXPORT} for r in rows], section(rows, sizes, plan, study.weights))


#: the command a re-rendered section is stamped with: the one that measured the rows
RERENDER = "python benchmarks/bench_quantizers.py --write"


if __name__ == "__main__":
    main()
