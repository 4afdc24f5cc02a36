"""Low-bit LSTM/GRU forms in ONNX Runtime (issue 8): latency, recurrent weight bytes, memory.

For each model (the bundled recurrent ones, plus synthetic single LSTM layers of hidden size
128-1024 and a GRU layer of 512, each with its state as explicit inputs/outputs) it builds:

- fp32: the FP32 model.
- dq_per_call: INT4 DequantizeLinear -> LSTM/GRU, ONNX Runtime's default session (the DQ runs
  on every call).
- dq_fold: the same file with session.disable_quant_qdq=1 (DQ folded to FP32 at load).
- scan_int4: every recurrent layer as hoisted MatMulNBits + Scan (lower-recurrent, forced).
- dynamic_int8: every LSTM as DynamicQuantizeLSTM (8-bit plan); GRUs take scan_int8 instead.
- q4c_int4: lower-recurrent's per-layer rule on the INT4 plan (`q4c compile --bits 4`).
- q4c_default: `q4c compile` defaults (sensitivity-guided mixed precision, then the rule).

All non-recurrent weights are the same MatMulNBits in every quantized form. Latency: ONNX Runtime
CPU, 1 intra-op thread, forms interleaved call by call, median per form, as a ratio of FP32, for
three call patterns: `step` (one time step per call, state carried from call to call), `chunk`
(a short chunk per call: 8 steps with state, or 16 frames for bidirectional models, which cannot
carry state), `utterance` (the whole sample). Memory: a fresh subprocess per form, RSS growth
from before session creation to after one utterance call (`rss`), and its peak (`peak`).

    python benchmarks/bench_recurrent.py [--seconds 4] [--models synthetic_lstm512,rnnt_encoder] [--write]

With --write, the tables replace the `recurrent` section of BENCHMARKS.md and the raw figures go
to benchmarks/results/recurrent.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from q4c import graph as g
from q4c import ort as q4ort
from q4c.timing import interleaved
from q4c.compiler import compile_model, sqnr_db
from q4c.config import CompileOptions
from q4c.forms import choose_form
from q4c.recurrent_lowering import Emitter, NoMatch, lower_to_dynamic_lstm, lower_to_scan, match_layer
from q4c.testing import heavy_tailed, make_model

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import stamp, stamped_rows, with_stamp, write_section  # noqa: E402
MODELS = REPO / "models"
BUNDLED = ("bilstm_am", "gru_am", "rnnt_encoder", "rnnt_predictor", "lstm_lm")
SYNTHETIC = ("synthetic_lstm128", "synthetic_lstm256", "synthetic_lstm384", "synthetic_lstm512", "synthetic_lstm1024", "synthetic_gru512")
FORMS = ("fp32", "dq_per_call", "dq_fold", "scan_int4", "dynamic_int8", "q4c_int4", "q4c_default")
FOLD = {"session.disable_quant_qdq": "1"}
UTTERANCE_STEPS = 100  # synthetic layers: 1 s of 10 ms frames


@dataclass
class Pattern:
    """Feeds for the first call; `state` maps an output to the input it feeds on the next call."""

    feeds: dict[str, np.ndarray]
    state: dict[str, str] = field(default_factory=dict)


@dataclass
class Subject:
    name: str
    model: onnx.ModelProto
    hidden: str
    patterns: dict[str, Pattern]
    note: str = ""


# -- models -----------------------------------------------------------------------------------

def synthetic_layer(op: str, hidden: int, seed: int = 0) -> onnx.ModelProto:
    """One LSTM/GRU layer, input width = hidden (a layer in a stack), state in and out."""
    rng = np.random.default_rng(seed)
    gates = 4 if op == "LSTM" else 3
    scale = 1.0 / np.sqrt(hidden)
    inits = {"W": heavy_tailed(rng, (1, gates * hidden, hidden), scale), "R": heavy_tailed(rng, (1, gates * hidden, hidden), scale),
             "B": (rng.standard_normal((1, 2 * gates * hidden)) * 0.1).astype(np.float32)}
    states = ["h_in", "c_in"][: 2 if op == "LSTM" else 1]
    outs = ["Y", "h_out", "c_out"][: 3 if op == "LSTM" else 2]
    attrs = {"hidden_size": hidden}
    if op == "GRU":
        attrs["linear_before_reset"] = 1
    node = helper.make_node(op, ["X", "W", "R", "B", ""] + states, outs, **attrs)
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["time", 1, hidden])]
    inputs += [helper.make_tensor_value_info(s, TensorProto.FLOAT, [1, 1, hidden]) for s in states]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["time", 1, 1, hidden])]
    outputs += [helper.make_tensor_value_info(o, TensorProto.FLOAT, [1, 1, hidden]) for o in outs[1:]]
    return make_model([node], inputs, outputs, inits)


def expose_states(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Forward LSTMs of the main graph get their initial state from new graph inputs and publish
    their final state as graph outputs: the model can then be called chunk by chunk."""
    out = copy.deepcopy(model)
    pairs: dict[str, str] = {}
    for k, node in enumerate(n for n in out.graph.node if n.op_type == "LSTM"):
        attrs = {a.name: a for a in node.attribute}
        if "direction" in attrs and attrs["direction"].s != b"forward":
            continue
        hidden = attrs["hidden_size"].i
        while len(node.input) < 7:
            node.input.append("")
        while len(node.output) < 3:
            node.output.append("")
        for index, kind in ((5, "h"), (6, "c")):
            name_in, name_out = f"state{k}_{kind}_in", node.output[index - 4] or f"state{k}_{kind}_out"
            node.input[index] = name_in
            node.output[index - 4] = name_out
            out.graph.input.append(helper.make_tensor_value_info(name_in, TensorProto.FLOAT, [1, "batch", hidden]))
            out.graph.output.append(helper.make_tensor_value_info(name_out, TensorProto.FLOAT, [1, "batch", hidden]))
            pairs[name_out] = name_in
    return out, pairs


