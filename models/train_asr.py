"""Train the bundled speech recognizer ``bilstm_am`` (3 x BiLSTM + CTC over characters).

    apt-get install espeak-ng sox fortunes      # build-time only
    python models/train_asr.py                  # data (~10 min, 2 processes) + training (~90 CPU min) + export
    python models/eval_asr.py models/bilstm_am.onnx

Stages, each cached in --work (default /tmp/q4c-build/asr) so a crash loses little:
1. data: sentences from Debian's fortunes (models/_text.py; test sentences come from held-out
   entries), spoken by espeak-ng and perturbed by sox (models/_speech.py), 80-dim log-mel
   features in numpy. Train: --train-utts utterances, 7 dialects x 15 voice variants. Dev (for
   picking the checkpoint) and test: other sentences; half of the test set in a dialect never
   heard in training (en-029).
2. train: Adam, CTC (blank 0), SpecAugment-style masks, length-bucketed batches (shortest
   first in the first epoch), a step-count-independent learning-rate schedule (``lr_at``), the
   checkpoint with the best dev CER kept (seeded, one thread: same torch version -> same
   weights; a resumed run differs only in SpecAugment draws); checkpoint every 200 steps.
3. export: models/bilstm_am.onnx exactly as the other bundled models are exported
   (TorchScript exporter, no constant folding, opset 17), the test set
   (models/data/bilstm_am_test.{npz,json}), bilstm_am.npz (the first 160 frames of a test utterance) and
   bilstm_am.ref.npz (torch's output for it), checked against onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _speech  # noqa: E402
import _text  # noqa: E402

MODELS = Path(__file__).resolve().parent
DATA = MODELS / "data"
SEED = 7
HIDDEN, LAYERS, DROPOUT = 128, 3, 0.15
N_UNITS = len(_text.UNITS)  # blank + space + apostrophe + a-z = 29
N_TEST, N_DEV = 160, 150
# Learning rate after the warmup, as (from step, x --lr, halve every N steps): the first decay
# was too fast (CTC's all-blank plateau took ~400 steps), hence two warm restarts; the third (at
# 3400) continues a run whose dev CER was still falling when its rate had decayed to 6 %.
LR_SEGMENTS = ((100, 1.0, 300), (800, 0.67, 500), (1400, 0.33, 800), (3400, 0.25, 1600))


class BiLSTMAM(nn.Module):
    """features [B, T, 80] -> 3 x BiLSTM(128) -> Linear(256 -> 29) -> log_softmax (blank = 0)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(_speech.N_MELS, HIDDEN, num_layers=LAYERS, bidirectional=True, batch_first=True, dropout=DROPOUT)
        self.out = nn.Linear(2 * HIDDEN, N_UNITS)

    def forward(self, features):
        y, _ = self.rnn(features)
        return F.log_softmax(self.out(y), dim=-1)


# --------------------------------------------------------------------------- data
def _utterance(job):
    index, text, transcript, held_out, seed = job
    rng = np.random.default_rng([seed, index])
    spec = _speech.pick_voice(rng, held_out=held_out)
    feats = _speech.log_mel(_speech.synthesize(text, spec, seed * 1_000_003 + index))
    return feats.astype(np.float16), transcript, spec


def _synth_set(name, jobs, work: Path, workers: int):
    path = work / f"{name}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads((work / f"{name}.json").read_text())
            return [f[k] for k in sorted(f.files)], meta
    t0 = time.time()
    with Pool(workers) as pool:
        results = pool.map(_utterance, jobs, chunksize=16)
    feats = [r[0] for r in results]
    meta = [{"text": r[1], **r[2]} for r in results]
    np.savez(path, **{f"{i:05d}": x for i, x in enumerate(feats)})
    (work / f"{name}.json").write_text(json.dumps(meta))
    frames = sum(len(x) for x in feats)
    print(f"{name}: {len(feats)} utterances, {frames / 100 / 3600:.2f} h, {time.time() - t0:.0f} s", flush=True)
    return feats, meta


def build_data(work: Path, n_train: int, workers: int):
    entries = _text.fortune_entries()
    train_sents = _text.speech_sentences([e for e in entries if not _text.is_test(e)])
    held_sents = _text.speech_sentences([e for e in entries if _text.is_test(e)])
    rng = np.random.default_rng(SEED)
    rng.shuffle(train_sents)
    rng.shuffle(held_sents)
    train_words = {t for _, t in train_sents}
    held_sents = [s for s in held_sents if s[1] not in train_words]
    test_pool = [s for s in held_sents if 20 <= len(s[1]) <= 70]  # short: the committed test set stays small
    test = test_pool[:N_TEST]
    dev = [s for s in held_sents if s not in test][:N_DEV]
    train = [train_sents[i % len(train_sents)] for i in range(n_train)]
    jobs = lambda sents, held, seed: [(i, a, b, held(i), seed) for i, (a, b) in enumerate(sents)]  # noqa: E731
    sets = {
        "train": _synth_set("train", jobs(train, lambda i: False, SEED), work, workers),
        "dev": _synth_set("dev", jobs(dev, lambda i: i % 2 == 1, SEED + 1), work, workers),
        "test": _synth_set("test", jobs(test, lambda i: i % 2 == 1, SEED + 2), work, workers),
    }
    return sets


