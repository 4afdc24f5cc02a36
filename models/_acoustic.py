"""Acoustic models with heavy-tailed random weights: gru_am (CTC-style recurrent AM) and conformer."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from _common import (
    MODELS, assert_sane, check_dynamic, entropy_ratio, export, trained_rnn_, log_mel_features,
    realistic_, rnn_gate_stats, save_and_verify, seed_all, to_np,
)  # fmt: skip

N_MELS = 80
FEATURES_AXES = {"features": {0: "batch", 1: "time"}, "log_probs": {0: "batch", 1: "time"}}


class RecurrentAM(nn.Module):
    """features [B, T, 80] -> stacked bidirectional RNN -> Linear -> log_softmax (blank = 0)."""

    def __init__(self, rnn: nn.Module, n_units: int):
        super().__init__()
        self.rnn = rnn
        self.out = nn.Linear(2 * rnn.hidden_size, n_units)

    def forward(self, features):
        y, _ = self.rnn(features)
        return F.log_softmax(self.out(y), dim=-1)


def _recurrent_am(name: str, seed: int, rnn_type: type[nn.Module], hidden: int, layers: int, *, mode: str, opset: int, out_gain: float) -> dict:
    rng = seed_all(seed)
    rnn = rnn_type(N_MELS, hidden, num_layers=layers, bidirectional=True, batch_first=True)
    model = RecurrentAM(rnn, n_units=40)
    realistic_(model, rng)
    trained_rnn_(rnn)
    with torch.no_grad():
        model.out.weight.mul_(out_gain)
        model.out.bias[0] += 2.0  # CTC blank dominates a trained AM's output
    model.eval()
    feats = log_mel_features(rng, frames=160)
    x = torch.from_numpy(feats)
    with torch.no_grad():
        y = to_np(model(x))
    gates, ent = rnn_gate_stats(rnn, x), entropy_ratio(y)
    assert_sane(name, gates, ent)
    export(model, (x,), MODELS / f"{name}.onnx", input_names=["features"], output_names=["log_probs"],
           dynamic_axes=FEATURES_AXES, opset=opset, mode=mode)  # fmt: skip
    info = save_and_verify(name, {"features": feats}, {"log_probs": y})
    x2 = log_mel_features(rng, frames=37, batch=2)
    with torch.no_grad():
        check_dynamic(name, {"features": x2}, {"log_probs": to_np(model(torch.from_numpy(x2)))})
    return {**info, "gates": gates, "entropy": ent}


# gru_am uses hidden 128 instead of 256 to keep models/ under 48 MB (README). bilstm_am is a
# trained model: models/train_asr.py.
GRU_HIDDEN = 128


def gru_am() -> dict:
    """2 x BiGRU; exported from a frozen trace: every weight is held by a Constant node."""
    return _recurrent_am("gru_am", 108, nn.GRU, GRU_HIDDEN, 2, mode="frozen", opset=18, out_gain=4.0)


# --------------------------------------------------------------------------- conformer
D_MODEL, HEADS, KERNEL, SUB_CHANNELS, CONF_UNITS = 96, 4, 15, 32, 129


class Conv2dSubsampling(nn.Module):
    """ESPnet-style x4 subsampling: two 3x3 stride-2 Conv2d + ReLU, then Linear to d_model."""

    def __init__(self, idim: int, odim: int, channels: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, channels, 3, 2), nn.ReLU(), nn.Conv2d(channels, channels, 3, 2), nn.ReLU())
        self.out = nn.Linear(channels * (((idim - 1) // 2 - 1) // 2), odim)

    def forward(self, x):
        x = self.conv(x.unsqueeze(1))
        b, c, t, f = x.size()
        return self.out(x.transpose(1, 2).contiguous().view(b, t, c * f))


class PositionalEncoding(nn.Module):
    """Absolute sinusoidal encoding kept as a buffer and sliced to the input length."""

    def __init__(self, d: int, max_len: int = 256):
        super().__init__()
        pos = torch.arange(max_len, dtype=torch.float32)[:, None]
        div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
        pe = torch.zeros(1, max_len, d)
        pe[0, :, 0::2], pe[0, :, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        self.register_buffer("pe", pe)
        self.xscale = math.sqrt(d)

    def forward(self, x):
        return x * self.xscale + self.pe[:, : x.size(1)]


class FeedForward(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm, self.w1, self.w2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return self.w2(F.silu(self.w1(self.norm(x))))


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm, self.heads, self.dk = nn.LayerNorm(d), heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, d = x.size()
        x = self.norm(x)
        q, k, v = (lin(x).view(b, t, self.heads, self.dk).transpose(1, 2) for lin in (self.q, self.k, self.v))
        att = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.dk), dim=-1)
        return self.o(torch.matmul(att, v).transpose(1, 2).contiguous().view(b, t, d))


class ConvModule(nn.Module):
    def __init__(self, d: int, kernel: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.pw1 = nn.Conv1d(d, 2 * d, 1)
        self.dw = nn.Conv1d(d, d, kernel, padding=kernel // 2, groups=d)
        self.bn = nn.BatchNorm1d(d)
        self.pw2 = nn.Conv1d(d, d, 1)

    def forward(self, x):
        x = F.glu(self.pw1(self.norm(x).transpose(1, 2)), dim=1)
        x = self.pw2(F.silu(self.bn(self.dw(x))))
        return x.transpose(1, 2)


class ConformerBlock(nn.Module):
    def __init__(self, d: int, heads: int, kernel: int):
        super().__init__()
        self.ff1, self.att, self.conv, self.ff2 = FeedForward(d), SelfAttention(d, heads), ConvModule(d, kernel), FeedForward(d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        x = x + 0.5 * self.ff1(x)
        x = x + self.att(x)
        x = x + self.conv(x)
        x = x + 0.5 * self.ff2(x)
        return self.norm(x)


class Conformer(nn.Module):
    def __init__(self, n_blocks: int = 2):
        super().__init__()
        self.subsample = Conv2dSubsampling(N_MELS, D_MODEL, SUB_CHANNELS)
        self.pos = PositionalEncoding(D_MODEL)
        self.blocks = nn.ModuleList(ConformerBlock(D_MODEL, HEADS, KERNEL) for _ in range(n_blocks))
        self.out = nn.Linear(D_MODEL, CONF_UNITS)

    def forward(self, features):
        x = self.pos(self.subsample(features))
        for block in self.blocks:
            x = block(x)
        return F.log_softmax(self.out(x), dim=-1)


def conformer() -> dict:
    """Exported without constant folding: with it, torch folds BatchNorm into the depthwise Conv;
    without, BatchNormalization stays and every Linear weight reaches its MatMul via a Transpose."""
    name = "conformer"
    rng = seed_all(105)
    model = Conformer()
    realistic_(model, rng)
    with torch.no_grad():
        model.out.weight.mul_(4.0)  # a trained CTC head is confident: spread the logits
        model.out.bias[0] += 2.0
    model.eval()
    feats = log_mel_features(rng, frames=200)
    x = torch.from_numpy(feats)
    with torch.no_grad():
        y = to_np(model(x))
    ent = entropy_ratio(y)
    assert_sane(name, None, ent)
    export(model, (x,), MODELS / f"{name}.onnx", input_names=["features"], output_names=["log_probs"],
           dynamic_axes=FEATURES_AXES, opset=17, mode="nofold")  # fmt: skip
    info = save_and_verify(name, {"features": feats}, {"log_probs": y})
    x2 = log_mel_features(rng, frames=93, batch=2)
    with torch.no_grad():
        check_dynamic(name, {"features": x2}, {"log_probs": to_np(model(torch.from_numpy(x2)))})
    return {**info, "entropy": ent}
