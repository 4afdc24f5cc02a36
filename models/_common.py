"""Shared helpers for the bundled-model generators (torch is needed here, never by q4c).

Weights: every tensor is re-drawn after PyTorch's init from a Student-t distribution scaled to
the tensor's init std, then given a few outlier rows/columns and single outliers, because
trained speech models look like that and plain Gaussian weights hide quantization problems.
Features: synthetic speech (voiced/unvoiced/silent segments) turned into 80-dim log-mel
features with per-utterance, per-feature normalization (NeMo's ``per_feature``).
"""

from __future__ import annotations

import io
import math
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from _speech import mel_filterbank  # one mel scale for every bundled acoustic model

MODELS = Path(__file__).resolve().parent
MAX_IR_VERSION = 10  # onnxruntime 1.31 refuses newer IR versions
RTOL, ATOL = 1e-4, 1e-5


def seed_all(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed)
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- weights
def heavy_tailed(rng: np.random.Generator, shape, std: float, *, outliers: bool = True) -> torch.Tensor:
    """Student-t values with standard deviation ``std``, outlier rows/columns and single spikes."""
    df = float(rng.choice([3.0, 4.0, 5.0]))
    w = rng.standard_t(df, size=shape) * (std / math.sqrt(df / (df - 2.0)))
    w = np.clip(w, -12 * std, 12 * std)  # t(3) tails are unbounded: keep the spikes below controlled
    if outliers and w.ndim >= 2:
        rows, cols = w.shape[0], int(np.prod(w.shape[1:]))
        flat = w.reshape(rows, cols)
        for r in rng.choice(rows, size=max(1, rows // 128), replace=False):  # outlier output channels
            flat[r] *= rng.uniform(5.0, 10.0)
        for c in rng.choice(cols, size=max(1, cols // 256), replace=False):  # outlier input channels
            flat[:, c] *= rng.uniform(3.0, 6.0)
        n_spikes = max(2, flat.size // 50_000)
        idx = rng.choice(flat.size, size=n_spikes, replace=False)
        flat.reshape(-1)[idx] = rng.choice([-1.0, 1.0], size=n_spikes) * rng.uniform(15.0, 30.0, size=n_spikes) * std
        w = flat.reshape(shape)
    elif outliers and w.ndim == 1 and w.size >= 16:
        idx = rng.choice(w.size, size=max(1, w.size // 64), replace=False)
        w[idx] *= rng.uniform(4.0, 8.0, size=idx.size)
    return torch.from_numpy(w.astype(np.float32))


@torch.no_grad()
def realistic_(module: nn.Module, rng: np.random.Generator) -> nn.Module:
    """Replace every parameter (and BatchNorm statistics) by heavy-tailed values, in place."""
    for mod in module.modules():
        norm = isinstance(mod, (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d))
        for name, p in list(mod.named_parameters(recurse=False)):
            if norm and name == "weight":
                # Mostly ~1 gains, a few channels with large gains (as in trained LayerNorms).
                g = 1.0 + heavy_tailed(rng, p.shape, 0.15, outliers=False)
                g[rng.choice(p.numel(), size=max(1, p.numel() // 48), replace=False)] *= 4.0
                p.copy_(g)
            elif norm and name == "bias":
                p.copy_(heavy_tailed(rng, p.shape, 0.1))
            else:
                std = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 0.05
                p.copy_(heavy_tailed(rng, p.shape, std))
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            mod.running_mean.copy_(heavy_tailed(rng, mod.running_mean.shape, 0.3))
            mod.running_var.copy_(torch.from_numpy(np.exp(rng.normal(0.0, 0.6, mod.running_var.shape)).astype(np.float32)))
    return module


@torch.no_grad()
def trained_rnn_(rnn: nn.Module, *, input_gain: float = 5.0, recurrent_gain: float = 1.5, forget_bias: float = 1.0) -> None:
    """Make a re-drawn nn.LSTM/nn.GRU look trained: input weights and biases ``input_gain`` x their
    init scale (some gates saturate, as in real models), recurrent weights only ``recurrent_gain``
    x (larger makes the recurrence chaotic: float rounding would then swamp any comparison), and
    LSTM forget gates biased open (PyTorch gate order i,f,g,o)."""
    hidden = rnn.hidden_size
    for name, p in rnn.named_parameters():
        p.mul_(recurrent_gain if name.startswith("weight_hh") else input_gain)
        if name.startswith("bias_ih") and isinstance(rnn, nn.LSTM):
            p[hidden : 2 * hidden] += forget_bias


# --------------------------------------------------------------------------- features
def synthetic_speech(rng: np.random.Generator, n_samples: int, sr: int = 16000) -> np.ndarray:
    """Speech-like audio: harmonic vowels with formants, noisy fricatives, pauses, room noise."""
    out = np.zeros(n_samples)
    pos = 0
    while pos < n_samples:
        seg = int(sr * rng.uniform(0.06, 0.25))
        t = np.arange(min(seg, n_samples - pos)) / sr
        kind = rng.choice(["voiced", "voiced", "fricative", "pause"])
        if kind == "voiced":
            f0 = rng.uniform(90, 240) * (1.0 + 0.15 * np.sin(2 * np.pi * rng.uniform(1, 4) * t))
            phase = 2 * np.pi * np.cumsum(f0) / sr
            formants = [rng.uniform(300, 900), rng.uniform(900, 2500), rng.uniform(2500, 3500)]
            sig = np.zeros_like(t)
            for k in range(1, 40):
                fk = k * f0.mean()
                if fk > sr / 2 - 200:
                    break
                amp = sum(np.exp(-0.5 * ((fk - f) / 120.0) ** 2) for f in formants) + 0.02 / k
                sig += amp * np.sin(k * phase)
            sig *= rng.uniform(0.2, 1.0)
        elif kind == "fricative":
            noise = rng.standard_normal(t.size)
            sig = np.diff(noise, prepend=0.0) * rng.uniform(0.05, 0.3)  # high-pass tilt
        else:
            sig = np.zeros_like(t)
        env = np.minimum(1.0, np.minimum(t, t[-1] - t + 1e-4) / 0.01)  # 10 ms ramps
        out[pos : pos + t.size] = sig * env
        pos += t.size
    return out + 1e-3 * rng.standard_normal(n_samples)


def log_mel_features(rng: np.random.Generator, frames: int, n_mels: int = 80, batch: int = 1) -> np.ndarray:
    """[batch, frames, n_mels] float32 log-mel features, 25 ms / 10 ms, per-feature normalized."""
    sr, n_fft, hop = 16000, 512, 160
    win = np.hanning(400)
    fb = mel_filterbank(sr, n_fft, n_mels)
    feats = []
    for _ in range(batch):
        audio = synthetic_speech(rng, (frames - 1) * hop + 400, sr)
        idx = np.arange(frames)[:, None] * hop + np.arange(400)[None, :]
        spec = np.abs(np.fft.rfft(audio[idx] * win, n=n_fft)) ** 2
        logmel = np.log(spec @ fb.T + 1e-6)
        logmel = (logmel - logmel.mean(0)) / (logmel.std(0) + 1e-5)
        feats.append(logmel)
    return np.stack(feats).astype(np.float32)


def zipf_tokens(rng: np.random.Generator, vocab: int, shape, *, low: int = 0) -> np.ndarray:
    """Token ids with a Zipf-like frequency profile (frequent ids are small), int64."""
    ranks = np.arange(1, vocab - low + 1, dtype=np.float64)
    p = 1.0 / ranks**1.05
    return (rng.choice(vocab - low, size=shape, p=p / p.sum()) + low).astype(np.int64)


# --------------------------------------------------------------------------- diagnostics
@torch.no_grad()
def lstm_reference(x, w_ih, w_hh, b, h, c, *, reverse=False):
    """Plain LSTM recurrence (gates i,f,g,o), batch-first. Returns (hs, h, c, gate activations)."""
    steps = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
    hs, acts = [None] * x.shape[1], []
    for t in steps:
        i, f, g, o = (x[:, t] @ w_ih.T + h @ w_hh.T + b).chunk(4, dim=-1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + i * g
        h = o * torch.tanh(c)
        hs[t] = h
        acts.append(torch.cat([i, f, o], -1))
    return torch.stack(hs, 1), h, c, torch.stack(acts)


@torch.no_grad()
def rnn_gate_stats(rnn: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Replays an nn.LSTM/nn.GRU (batch_first, zero state) by hand; checks it and returns gate stats."""
    is_lstm = isinstance(rnn, nn.LSTM)
    dirs = 2 if rnn.bidirectional else 1
    sig_all, layer_in = [], x
    for layer in range(rnn.num_layers):
        outs = []
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = getattr(rnn, "weight_ih" + sfx), getattr(rnn, "weight_hh" + sfx)
            b_ih, b_hh = getattr(rnn, "bias_ih" + sfx), getattr(rnn, "bias_hh" + sfx)
            h = x.new_zeros(x.shape[0], rnn.hidden_size)
            if is_lstm:
                hs, _, _, acts = lstm_reference(layer_in, w_ih, w_hh, b_ih + b_hh, h, h.clone(), reverse=bool(d))
            else:
                hs, acts = _gru_reference(layer_in, w_ih, w_hh, b_ih, b_hh, h, reverse=bool(d))
            outs.append(hs)
            sig_all.append(acts.reshape(-1))
        layer_in = torch.cat(outs, -1)
    expected = rnn(x)[0]
    np.testing.assert_allclose(layer_in.numpy(), expected.numpy(), rtol=1e-3, atol=1e-3)
    return gate_stats(torch.cat(sig_all))


@torch.no_grad()
def _gru_reference(x, w_ih, w_hh, b_ih, b_hh, h, *, reverse=False):
    steps = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
    hs, acts = [None] * x.shape[1], []
    for t in steps:
        xr, xz, xn = (x[:, t] @ w_ih.T + b_ih).chunk(3, -1)
        hr, hz, hn = (h @ w_hh.T + b_hh).chunk(3, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h = (1 - z) * n + z * h
        hs[t] = h
        acts.append(torch.cat([r, z], -1))
    return torch.stack(hs, 1), torch.stack(acts)


def gate_stats(sigmoid_acts: torch.Tensor) -> dict[str, float]:
    a = sigmoid_acts.reshape(-1)
    return {"saturated": float(((a < 0.01) | (a > 0.99)).float().mean()), "mid": float(((a > 0.1) & (a < 0.9)).float().mean())}


def entropy_ratio(log_probs: np.ndarray) -> float:
    """Mean entropy of the last-axis distributions over log(V): 0 = one-hot, 1 = uniform."""
    lp = log_probs.astype(np.float64)
    return float((-(np.exp(lp) * lp).sum(-1)).mean() / math.log(lp.shape[-1]))


def assert_sane(name: str, stats: dict[str, float] | None = None, ent: float | None = None) -> None:
    """Refuse numerically useless weights: gates stuck at 0/1, or one-hot/uniform outputs."""
    if stats is not None and not (stats["saturated"] < 0.6 and stats["mid"] > 0.2):
        raise RuntimeError(f"{name}: gates too saturated {stats}; lower the gains")
    if ent is not None and not 0.05 < ent < 0.95:
        raise RuntimeError(f"{name}: output entropy ratio {ent:.3f} is degenerate; rescale the output layer")


# --------------------------------------------------------------------------- export and check
def export(module, args: tuple, path: Path, *, input_names, output_names, dynamic_axes, opset: int = 17, mode: str = "fold") -> onnx.ModelProto:
    """TorchScript ONNX export (torch's dynamo=False path), saved as-is apart from the IR version.

    mode: "fold" (torch's default constant folding: weights are initializers, LSTM gates already
    reordered), "nofold" (do_constant_folding=False: raw PyTorch weights + Slice/Concat gate
    reorder in the graph), "frozen" (torch.jit.freeze of a trace: weights in Constant nodes).
    """
    module = module.eval()
    target = module
    if mode == "frozen":
        target = torch.jit.freeze(torch.jit.trace(module, args))
    buf = io.BytesIO()
    torch.onnx.export(
        target, args, buf, dynamo=False, opset_version=opset, do_constant_folding=(mode != "nofold"),
        input_names=list(input_names), output_names=list(output_names), dynamic_axes=dynamic_axes,
    )  # fmt: skip
    model = onnx.load_from_string(buf.getvalue())
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    onnx.save(model, str(path))
    return model


def ort_session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def save_and_verify(name: str, inputs: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict:
    """Write <name>.npz and <name>.ref.npz; check the .onnx fully and compare ORT with torch."""
    path = MODELS / f"{name}.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == list(inputs), (name, [i.name for i in model.graph.input])
    assert [o.name for o in model.graph.output] == list(ref), (name, [o.name for o in model.graph.output])
    got = dict(zip(ref, ort_session(path).run(list(ref), inputs)))
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=RTOL, atol=ATOL, err_msg=f"{name}:{k}")
        assert np.isfinite(ref[k]).all(), f"{name}:{k} not finite"
    np.savez(MODELS / f"{name}.npz", **inputs)
    np.savez(MODELS / f"{name}.ref.npz", **ref)
    return summary(model, path)


def check_dynamic(name: str, inputs: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    """ORT on other batch/time sizes than the exported sample must still match torch."""
    got = ort_session(MODELS / f"{name}.onnx").run(list(ref), inputs)
    for k, g in zip(ref, got):
        np.testing.assert_allclose(g, ref[k], rtol=RTOL, atol=ATOL, err_msg=f"{name}:{k} (dynamic shapes)")


def _all_nodes(graph: onnx.GraphProto):
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)


def summary(model: onnx.ModelProto, path: Path) -> dict:
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    const_params = 0
    for n in _all_nodes(model.graph):
        if n.op_type == "Constant" and n.attribute[0].type == onnx.AttributeProto.TENSOR:
            t = n.attribute[0].t
            if t.data_type == onnx.TensorProto.FLOAT and int(np.prod(t.dims)) > 16:
                const_params += int(np.prod(t.dims))
    def shape(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return {
        "bytes": path.stat().st_size,
        "params": params + const_params,
        "const_params": const_params,
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "ir": model.ir_version,
        "ops": dict(sorted(Counter(n.op_type for n in _all_nodes(model.graph)).items())),
        "inputs": {i.name: shape(i) for i in model.graph.input},
        "outputs": {o.name: shape(o) for o in model.graph.output},
    }


def to_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
