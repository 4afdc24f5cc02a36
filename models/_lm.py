"""transformer_lm: a GPT-2-style decoder over a 2000-token vocabulary with heavy-tailed random
weights. (lstm_lm is a trained model: models/train_lm.py.)"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from _common import (
    MODELS, assert_sane, check_dynamic, entropy_ratio, export, realistic_, save_and_verify, seed_all,
    to_np, zipf_tokens,
)  # fmt: skip

VOCAB, SEQ = 2000, 20
TOKENS_AXES = {"tokens": {0: "batch", 1: "seq"}, "log_probs": {0: "batch", 1: "seq"}}

def _tokens(rng, batch: int, seq: int):
    return zipf_tokens(rng, VOCAB, (batch, seq))


# transformer_lm: d_model 128 / FFN 512 (not 256 / 1024) keeps models/ under 48 MB.
TF_DIM, TF_HEADS, TF_LAYERS, TF_FFN, TF_MAX_LEN = 128, 4, 4, 512, 256


class DecoderBlock(nn.Module):
    """GPT-2 style pre-LN block: fused QKV projection, causal softmax attention, GELU MLP."""

    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(TF_DIM), nn.LayerNorm(TF_DIM)
        self.qkv, self.proj = nn.Linear(TF_DIM, 3 * TF_DIM), nn.Linear(TF_DIM, TF_DIM)
        self.fc1, self.fc2 = nn.Linear(TF_DIM, TF_FFN), nn.Linear(TF_FFN, TF_DIM)

    def forward(self, x, causal):
        b, t, d = x.size()
        dk = TF_DIM // TF_HEADS
        q, k, v = self.qkv(self.ln1(x)).split(TF_DIM, dim=-1)
        q, k, v = (z.view(b, t, TF_HEADS, dk).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(dk))
        att = torch.softmax(att.masked_fill(causal, float("-inf")), dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).contiguous().view(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TransformerLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.pos = nn.Embedding(VOCAB, TF_DIM), nn.Embedding(TF_MAX_LEN, TF_DIM)
        self.blocks = nn.ModuleList(DecoderBlock() for _ in range(TF_LAYERS))
        self.ln_f = nn.LayerNorm(TF_DIM)

    def forward(self, tokens):
        t = tokens.size(1)
        x = self.embed(tokens) + self.pos(torch.arange(t, device=tokens.device))
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=tokens.device), diagonal=1)
        for block in self.blocks:
            x = block(x, causal)
        return F.log_softmax(F.linear(self.ln_f(x), self.embed.weight), dim=-1)  # tied output


def transformer_lm() -> dict:
    name = "transformer_lm"
    rng = seed_all(107)
    model = realistic_(TransformerLM(), rng)
    with torch.no_grad():
        model.embed.weight.mul_(0.04)  # tied output: N(0, 1)-scale embeddings give one-hot outputs
        model.pos.weight.mul_(0.07)
    model.eval()
    tokens = _tokens(rng, 1, SEQ)
    x = torch.from_numpy(tokens)
    with torch.no_grad():
        y = to_np(model(x))
    ent = entropy_ratio(y)
    assert_sane(name, None, ent)
    export(model, (x,), MODELS / f"{name}.onnx", input_names=["tokens"], output_names=["log_probs"],
           dynamic_axes=TOKENS_AXES, opset=18)  # fmt: skip
    info = save_and_verify(name, {"tokens": tokens}, {"log_probs": y})
    t2 = _tokens(rng, 2, 9)
    with torch.no_grad():
        check_dynamic(name, {"tokens": t2}, {"log_probs": to_np(model(torch.from_numpy(t2)))})
    return {**info, "entropy": ent}