def _zeros_for(model: onnx.ModelProto, pairs: dict[str, str]) -> dict[str, np.ndarray]:
    shapes = {i.name: [d.dim_value or 1 for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    return {name: np.zeros(shapes[name], np.float32) for name in pairs.values()}


def subjects(names: list[str]) -> list[Subject]:
    rng = np.random.default_rng(1)
    out = []
    for name in names:
        if name.startswith("synthetic_"):
            op = "GRU" if "gru" in name else "LSTM"
            hidden = int(name.rsplit(op.lower(), 1)[1])
            model = synthetic_layer(op, hidden)
            pairs = {"h_out": "h_in", **({"c_out": "c_in"} if op == "LSTM" else {})}
            zero = {v: np.zeros((1, 1, hidden), np.float32) for v in pairs.values()}

            def x(t: int, hidden: int = hidden) -> np.ndarray:
                return (rng.standard_normal((t, 1, hidden)) * 0.5).astype(np.float32)

            patterns = {"step": Pattern({"X": x(1), **zero}, pairs), "chunk": Pattern({"X": x(8), **zero}, pairs),
                        "utterance": Pattern({"X": x(UTTERANCE_STEPS), **zero}, pairs)}
            out.append(Subject(name, model, str(hidden), patterns, f"one {op} layer, input {hidden}"))
            continue
        model = onnx.load(MODELS / f"{name}.onnx")
        with np.load(MODELS / f"{name}.npz") as npz:
            sample = {k: npz[k] for k in npz.files}
        hidden = sorted({a.i for n in model.graph.node if n.op_type in ("LSTM", "GRU") for a in n.attribute
                         if a.name == "hidden_size"})
        h = ",".join(map(str, hidden))
        if name == "rnnt_predictor":  # already streaming: one token per call, explicit state
            pairs = {"h_out": "h_in", "c_out": "c_in"}
            out.append(Subject(name, model, h, {"step": Pattern(sample, pairs)}, "one token per call (its only pattern)"))
        elif name in ("rnnt_encoder", "lstm_lm"):
            model, pairs = expose_states(model)
            zero = _zeros_for(model, pairs)
            key = "features" if name == "rnnt_encoder" else "tokens"
            seq = sample[key]
            per_step = 2 if name == "rnnt_encoder" else 1  # the encoder stacks 2 frames per LSTM step
            patterns = {"step": Pattern({key: seq[:, :per_step], **zero}, pairs),
                        "chunk": Pattern({key: seq[:, : 8 * per_step], **zero}, pairs),
                        "utterance": Pattern({key: seq, **zero}, pairs)}
            out.append(Subject(name, model, h, patterns, "LSTM states exposed as inputs/outputs for streaming"))
        else:  # bidirectional: no state to carry; a chunk is a short independent window
            patterns = {"chunk": Pattern({"features": sample["features"][:, :16]}), "utterance": Pattern(sample)}
            out.append(Subject(name, model, h, patterns, "bidirectional: chunks of 16 frames, no state"))
    return out


# -- forms ------------------------------------------------------------------------------------

def _with_config(model: onnx.ModelProto, config: dict[str, str]) -> onnx.ModelProto:
    out = copy.deepcopy(model)
    q4ort.set_session_config(out, config)
    return out


def _lower(model: onnx.ModelProto, kernels: str) -> onnx.ModelProto:
    """Every LSTM/GRU/RNN of a DequantizeLinear-form model in the form lower-recurrent's rule
    (q4c.forms.choose_form) gives it under `kernels` (the compiler writes these forms into the plan)."""
    graph = g.import_graph(model)
    for sub in list(g.iter_graphs(graph)):
        for node in [n for n in sub.nodes if n.op in ("LSTM", "GRU", "RNN")]:
            layer = match_layer(sub, node, {})
            form = "kept" if isinstance(layer, NoMatch) else choose_form(layer, kernels)
            if form == "scan":
                lower_to_scan(layer, Emitter(graph, node.name or layer.op))
            elif form == "dynamic_quantize_lstm":
                lower_to_dynamic_lstm(layer, Emitter(graph, node.name or layer.op))
    graph.cleanup().toposort()
    out = g.export_model(graph, like=model)
    q4ort.set_session_config(out, q4ort.needed_session_config(out)[0])
    return out


def build_forms(subject: Subject) -> dict[str, onnx.ModelProto]:
    samples = [subject.patterns["utterance" if "utterance" in subject.patterns else "step"].feeds]

    def dq_form(bits: int) -> onnx.ModelProto:
        # kernels="low-bit": non-recurrent MatMuls are MatMulNBits in every form (no whole-model timing).
        return compile_model(subject.model, CompileOptions(bits=bits, kernels="low-bit"),
                             passes="default,-lower-recurrent", samples=samples, verify=False)[0]

    base4, base8 = dq_form(4), dq_form(8)
    default = compile_model(subject.model, CompileOptions(), samples=samples, verify=False)[0]
    return {
        "fp32": _with_config(subject.model, {}),
        "dq_per_call": _with_config(base4, {}),
        "dq_fold": _with_config(base4, FOLD),
        "scan_int4": _lower(base4, "low-bit"),
        "dynamic_int8": _lower(base8, "low-bit"),
        "q4c_int4": _lower(base4, "auto"),
        "q4c_default": default,
    }


def recurrent_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers that hold recurrent W/R weights, in whatever form (float W/R of
    LSTM/GRU, the codes and scales of DQ feeding them, DynamicQuantizeLSTM weights, and the
    MatMulNBits weights of the Scan form: in Scan bodies, or feeding a Scan). Biases excluded."""
    total = 0
    scan_bodies = {a.g.name for gp in g.iter_graph_protos(model.graph) for n in gp.node if n.op_type == "Scan"
                   for a in n.attribute if a.type == onnx.AttributeProto.GRAPH}
    for graph in g.iter_graph_protos(model.graph):
        sizes = {t.name: len(t.raw_data) if t.raw_data else t.ByteSize() for t in graph.initializer}
        producer = {o: n for n in graph.node for o in n.output}
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        in_scan_body = graph is not model.graph and graph.name in scan_bodies
        counted: set[str] = set()

        def constant_source(name: str) -> list[str] | None:
            """Initializers behind a value computed from constants only (None if it is not): through
            DQ (codes and scales) or any constant chain (a codebook's Gather of its table by codes)."""
            if name in sizes:
                return [name]
            node = producer.get(name)
            if node is None:
                return None  # a graph input or an outer-scope value
            if node.op_type == "Constant":
                return []
            inputs = node.input[:2] if node.op_type == "DequantizeLinear" else [i for i in node.input if i]
            parts = [constant_source(i) for i in inputs]
            return None if any(part is None for part in parts) else [s for part in parts for s in part]

        def source(name: str) -> list[str]:
            return constant_source(name) or []

        def feeds_scan(name: str) -> bool:
            for n in consumers.get(name, []):
                if n.op_type == "Scan" or (n.op_type == "ReverseSequence" and feeds_scan(n.output[0])):
                    return True
            return False

        for node in graph.node:
            picked: list[str] = []
            if node.op_type in ("LSTM", "GRU"):
                picked = source(node.input[1]) + source(node.input[2])
            elif node.op_type == "DynamicQuantizeLSTM":
                picked = [i for k, i in enumerate(node.input) if k in (1, 2, 8, 9, 10, 11) and i in sizes]
            elif node.op_type == "MatMulNBits" and (in_scan_body or feeds_scan(node.output[0])):
                picked = [s for i in node.input[1:3] for s in source(i)]
            for name in picked:
                if name not in counted:
                    counted.add(name)
                    total += sizes[name]
    return total


# -- measurement ------------------------------------------------------------------------------

def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return q4ort.make_session(model, threads=1)


def time_pattern(sessions: dict[str, ort.InferenceSession], pattern: Pattern, seconds: float,
                 rng: np.random.Generator) -> tuple[dict[str, float], dict[str, float]]:
    """Median (CPU, wall) seconds per call, forms interleaved call by call (q4c.timing: order
    alternating each round), each carrying its own state; at least 15 and at most 500 rounds,
    stopping after `seconds`. `rng` is kept for the callers' signature (the order is no longer
    shuffled).

    CPU time is process-CPU time (q4c.timing says why): at one intra-op thread ONNX Runtime
    computes in the calling thread, so it is the call's compute time without the time other
    processes held the core, the steadier estimate of unloaded latency on a shared machine.
    Wall-clock medians are kept in the JSON too.
    """
    feeds = {k: dict(pattern.feeds) for k in sessions}

    def call(key: str) -> None:
        out = q4ort.run(sessions[key], feeds[key])
        for src, dst in pattern.state.items():
            feeds[key][dst] = out[src]

    timing = interleaved({k: (lambda k=k: call(k)) for k in sessions}, rounds=500, warmup=1, min_rounds=15,
                         max_seconds=seconds)
    return ({k: timing.median(k) for k in sessions}, {k: timing.median(k, wall=True) for k in sessions})


_PROBE = r"""
import json, sys
import numpy as np, onnx, onnxruntime as ort
from q4c import ort as q4ort

def rss():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024

path, feeds_path = sys.argv[1], sys.argv[2]
config = q4ort.session_config(onnx.load(path, load_external_data=False))
with np.load(feeds_path) as npz:
    feeds = {k: npz[k] for k in npz.files}
options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.inter_op_num_threads = 1
for k, v in config.items():
    options.add_session_config_entry(k, v)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
base, _ = rss()
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
session.run(None, feeds)
now, peak = rss()
print(json.dumps({"rss": now - base, "peak": peak - base}))
"""


def memory(model: onnx.ModelProto, feeds: dict[str, np.ndarray], tmp: Path) -> dict[str, int]:
    path, feeds_path = tmp / "probe.onnx", tmp / "probe_feeds.npz"
    g.save(model, path)
    np.savez(feeds_path, **feeds)
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(path), str(feeds_path)], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:  # say why (the probe's last stderr line), not just its exit status
        raise RuntimeError(f"memory probe failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1][:300]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(subject: Subject, seconds: float, tmp: Path) -> dict:
    print(f"bench: {subject.name}: building forms", file=sys.stderr)
    forms = build_forms(subject)
    if not any(n.op_type == "LSTM" for gp in g.iter_graph_protos(subject.model.graph) for n in gp.node):
        forms["scan_int8"] = forms.pop("dynamic_int8")  # no dynamic-quantized GRU: 8-bit MatMulNBits in Scan
    sessions = {k: _session(m) for k, m in forms.items()}
    # Exports that compute W/R (Slice/Concat gate reordering, Constant nodes) hold them as
    # initializers only once folded.
    folded = compile_model(subject.model, passes="fold-constants", verify=False,
                           samples=[(subject.patterns.get("utterance") or subject.patterns["step"]).feeds])[0]
    fp32_weights = recurrent_weight_bytes(folded)
    main = subject.patterns.get("utterance") or subject.patterns["step"]
    reference = q4ort.run(sessions["fp32"], main.feeds)
    result: dict = {"model": subject.name, "hidden": subject.hidden, "note": subject.note,
                    "patterns": {k: {"steps_per_call": _steps(subject, p)} for k, p in subject.patterns.items()},
                    "forms": {}}
    for key, model in forms.items():
        out = q4ort.run(sessions[key], main.feeds)
        result["forms"][key] = {
            "ops": sorted({op for op in g.op_histogram(model) if op in ("LSTM", "GRU", "Scan", "DequantizeLinear",
                                                                        "com.microsoft::DynamicQuantizeLSTM")}),
            "session_config": q4ort.session_config(model),
            "recurrent_weight_bytes": fp32_weights if key == "fp32" else recurrent_weight_bytes(model),
            "recurrent_weight_ratio": 1.0 if key == "fp32" else round(recurrent_weight_bytes(model) / fp32_weights, 4),
            "sqnr_db": min(sqnr_db(v, out[k]) for k, v in reference.items()),
        }
    rng = np.random.default_rng(0)
    for pname, pattern in subject.patterns.items():
        print(f"bench: {subject.name}: {pname}", file=sys.stderr)
        med, med_wall = time_pattern(sessions, pattern, seconds, rng)
        result["patterns"][pname]["fp32_ms"] = round(med["fp32"] * 1e3, 4)
        result["patterns"][pname]["fp32_wall_ms"] = round(med_wall["fp32"] * 1e3, 4)
        for key in forms:
            result["forms"][key].setdefault("ms", {})[pname] = round(med[key] * 1e3, 4)
            result["forms"][key].setdefault("ratio", {})[pname] = round(med[key] / med["fp32"], 3)
            result["forms"][key].setdefault("wall_ratio", {})[pname] = round(med_wall[key] / med_wall["fp32"], 3)
    for key, model in forms.items():
        result["forms"][key]["memory"] = memory(model, main.feeds, tmp)
    return result


def _steps(subject: Subject, pattern: Pattern) -> int:
    x = next(iter(pattern.feeds.values()))
    if subject.name.startswith("synthetic_"):
        return int(pattern.feeds["X"].shape[0])
    return int(x.shape[1] // (2 if subject.name == "rnnt_encoder" else 1))


# -- report -----------------------------------------------------------------------------------

LABELS = {
    "fp32": "FP32 LSTM/GRU op",
    "dq_per_call": "INT4 DQ -> float op (ORT default: DQ every call)",
    "dq_fold": "INT4 DQ -> float op, session.disable_quant_qdq=1 (FP32 at load)",
    "scan_int4": "INT4 MatMulNBits projection + Scan(MatMulNBits)",
    "dynamic_int8": "INT8 DynamicQuantizeLSTM",
    "scan_int8": "INT8 MatMulNBits projection + Scan (GRU: no dynamic op)",
    "q4c_int4": "**q4c --bits 4** (per-layer rule)",
    "q4c_default": "**q4c defaults** (mixed precision + rule)",
}


def render(rows: list[dict], seconds: float, date: str | None = None) -> str:
    mib = 1 / 2**20
    lines = [
        "<!-- recurrent:begin -->",
        "## Low-bit LSTM/GRU forms in ONNX Runtime",
        "",
        f"Measured {date or time.strftime('%Y-%m-%d')} (ONNX Runtime {ort.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} vCPU shared with other jobs): ONNX Runtime CPU provider, **1 intra-op "
        f"thread**, all forms interleaved call by call (order alternating each round) for ~{seconds:g} s per pattern, "
        "median per form of process-CPU time (q4c.timing; ONNX Runtime computes in the calling thread at 1 thread; this "
        "machine is shared and loaded, so CPU time is the steadier estimate; wall-clock ratios are in the JSON), "
        "as a ratio of the FP32 model. `step`: one time step per call with the state carried to the next call; `chunk`: 8 steps "
        "per call with state (bidirectional models: 16 frames, no state); `utterance`: the whole sample (synthetic "
        f"layers: {UTTERANCE_STEPS} steps). Weights: bytes of the recurrent W and R in the file, as a ratio of FP32. "
        "Memory: RSS growth of a fresh process over session creation and one utterance call (peak in brackets). "
        "SQNR: worst output vs FP32 on the utterance (step for rnnt_predictor). Machines like this one are noisy "
        "(identical models measure 0.85-1.2x of each other).",
        "",
    ]
    lines += summary(rows) + [""]
    for row in rows:
        patterns = [p for p in ("step", "chunk", "utterance") if p in row["patterns"]]
        fp32_ms = ", ".join(f"{p} {row['patterns'][p]['fp32_ms']:.3g} ms" for p in patterns)
        lines += [f"### {row['model']} (hidden {row['hidden']}; {row['note']})", "", f"FP32: {fp32_ms}.", "",
                  "| form | weights | " + " | ".join(patterns) + " | memory MiB | SQNR dB |",
                  "|---|---|" + "---|" * len(patterns) + "---|---|"]
        for key in [k for k in (*FORMS, "scan_int8") if k in row["forms"]]:
            f = row["forms"][key]
            ratios = " | ".join(f"{f['ratio'][p]:.2f}" for p in patterns)
            mem = f"{f['memory']['rss'] * mib:.1f} ({f['memory']['peak'] * mib:.1f})"
            sq = "-" if key == "fp32" else f"{f['sqnr_db']:.1f}"
            lines.append(f"| {LABELS[key]} | {f['recurrent_weight_ratio']:.3f} | {ratios} | {mem} | {sq} |")
        lines.append("")
    lines += ["<!-- recurrent:end -->"]
    return "\n".join(lines)


def summary(rows: list[dict]) -> list[str]:
    """Issue 8's targets per model: INT4 recurrent weights <= 0.15 of FP32; latency <= 0.6x FP32
    for hidden >= 512, <= 1.1x below, in every call pattern; memory beside it."""
    out = ["Targets (issue 8): INT4 recurrent weights at most 0.15 of FP32; q4c's latency at most 0.6x FP32 for "
           "hidden >= 512 and 1.1x below, in every call pattern. Worst pattern shown; memory is RSS growth, q4c "
           "vs FP32.", "",
           "| model | hidden | INT4 weights | q4c --bits 4: worst | q4c defaults: worst | target | memory MiB (FP32 -> q4c) | met |",
           "|---|---|---|---|---|---|---|---|"]
    mib = 1 / 2**20
    for row in rows:
        f = row["forms"]
        hidden = max(int(h) for h in str(row["hidden"]).split(","))
        target = 0.6 if hidden >= 512 else 1.1
        worst4 = max(f["q4c_int4"]["ratio"].values())
        worst_d = max(f["q4c_default"]["ratio"].values())
        weights = f["q4c_int4"]["recurrent_weight_ratio"]
        met = weights <= 0.15 and worst4 <= target and worst_d <= target
        out.append(f"| {row['model']} | {row['hidden']} | {weights:.3f} | {worst4:.2f} | {worst_d:.2f} | {target} | "
                   f"{f['fp32']['memory']['rss'] * mib:.1f} -> {f['q4c_int4']['memory']['rss'] * mib:.1f} | "
                   f"{'yes' if met else '**no**'} |")
    return out


def _publish(section: str, doc: dict) -> None:
    """The section into BENCHMARKS.md, stamped with the bundled models' hashes as measured (the
    synthetic layers are built by this script and have no file)."""
    rows = doc.get("stamp_rows") or [{"model": r["model"], "model_sha256": None} for r in doc["models"]
                                     if r["model"] in BUNDLED]
    write_section(REPO / "BENCHMARKS.md", with_stamp(section, stamp("recurrent", rows)[0]), "recurrent")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="timing budget per model and call pattern")
    parser.add_argument("--models", default=None, help=f"comma-separated (default: {','.join(SYNTHETIC + BUNDLED)})")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md and benchmarks/results/recurrent.json")
    parser.add_argument("--render", action="store_true", help="only re-render BENCHMARKS.md from the saved JSON")
    args = parser.parse_args()
    results = REPO / "benchmarks" / "results" / "recurrent.json"
    if args.render:
        doc = json.loads(results.read_text())
        section = render(doc["models"], doc.get("seconds", args.seconds), doc.get("date"))
        print(section)
        _publish(section, doc)
        return 0
    names = args.models.split(",") if args.models else list(SYNTHETIC + BUNDLED)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for subject in subjects(names):
            rows.append(measure(subject, args.seconds, Path(tmp)))
            print(render(rows[-1:], args.seconds), file=sys.stderr)  # progress: each model's table as it lands
    section = render(rows, args.seconds)
    print(section)
    if args.write:
        (REPO / "benchmarks" / "results").mkdir(exist_ok=True)
        doc = {"schema": "q4c.bench-recurrent/1", "onnxruntime": ort.__version__, "threads": 1, "timer": "thread CPU time",
               "seconds": args.seconds, "date": time.strftime("%Y-%m-%d"), "models": rows,
               "stamp_rows": stamped_rows([{"model": r["model"]} for r in rows if r["model"] in BUNDLED])}
        results.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        _publish(section, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