# --------------------------------------------------------------------------- training
def batches(lengths, max_frames: int, rng: np.random.Generator):
    order = np.argsort(np.asarray(lengths) + rng.uniform(0, 30, len(lengths)))  # noisy sort: varied batches
    out, cur, longest = [], [], 0
    for i in order:
        longest2 = max(longest, lengths[i])
        if cur and longest2 * (len(cur) + 1) > max_frames:
            out.append(cur)
            cur, longest2 = [], lengths[i]
        cur.append(int(i))
        longest = longest2
    if cur:
        out.append(cur)
    rng.shuffle(out)
    return out


def collate(feats, texts, idx, rng: np.random.Generator | None):
    lens = [len(feats[i]) for i in idx]
    x = np.zeros((len(idx), max(lens), _speech.N_MELS), np.float32)
    for j, i in enumerate(idx):
        f = feats[i].astype(np.float32)
        if rng is not None:  # SpecAugment: 2 frequency masks (<= 12 bands), time masks (<= 25 frames, 1 per 2 s)
            f = f.copy()
            for _ in range(2):
                w = int(rng.integers(0, 13))
                s = int(rng.integers(0, _speech.N_MELS - w))
                f[:, s : s + w] = 0.0
            for _ in range(max(1, len(f) // 200)):
                w = int(rng.integers(0, 26))
                s = int(rng.integers(0, max(1, len(f) - w)))
                f[s : s + w] = 0.0
        x[j, : len(f)] = f
    targets = [torch.tensor(_text.encode_chars(texts[i])) for i in idx]
    return torch.from_numpy(x), torch.tensor(lens), torch.cat(targets), torch.tensor([len(t) for t in targets])


def greedy(log_probs: np.ndarray) -> str:
    ids = log_probs.argmax(-1)
    keep = np.concatenate([[True], ids[1:] != ids[:-1]])
    return _text.decode_units(ids[keep])


@torch.no_grad()
def evaluate_torch(model, feats, texts) -> dict:
    sys.path.insert(0, str(MODELS))
    from eval_asr import error_rates

    model.eval()
    hyps = []
    for i in range(len(feats)):
        y = model(torch.from_numpy(feats[i].astype(np.float32))[None])[0].numpy()
        hyps.append(greedy(y))
    model.train()
    return error_rates(texts, hyps)


def train(sets, work: Path, steps: int, max_frames: int, lr: float):
    torch.manual_seed(SEED)
    feats, meta = sets["train"]
    texts = [m["text"] for m in meta]
    lengths = [len(f) for f in feats]
    dev_feats, dev_meta = sets["dev"]
    dev_texts = [m["text"] for m in dev_meta]
    model = BiLSTMAM()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    warmup = 100

    def lr_at(step):  # independent of --steps: a run stopped at step N equals a run with --steps N
        if step < warmup:  # linear warmup
            return lr * (step + 1) / warmup
        start, scale, half_life = max(seg for seg in LR_SEGMENTS if seg[0] <= step)
        return scale * lr * max(0.03, 0.5 ** ((step - start) / half_life))

    ckpt = work / "asr_ckpt.pt"
    step, epoch, skip, best = 0, 0, 0, {"cer": 9.9, "state": None, "step": 0}
    if ckpt.exists():  # resume (bit-identical to an uninterrupted run only up to the SpecAugment draws)
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, epoch, skip, best = state["step"], state["epoch"], state["batch"], state["best"]
        print(f"resumed at step {step} (epoch {epoch}, batch {skip})", flush=True)
    ctc = nn.CTCLoss(blank=0, zero_infinity=True)
    model.train()
    t0, seen, loss_sum, n_loss = time.time(), 0, 0.0, 0
    while step < steps:
        rng = np.random.default_rng([SEED, epoch])
        plan = batches(lengths, max_frames, rng)
        if epoch == 0:  # SortaGrad: short utterances first, CTC leaves its all-blank plateau sooner
            plan.sort(key=lambda idx: max(lengths[i] for i in idx))
        for bi, idx in enumerate(plan):
            if step >= steps:
                break
            if bi < skip:
                continue
            x, xl, y, yl = collate(feats, texts, idx, rng)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            lp = model(x).transpose(0, 1)  # [T, B, U]
            loss = ctc(lp, y, xl, yl)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            step += 1
            seen += int(xl.sum())
            loss_sum, n_loss = loss_sum + loss.item(), n_loss + 1
            if step % 50 == 0:
                el = time.time() - t0
                print(f"step {step}/{steps} epoch {epoch} loss {loss_sum / n_loss:.3f} lr {lr_at(step):.2e} "
                      f"{seen / el:.0f} frames/s {el / 60:.1f} min", flush=True)  # fmt: skip
                loss_sum, n_loss = 0.0, 0
            if step % 200 == 0 or step == steps:
                rates = evaluate_torch(model, dev_feats, dev_texts)
                if rates["cer"] <= best["cer"]:
                    best = {"cer": rates["cer"], "wer": rates["wer"], "state": {k: v.clone() for k, v in model.state_dict().items()}, "step": step}
                print(f"  dev WER {rates['wer']:.3f} CER {rates['cer']:.3f} (best CER {best['cer']:.3f} at {best['step']})", flush=True)
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "epoch": epoch, "best": best, "batch": bi + 1}, ckpt)
        else:
            epoch, skip = epoch + 1, 0
    model.load_state_dict(best["state"])
    print(f"training: {(time.time() - t0) / 60:.1f} min this run; best dev CER {best['cer']:.3f} at step {best['step']}", flush=True)
    return model.eval(), best


