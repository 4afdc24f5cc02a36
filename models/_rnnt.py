"""RNN-Transducer parts: rnnt_encoder (LSTM, hidden 512), rnnt_predictor (streaming, explicit
LSTM state) and rnnt_joiner. Vocabulary: 500 word pieces + blank (id 500, also the predictor's
start symbol). The joiner's sample inputs are the encoder's and predictor's real outputs."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from _common import (
    MODELS, assert_sane, check_dynamic, entropy_ratio, export, log_mel_features, realistic_,
    rnn_gate_stats, save_and_verify, seed_all, to_np, trained_rnn_, zipf_tokens,
)  # fmt: skip

N_MELS, STACK, ENC_HIDDEN, ENC_LAYERS, ENC_DIM = 80, 2, 512, 2, 320
VOCAB, BLANK = 500, 500
PRED_DIM, JOINT_DIM = 128, 128  # not 320: keeps models/ under 40 MB (README)


class RNNTEncoder(nn.Module):
    """Stack 2 frames (x2 subsampling) -> 2 x LSTM(512) -> Linear(320)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(N_MELS * STACK, ENC_HIDDEN, ENC_LAYERS, batch_first=True)
        self.proj = nn.Linear(ENC_HIDDEN, ENC_DIM)

    def forward(self, features):
        b, t, f = features.size()
        frames = t // STACK
        x = features[:, : frames * STACK].reshape(b, frames, f * STACK)
        y, _ = self.lstm(x)
        return self.proj(y)


