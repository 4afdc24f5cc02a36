"""Train the bundled RNN-Transducer ``rnnt_sys`` (encoder, predictor, joiner over characters).

    apt-get install espeak-ng sox fortunes           # build-time only
    python models/train_rnnt.py --minutes 70         # data (shared with train_asr.py) + training + export
    python models/train_rnnt.py --export-only        # export the best checkpoint so far
    python models/eval_rnnt.py                       # test WER / CER of models/rnnt_sys

Same corpus, features, units and test set as ``bilstm_am`` (models/train_asr.py builds the
data: espeak-ng + sox synthetic speech, 80-dim log-mel; the committed test set
models/data/bilstm_am_test.{npz,json} is the test set here too).

Model (1,47x,xxx parameters, see models/README.md):
- encoder: stack 2 frames (160) -> BiLSTM(128) -> stack 2 (512; x4 subsampling in all, 40 ms
  per encoder frame) -> 2 x BiLSTM(128) -> enc [B, T // 4, 256];
- predictor: Embedding(29, 64) -> LSTM(128), one token per call with the state in and out
  (h_in/c_in -> h_out/c_out); the start token is blank (0), the start state zeros;
- joiner: Linear(enc 256 -> 128) + Linear(pred 128 -> 128) -> tanh -> Linear(128 -> 29) logits.
Loss: the transducer loss (models/_transducer.py, numpy forward-backward on the T x U lattice
with analytic gradients, wrapped here in an autograd Function) + 0.3 x CTC on a train-only
Linear over the encoder output (helps the encoder align early; not exported). Adam, warmup,
then halving the learning rate on a step schedule; SpecAugment masks as bilstm_am; the
checkpoint with the best dev CER (greedy transducer decode on 60 dev utterances) is kept.
Training stops at --steps or after --minutes of wall time, whichever comes first; a checkpoint
is written every --ckpt-minutes, so a run can be resumed or exported at any time.

Export (TorchScript exporter, constant folding on, opset 17, IR <= 10): models/rnnt_sys/
{encoder,predictor,joiner}.onnx, and models/rnnt_sys/reference.json: torch's greedy decode of
the first 8 test utterances (what the tests compare the ONNX decode driver against).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _speech  # noqa: E402
import _text  # noqa: E402
import _transducer  # noqa: E402
import train_asr  # noqa: E402

MODELS = Path(__file__).resolve().parent
OUT = MODELS / "rnnt_sys"
SEED = 11
ENC_HIDDEN, PRED_EMB, PRED_HIDDEN, JOINT = 128, 64, 128, 128
ENC_DIM = 2 * ENC_HIDDEN
N_UNITS = len(_text.UNITS)  # blank 0, space, apostrophe, a-z
BLANK = 0
MAX_SYMBOLS = 5  # per encoder frame in greedy decoding
CTC_WEIGHT = 0.3
DROPOUT = 0.15
N_DEV_EVAL = 60
N_REF = 8
# Learning rate after the warmup as (from step, x --lr, halve every N steps, starting at step):
# the committed model's run. Its first segment decayed too early for the ~190 steps/min the
# machine gave once other jobs ended (resumed at step 1936 with a slower decay), and at the
# floor by step ~5300, it got a warm restart at 0.25 x --lr (step 6615, a checkpoint).
LR_SEGMENTS = ((0, 1.0, 500, 1000), (1936, 1.0, 1000, 1000), (6615, 0.25, 1500, 6615))
CHUNK = 400


class Encoder(nn.Module):
    """features [B, T, 80] -> enc [B, T // 4, 256]."""

    def __init__(self):
        super().__init__()
        self.lstm1 = nn.LSTM(2 * _speech.N_MELS, ENC_HIDDEN, bidirectional=True, batch_first=True)
        self.lstm2 = nn.LSTM(4 * ENC_HIDDEN, ENC_HIDDEN, num_layers=2, bidirectional=True, batch_first=True, dropout=DROPOUT)
        self.drop = nn.Dropout(DROPOUT)

    def forward(self, features):
        b, t, f = features.size()
        t2 = t // 2
        x = features[:, : t2 * 2].reshape(b, t2, 2 * f)
        y, _ = self.lstm1(x)
        t4 = t2 // 2
        y = self.drop(y[:, : t4 * 2].reshape(b, t4, 4 * ENC_HIDDEN))
        y, _ = self.lstm2(y)
        return y


class Predictor(nn.Module):
    """tokens [B, U] (+ state [1, B, 128] x 2) -> pred [B, U, 128], h_out, c_out."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(N_UNITS, PRED_EMB)
        self.lstm = nn.LSTM(PRED_EMB, PRED_HIDDEN, batch_first=True)

    def forward(self, tokens, h_in, c_in):
        y, (h, c) = self.lstm(self.embed(tokens), (h_in, c_in))
        return y, h, c


class Joiner(nn.Module):
    """enc [..., 256], pred [..., 128] (broadcastable after the projections) -> logits [..., 29]."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(ENC_DIM, JOINT)
        self.pred = nn.Linear(PRED_HIDDEN, JOINT)
        self.out = nn.Linear(JOINT, N_UNITS)

    def forward(self, enc, pred):
        return self.out(torch.tanh(self.enc(enc) + self.pred(pred)))


class RNNT(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.predictor, self.joiner = Encoder(), Predictor(), Joiner()
        self.ctc = nn.Linear(ENC_DIM, N_UNITS)  # training only

    def zero_state(self, batch: int):
        z = torch.zeros(1, batch, PRED_HIDDEN)
        return z, z.clone()


class _TransducerNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, blank, emit, t_len, u_len):
        nll, g_blank, g_emit = _transducer.lattice(blank.detach().numpy(), emit.detach().numpy(), t_len.numpy(), u_len.numpy())
        ctx.save_for_backward(torch.from_numpy(g_blank).to(blank.dtype), torch.from_numpy(g_emit).to(emit.dtype))
        return torch.from_numpy(nll).to(blank.dtype)

    @staticmethod
    def backward(ctx, grad):
        g_blank, g_emit = ctx.saved_tensors
        return g_blank * grad[:, None, None], g_emit * grad[:, None, None], None, None


def transducer_nll(log_probs, targets, t_len, u_len):
    """log_probs [B, T, U+1, V] (log-softmax of the joiner), targets [B, U] -> -log P per utterance [B]."""
    blank = log_probs[..., BLANK]
    idx = targets[:, None, :, None].expand(-1, log_probs.size(1), -1, 1)
    emit = log_probs[:, :, :-1, :].gather(3, idx)[..., 0]
    return _TransducerNLL.apply(blank, emit, t_len, u_len)


def enc_lengths(frames):
    return (torch.as_tensor(frames) // 2) // 2


def loss_fn(model: RNNT, x, xl, targets, tl):
    enc = model.encoder(x)
    el = enc_lengths(xl)
    b = x.size(0)
    tokens = F.pad(targets, (1, 0), value=BLANK)  # start token = blank
    pred, _, _ = model.predictor(tokens, *model.zero_state(b))
    logits = model.joiner(enc.unsqueeze(2), pred.unsqueeze(1))  # [B, T', U+1, V]
    nll = transducer_nll(F.log_softmax(logits, dim=-1), targets, el, tl)
    rnnt = nll.sum() / tl.sum()
    lp_ctc = F.log_softmax(model.ctc(enc), dim=-1).transpose(0, 1)
    flat = torch.cat([targets[i, : tl[i]] for i in range(b)])
    ctc = F.ctc_loss(lp_ctc, flat, el, tl, blank=BLANK, zero_infinity=True)
    return rnnt, ctc


@torch.no_grad()
def greedy_decode(model: RNNT, features: np.ndarray) -> list[int]:
    """features [T, 80] -> unit ids: per encoder frame, up to MAX_SYMBOLS non-blank argmaxes, the
    predictor advanced after each (the same loop as models/rnnt_sys/driver.py, in torch)."""
    enc = model.encoder(torch.from_numpy(np.asarray(features, np.float32))[None])[0]
    h, c = model.zero_state(1)
    pred, h2, c2 = model.predictor(torch.tensor([[BLANK]]), h, c)
    out = []
    for t in range(enc.size(0)):
        for _ in range(MAX_SYMBOLS):
            k = int(model.joiner(enc[t : t + 1], pred[:, 0]).argmax(-1)[0])
            if k == BLANK:
                break
            out.append(k)
            h, c = h2, c2
            pred, h2, c2 = model.predictor(torch.tensor([[k]]), h, c)
    return out


def evaluate_torch(model, feats, texts) -> dict:
    sys.path.insert(0, str(MODELS))
    from eval_asr import error_rates

    model.eval()
    hyps = [_text.decode_units(greedy_decode(model, f.astype(np.float32))) for f in feats]
    model.train()
    return error_rates(texts, hyps)


def _targets(texts, idx):
    seqs = [_text.encode_chars(texts[i]) for i in idx]
    tl = torch.tensor([len(s) for s in seqs])
    y = torch.zeros(len(seqs), int(tl.max()), dtype=torch.long)
    for j, s in enumerate(seqs):
        y[j, : len(s)] = torch.tensor(s)
    return y, tl


# --------------------------------------------------------------------------- data
def _sentences(n_train: int):
    """train_asr.build_data's train and dev sentences (same order, same seeds)."""
    entries = _text.fortune_entries()
    train_sents = _text.speech_sentences([e for e in entries if not _text.is_test(e)])
    held_sents = _text.speech_sentences([e for e in entries if _text.is_test(e)])
    rng = np.random.default_rng(train_asr.SEED)
    rng.shuffle(train_sents)
    rng.shuffle(held_sents)
    train_words = {t for _, t in train_sents}
    held_sents = [s for s in held_sents if s[1] not in train_words]
    test = [s for s in held_sents if 20 <= len(s[1]) <= 70][: train_asr.N_TEST]
    dev = [s for s in held_sents if s not in test][: train_asr.N_DEV]
    train = [train_sents[i % len(train_sents)] for i in range(n_train)]
    return train, dev


def build_data(work: Path, n_train: int, workers: int, chunk: int = CHUNK) -> None:
    """Dev (first N_DEV_EVAL) then train in chunks of ``chunk`` utterances, each written as soon as it
    is done (work/rnnt_train_KK.{npz,json}): the utterances train_asr.py synthesizes for the same
    indices, so training can start on the first chunks while the rest is synthesized."""
    train, dev = _sentences(n_train)
    sa = train_asr.SEED
    train_asr._synth_set("rnnt_dev", [(i, a, b, i % 2 == 1, sa + 1) for i, (a, b) in enumerate(dev[:N_DEV_EVAL])], work, workers)
    for k in range(0, n_train, chunk):
        jobs = [(i, a, b, False, sa) for i, (a, b) in enumerate(train[k : k + chunk], start=k)]
        train_asr._synth_set(f"rnnt_train_{k // chunk:02d}", jobs, work, workers)


def _load(work: Path, name: str):
    with np.load(work / f"{name}.npz", allow_pickle=False) as f:
        feats = [f[k] for k in sorted(f.files)]
    return feats, [m["text"] for m in json.loads((work / f"{name}.json").read_text())]


def _available_train(work: Path):
    feats, texts = [], []
    for meta in sorted(work.glob("rnnt_train_*.json")):  # the .json is written after its .npz
        f, t = _load(work, meta.stem)
        feats += f
        texts += t
    return feats, texts


def train(work: Path, steps: int, minutes: float, max_frames: int, lr: float, ckpt_minutes: float, half_life: int):
    torch.manual_seed(SEED)
    while not (work / "rnnt_dev.json").exists() or not list(work.glob("rnnt_train_*.json")):
        time.sleep(10)
    dev_feats, dev_texts = _load(work, "rnnt_dev")
    model = RNNT()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    warmup = 150

    def lr_at(step):  # a function of the step only: a resumed run continues the same schedule
        if step < warmup:
            return lr * (step + 1) / warmup
        segments = LR_SEGMENTS if half_life is None else ((0, 1.0, half_life, 1000),)
        _, scale, life, decay_from = max(seg for seg in segments if seg[0] <= step)
        return scale * lr * max(0.05, 0.5 ** (max(0, step - decay_from) / life))

    ckpt = work / "rnnt_ckpt.pt"
    step, epoch, skip, best = 0, 0, 0, {"cer": 9.9, "wer": 9.9, "state": None, "step": 0}
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, epoch, skip, best = state["step"], state["epoch"], state["batch"], state["best"]
        print(f"resumed at step {step} (epoch {epoch}, batch {skip})", flush=True)
    model.train()
    t0 = last_ckpt = time.time()
    seen, sums, n = 0, [0.0, 0.0], 0

    def checkpoint(bi):
        nonlocal best, last_ckpt
        rates = evaluate_torch(model, dev_feats, dev_texts)
        if rates["cer"] <= best["cer"]:
            best = {"cer": rates["cer"], "wer": rates["wer"], "state": {k: v.clone() for k, v in model.state_dict().items()}, "step": step}
        print(f"  dev WER {rates['wer']:.3f} CER {rates['cer']:.3f} (best CER {best['cer']:.3f} at {best['step']}) "
              f"{(time.time() - t0) / 60:.1f} min", flush=True)  # fmt: skip
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "epoch": epoch, "best": best, "batch": bi + 1}, ckpt)
        last_ckpt = time.time()

    done = False
    while step < steps and not done:
        feats, texts = _available_train(work)
        lengths = [len(f) for f in feats]
        print(f"epoch {epoch}: {len(feats)} training utterances", flush=True)
        rng = np.random.default_rng([SEED, epoch])
        plan = train_asr.batches(lengths, max_frames, rng)
        if epoch == 0:
            plan.sort(key=lambda idx: max(lengths[i] for i in idx))
        for bi, idx in enumerate(plan):
            if bi < skip:
                continue
            if step >= steps or time.time() - t0 > 60 * minutes:
                done = True
                break
            x, xl, _, _ = train_asr.collate(feats, texts, idx, rng)
            y, tl = _targets(texts, idx)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            rnnt, ctc = loss_fn(model, x, xl, y, tl)
            loss = rnnt + CTC_WEIGHT * ctc
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            step += 1
            seen += int(xl.sum())
            sums[0] += rnnt.item()
            sums[1] += ctc.item()
            n += 1
            if step % 25 == 0:
                el = time.time() - t0
                print(f"step {step} epoch {epoch} rnnt {sums[0] / n:.3f} ctc {sums[1] / n:.3f} lr {lr_at(step):.2e} "
                      f"{seen / el:.0f} frames/s {el / 60:.1f} min", flush=True)  # fmt: skip
                sums, n = [0.0, 0.0], 0
            if time.time() - last_ckpt > 60 * ckpt_minutes:
                checkpoint(bi)
        else:
            epoch, skip = epoch + 1, 0
    if step > 0 and (best["state"] is None or best["step"] != step):
        checkpoint(bi if plan else 0)
    model.load_state_dict(best["state"])
    print(f"training: {(time.time() - t0) / 60:.1f} min this run, {step} steps; best dev CER {best['cer']:.3f} "
          f"WER {best['wer']:.3f} at step {best['step']}", flush=True)  # fmt: skip
    return model.eval(), best