# --------------------------------------------------------------------------- export
def export(model, sets) -> dict:
    sys.path.insert(0, str(MODELS))
    from _common import export as onnx_export, save_and_verify, check_dynamic

    feats, meta = sets["test"]
    DATA.mkdir(exist_ok=True)
    np.savez_compressed(DATA / "bilstm_am_test.npz", **{f"{i:04d}": f for i, f in enumerate(feats)})
    held = [_speech.HELD_OUT_DIALECT in m["voice"] for m in meta]
    doc = {
        "schema": "q4c.asr_test/1",
        "units": _text.UNITS,
        "features": "log-mel 80, 25 ms Hann window, 10 ms hop, 16 kHz, per-utterance per-feature normalized (models/_speech.py)",
        "utterances": [{"key": f"{i:04d}", "text": m["text"], "voice": m["voice"], "held_out_voice": h, "frames": int(len(f))}
                       for i, (f, m, h) in enumerate(zip(feats, meta, held))],  # fmt: skip
    }
    (DATA / "bilstm_am_test.json").write_text(json.dumps(doc, indent=1) + "\n")
    sample = feats[0][:160].astype(np.float32)[None]  # first 1.6 s of test utterance 0 (tests assume 160 frames)
    x = torch.from_numpy(sample)
    with torch.no_grad():
        y = model(x).numpy()
    axes = {"features": {0: "batch", 1: "time"}, "log_probs": {0: "batch", 1: "time"}}
    onnx_export(model, (x,), MODELS / "bilstm_am.onnx", input_names=["features"], output_names=["log_probs"],
                dynamic_axes=axes, opset=17, mode="nofold")  # fmt: skip
    info = save_and_verify("bilstm_am", {"features": sample}, {"log_probs": y})
    x2 = np.stack([feats[1][:90], feats[2][:90]]).astype(np.float32)
    with torch.no_grad():
        check_dynamic("bilstm_am", {"features": x2}, {"log_probs": model(torch.from_numpy(x2)).numpy()})
    return info


#: Calibration set: the first N_CALIB dev utterances (never the test set), one per file.
N_CALIB = 24


def export_calib(sets) -> Path:
    """models/data/bilstm_am_calib/NNN.npz: `features` [1, T, 80] float16 of dev utterances
    (q4c compile --calib models/data/bilstm_am_calib). Dev sentences are held out from training
    like the test sentences, but are not the test sentences."""
    feats, _ = sets["dev"]
    out = DATA / "bilstm_am_calib"
    out.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(feats[:N_CALIB]):
        np.savez_compressed(out / f"{i:03d}.npz", features=f.astype(np.float16)[None])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/q4c-build/asr"))
    parser.add_argument("--train-utts", type=int, default=7000)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--max-frames", type=int, default=6400, help="padded frames per batch")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--workers", type=int, default=2, help="synthesis processes")
    parser.add_argument("--data-only", action="store_true")
    parser.add_argument("--export-only", action="store_true", help="export the best checkpoint so far (no training)")
    parser.add_argument("--calib-only", action="store_true", help="only (re)write models/data/bilstm_am_calib")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module=r"torch\.onnx.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    args.work.mkdir(parents=True, exist_ok=True)
    sets = build_data(args.work, args.train_utts, args.workers)
    if args.data_only:
        return 0
    if args.calib_only:
        print(export_calib(sets))
        return 0
    model, best = train(sets, args.work, 0 if args.export_only else args.steps, args.max_frames, args.lr)
    info = export(model, sets)
    export_calib(sets)
    sys.path.insert(0, str(MODELS))
    from eval_asr import evaluate

    result = evaluate(MODELS / "bilstm_am.onnx")
    print(json.dumps({"params": info["params"], "bytes": info["bytes"], "best_step": best["step"], "test": result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