class RNNTPredictor(nn.Module):
    """One token step: Embedding -> LSTM with the state passed in and out explicitly."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB + 1, PRED_DIM)
        self.lstm = nn.LSTM(PRED_DIM, PRED_DIM, 1, batch_first=True)

    def forward(self, tokens, h_in, c_in):
        y, (h, c) = self.lstm(self.embed(tokens), (h_in, c_in))
        return y, h, c


class RNNTJoiner(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.pred, self.out = nn.Linear(ENC_DIM, JOINT_DIM), nn.Linear(PRED_DIM, JOINT_DIM), nn.Linear(JOINT_DIM, VOCAB + 1)

    def forward(self, enc, pred):
        joint = torch.tanh(self.enc(enc).unsqueeze(2) + self.pred(pred).unsqueeze(1))
        return F.log_softmax(self.out(joint), dim=-1)


def _encoder_module() -> tuple[RNNTEncoder, np.random.Generator]:
    rng = seed_all(102)
    model = realistic_(RNNTEncoder(), rng)
    trained_rnn_(model.lstm, input_gain=7.0)  # hidden 512: smaller init scale than the others
    return model.eval(), rng


def _predictor_module() -> tuple[RNNTPredictor, np.random.Generator]:
    rng = seed_all(103)
    model = realistic_(RNNTPredictor(), rng)
    trained_rnn_(model.lstm)
    return model.eval(), rng


@torch.no_grad()
def _predictor_states(model: RNNTPredictor, prefix: np.ndarray):
    """Run the predictor over a token prefix (starting with blank) from zero state."""
    b = prefix.shape[0]
    zeros = torch.zeros(1, b, PRED_DIM)
    return model(torch.from_numpy(prefix), zeros, zeros)


def rnnt_encoder() -> dict:
    name = "rnnt_encoder"
    model, rng = _encoder_module()
    feats = log_mel_features(rng, frames=160)
    x = torch.from_numpy(feats)
    with torch.no_grad():
        y = to_np(model(x))
        b, t, f = x.shape
        gates = rnn_gate_stats(model.lstm, x.reshape(b, t // STACK, f * STACK))
    assert_sane(name, gates)
    export(model, (x,), MODELS / f"{name}.onnx", input_names=["features"], output_names=["enc"],
           dynamic_axes={"features": {0: "batch", 1: "time"}, "enc": {0: "batch", 1: "frames"}}, opset=17)  # fmt: skip
    info = save_and_verify(name, {"features": feats}, {"enc": y})
    x2 = log_mel_features(rng, frames=51, batch=2)  # odd length: the last frame is dropped
    with torch.no_grad():
        check_dynamic(name, {"features": x2}, {"enc": to_np(model(torch.from_numpy(x2)))})
    return {**info, "gates": gates}


def rnnt_predictor() -> dict:
    name = "rnnt_predictor"
    model, rng = _predictor_module()
    prefix = np.concatenate([[[BLANK]], zipf_tokens(rng, VOCAB, (1, 5))], axis=1)
    _, h, c = _predictor_states(model, prefix)
    tokens = zipf_tokens(rng, VOCAB, (1, 1))
    with torch.no_grad():
        outs = model(torch.from_numpy(tokens), h, c)
        seq = torch.from_numpy(np.concatenate([prefix, zipf_tokens(rng, VOCAB, (1, 20))], axis=1))
        gates = rnn_gate_stats(model.lstm, model.embed(seq))
    assert_sane(name, gates)
    export(model, (torch.from_numpy(tokens), h, c), MODELS / f"{name}.onnx",
           input_names=["tokens", "h_in", "c_in"], output_names=["pred", "h_out", "c_out"],
           dynamic_axes={"tokens": {0: "batch"}, "h_in": {1: "batch"}, "c_in": {1: "batch"},
                         "pred": {0: "batch"}, "h_out": {1: "batch"}, "c_out": {1: "batch"}}, opset=17)  # fmt: skip
    inputs = {"tokens": tokens, "h_in": to_np(h), "c_in": to_np(c)}
    info = save_and_verify(name, inputs, dict(zip(["pred", "h_out", "c_out"], map(to_np, outs))))
    prefix2 = np.concatenate([[[BLANK], [BLANK]], zipf_tokens(rng, VOCAB, (2, 3))], axis=1)
    _, h2, c2 = _predictor_states(model, prefix2)
    tok2 = zipf_tokens(rng, VOCAB, (2, 1))
    with torch.no_grad():
        ref2 = dict(zip(["pred", "h_out", "c_out"], map(to_np, model(torch.from_numpy(tok2), h2, c2))))
    check_dynamic(name, {"tokens": tok2, "h_in": to_np(h2), "c_in": to_np(c2)}, ref2)
    return {**info, "gates": gates}


def rnnt_joiner() -> dict:
    name = "rnnt_joiner"
    rng = seed_all(104)
    model = realistic_(RNNTJoiner(), rng)
    with torch.no_grad():
        model.out.weight.mul_(6.0)  # trained joiners are confident: spread the logits
        model.out.bias[BLANK] += 2.0  # blank is the most likely symbol in a trained transducer
    model.eval()
    encoder, enc_rng = _encoder_module()
    predictor, _ = _predictor_module()
    with torch.no_grad():
        enc = to_np(encoder(torch.from_numpy(log_mel_features(enc_rng, frames=32))))  # 16 frames
        prefix = np.concatenate([[[BLANK]], zipf_tokens(rng, VOCAB, (1, 5))], axis=1)
        pred = to_np(_predictor_states(predictor, prefix)[0])  # 6 label positions
        y = to_np(model(torch.from_numpy(enc), torch.from_numpy(pred)))
    ent = entropy_ratio(y)
    assert_sane(name, None, ent)
    export(model, (torch.from_numpy(enc), torch.from_numpy(pred)), MODELS / f"{name}.onnx",
           input_names=["enc", "pred"], output_names=["log_probs"],
           dynamic_axes={"enc": {0: "batch", 1: "frames"}, "pred": {0: "batch", 1: "labels"},
                         "log_probs": {0: "batch", 1: "frames", 2: "labels"}}, opset=17)  # fmt: skip
    info = save_and_verify(name, {"enc": enc, "pred": pred}, {"log_probs": y})
    enc2, pred2 = rng.standard_normal((2, 5, ENC_DIM), dtype=np.float32), rng.standard_normal((2, 1, PRED_DIM), dtype=np.float32)
    with torch.no_grad():
        check_dynamic(name, {"enc": enc2, "pred": pred2}, {"log_probs": to_np(model(torch.from_numpy(enc2), torch.from_numpy(pred2)))})
    return {**info, "entropy": ent}