# --------------------------------------------------------------------------- export
class _JoinerExport(nn.Module):
    def __init__(self, joiner):
        super().__init__()
        self.j = joiner

    def forward(self, enc, pred):
        return self.j(enc, pred)


def export(model: RNNT, test_feats, test_texts, best: dict) -> dict:
    from _common import export as onnx_export
    from _common import ort_session

    OUT.mkdir(exist_ok=True)
    model.eval()
    x = torch.from_numpy(test_feats[0][:160].astype(np.float32))[None]
    onnx_export(model.encoder, (x,), OUT / "encoder.onnx", input_names=["features"], output_names=["enc"],
                dynamic_axes={"features": {0: "batch", 1: "time"}, "enc": {0: "batch", 1: "frames"}}, opset=17)  # fmt: skip
    h, c = model.zero_state(1)
    tok = torch.tensor([[5]])
    onnx_export(model.predictor, (tok, h, c), OUT / "predictor.onnx", input_names=["token", "h_in", "c_in"],
                output_names=["pred", "h_out", "c_out"],
                dynamic_axes={"token": {0: "batch"}, "h_in": {1: "batch"}, "c_in": {1: "batch"}, "pred": {0: "batch"},
                              "h_out": {1: "batch"}, "c_out": {1: "batch"}}, opset=17)  # fmt: skip
    with torch.no_grad():
        enc = model.encoder(x)[0]
        pred = model.predictor(tok, h, c)[0][:, 0]
    onnx_export(_JoinerExport(model.joiner), (enc[:1], pred), OUT / "joiner.onnx", input_names=["enc", "pred"],
                output_names=["logits"], dynamic_axes={"enc": {0: "n"}, "pred": {0: "n"}, "logits": {0: "n"}}, opset=17)  # fmt: skip
    # ORT vs torch on each graph
    import onnx

    for name in ("encoder", "predictor", "joiner"):
        onnx.checker.check_model(onnx.load(str(OUT / f"{name}.onnx")), full_check=True)
    with torch.no_grad():
        x2 = torch.from_numpy(test_feats[1].astype(np.float32))[None]
        ref_enc = model.encoder(x2).numpy()
        got = ort_session(OUT / "encoder.onnx").run(None, {"features": x2.numpy()})[0]
        np.testing.assert_allclose(got, ref_enc, rtol=1e-4, atol=1e-4)
        hs = torch.randn(1, 3, PRED_HIDDEN) * 0.5
        cs = torch.randn(1, 3, PRED_HIDDEN)
        toks = torch.tensor([[0], [7], [28]])
        ref = [t.numpy() for t in model.predictor(toks, hs, cs)]
        got = ort_session(OUT / "predictor.onnx").run(None, {"token": toks.numpy(), "h_in": hs.numpy(), "c_in": cs.numpy()})
        for a, b in zip(got, ref):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        e, p = torch.from_numpy(ref_enc[0, :4]), torch.from_numpy(ref[0][:, 0]).repeat(2, 1)[:4]
        got = ort_session(OUT / "joiner.onnx").run(None, {"enc": e.numpy(), "pred": p.numpy()})[0]
        np.testing.assert_allclose(got, model.joiner(e, p).numpy(), rtol=1e-4, atol=1e-4)
    refs = [{"key": f"{i:04d}", "text": test_texts[i], "tokens": greedy_decode(model, test_feats[i].astype(np.float32))} for i in range(N_REF)]
    for r in refs:
        r["hyp"] = _text.decode_units(r["tokens"])
    params = {k: sum(p.numel() for p in getattr(model, k).parameters()) for k in ("encoder", "predictor", "joiner")}
    doc = {
        "schema": "q4c.rnnt_reference/1",
        "note": "torch greedy transducer decode (models/train_rnnt.py greedy_decode) of test utterances, written at export",
        "max_symbols": MAX_SYMBOLS,
        "params": params,
        "best_step": best["step"],
        "dev": {"wer": best["wer"], "cer": best["cer"], "utterances": N_DEV_EVAL},
        "utterances": refs,
    }
    (OUT / "reference.json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/q4c-build/rnnt"), help="data chunks + checkpoint")
    parser.add_argument("--train-utts", type=int, default=7000)
    parser.add_argument("--steps", type=int, default=100000)
    parser.add_argument("--minutes", type=float, default=120.0, help="wall-time budget for this run's training")
    parser.add_argument("--ckpt-minutes", type=float, default=6.0)
    parser.add_argument("--max-frames", type=int, default=6400, help="padded frames per batch")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--half-life", type=int, help="one decay segment: halve every N steps after step 1000 (default: LR_SEGMENTS)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--export-only", action="store_true")
    parser.add_argument("--data-only", action="store_true", help="synthesize dev + train chunks (run beside training)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module=r"torch\.onnx.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.data_only:
        build_data(args.work, args.train_utts, args.workers)
        return 0
    model, best = train(args.work, 0 if args.export_only else args.steps, args.minutes, args.max_frames, args.lr,
                        args.ckpt_minutes, args.half_life)  # fmt: skip
    sys.path.insert(0, str(MODELS))
    from eval_asr import load_test_set

    doc, test_feats = load_test_set()
    info = export(model, test_feats, [u["text"] for u in doc["utterances"]], best)
    print(json.dumps({k: info[k] for k in ("params", "best_step", "dev")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
