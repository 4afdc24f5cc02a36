"""Train the bundled word-level language model ``lstm_lm`` on Debian's fortunes.

    apt-get install fortunes                    # build-time only
    python models/train_lm.py                   # ~25 min on one thread
    python models/eval_lm.py models/lstm_lm.onnx

Text: every English fortune file (models/_text.py), lower-cased words plus sentence punctuation,
an ``<eos>`` token after each entry; 1 entry in 20 (by a hash of its text) is held out as the
test text. Vocabulary: the 2000 most frequent training tokens + ``<unk>`` (id 0), written to
models/data/lstm_lm_vocab.json. Model: Embedding(2001, 128) -> LSTM(512) -> Linear(512 -> 128)
-> output tied to the embedding (+ bias) -> log_softmax. Training: windows of SEQ tokens from a
zero state (exactly what the exported, state-less graph computes), Adam, dropout, a fixed number
of epochs (seeded, one thread); checkpoint after every epoch. Export: TorchScript exporter,
constant folding on, opset 17 (as models/make_models.py exports), verified against onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _text  # noqa: E402

MODELS = Path(__file__).resolve().parent
DATA = MODELS / "data"
SEED = 11
N_WORDS, EMBED, HIDDEN = 2000, 128, 512
VOCAB = N_WORDS + 1  # + <unk> = id 0
SEQ = 64  # training and evaluation window (tokens), from a zero LSTM state


class LSTMLM(nn.Module):
    """Embedding -> LSTM(512) -> Linear(512 -> 128) -> output tied to the embedding.

    The tied output runs on [batch * seq, 128] (as PyTorch's word_language_model example does),
    so the export is a Gemm with transB=1 sharing the embedding initializer with the Gather."""

    def __init__(self, dropout: float = 0.3):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, EMBED)
        self.lstm = nn.LSTM(EMBED, HIDDEN, 1, batch_first=True)
        self.proj = nn.Linear(HIDDEN, EMBED)
        self.out_bias = nn.Parameter(torch.zeros(VOCAB))
        self.drop = nn.Dropout(dropout)
        nn.init.normal_(self.embed.weight, std=0.1)

    def forward(self, tokens):
        b, t = tokens.size()
        y, _ = self.lstm(self.drop(self.embed(tokens)))
        logits = F.linear(self.proj(self.drop(y)).reshape(b * t, EMBED), self.embed.weight, self.out_bias)
        return F.log_softmax(logits.view(b, t, VOCAB), dim=-1)


def build_corpus():
    entries = _text.fortune_entries()
    train = [w for e in entries if not _text.is_test(e) for w in _text.lm_words(e)]
    test = [w for e in entries if _text.is_test(e) for w in _text.lm_words(e)]
    counts = Counter(train)
    vocab = ["<unk>"] + [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:N_WORDS]]
    index = {w: i for i, w in enumerate(vocab)}
    ids = lambda words: np.array([index.get(w, 0) for w in words], dtype=np.int64)  # noqa: E731
    return vocab, ids(train), ids(test)


def windows(stream: np.ndarray, seq: int) -> np.ndarray:
    """Non-overlapping [n, seq] windows (the tail that does not fill one is dropped)."""
    n = len(stream) // seq
    return stream[: n * seq].reshape(n, seq)


@torch.no_grad()
def perplexity_torch(model, test: np.ndarray) -> float:
    model.eval()
    w = torch.from_numpy(windows(test, SEQ))
    nll, count = 0.0, 0
    for i in range(0, len(w), 64):
        x = w[i : i + 64]
        lp = model(x)[:, :-1]
        nll -= float(lp.gather(-1, x[:, 1:, None]).sum())
        count += x[:, 1:].numel()
    model.train()
    return math.exp(nll / count)


def train(train_ids, test_ids, work: Path, epochs: int, batch: int, lr: float):
    torch.manual_seed(SEED)
    model = LSTMLM()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ckpt = work / "lm_ckpt.pt"
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["epoch"]
        print(f"resumed after epoch {start}", flush=True)
    t0 = time.time()
    for epoch in range(start, epochs):
        rng = np.random.default_rng([SEED, epoch])
        offset = int(rng.integers(0, SEQ))  # a new window phase every epoch
        w = windows(train_ids[offset:], SEQ)[rng.permutation(len(train_ids[offset:]) // SEQ)]
        for g in opt.param_groups:  # cosine over epochs
            g["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * epoch / max(1, epochs - 1))))
        total, n = 0.0, 0
        for i in range(0, len(w) - batch + 1, batch):
            x = torch.from_numpy(w[i : i + batch])
            lp = model(x)[:, :-1]
            loss = F.nll_loss(lp.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total, n = total + loss.item(), n + 1
        ppl = perplexity_torch(model, test_ids)
        print(f"epoch {epoch + 1}/{epochs} train ppl {math.exp(total / n):.1f} test ppl {ppl:.1f} "
              f"lr {opt.param_groups[0]['lr']:.1e} {(time.time() - t0) / 60:.1f} min", flush=True)  # fmt: skip
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch + 1}, ckpt)
    return model.eval()


def export(model, vocab, test_ids) -> dict:
    from _common import check_dynamic, export as onnx_export, save_and_verify

    DATA.mkdir(exist_ok=True)
    np.savez_compressed(DATA / "lstm_lm_test.npz", tokens=test_ids.astype(np.int16))
    (DATA / "lstm_lm_vocab.json").write_text(json.dumps({"schema": "q4c.lm_vocab/1", "unk": 0, "seq": SEQ, "vocab": vocab}) + "\n")
    tokens = test_ids[:20][None].astype(np.int64)
    x = torch.from_numpy(tokens)
    with torch.no_grad():
        y = model(x).numpy()
    axes = {"tokens": {0: "batch", 1: "seq"}, "log_probs": {0: "batch", 1: "seq"}}
    onnx_export(model, (x,), MODELS / "lstm_lm.onnx", input_names=["tokens"], output_names=["log_probs"], dynamic_axes=axes, opset=17)
    info = save_and_verify("lstm_lm", {"tokens": tokens}, {"log_probs": y})
    t2 = windows(test_ids[100:], 7)[:2]
    with torch.no_grad():
        check_dynamic("lstm_lm", {"tokens": t2}, {"log_probs": model(torch.from_numpy(t2)).numpy()})
    return info


#: Calibration set: 8 samples of 4 training windows each (q4c compile --calib models/data/lstm_lm_calib).
CALIB_SAMPLES, CALIB_BATCH = 8, 4


def export_calib(vocab, train_ids) -> Path:
    """models/data/lstm_lm_calib/NNN.npz: `tokens` [4, SEQ] windows drawn (seeded) from the
    *training* text, so calibrating never sees the test text. The vocabulary must be the
    committed one (the ids would mean other words otherwise)."""
    committed = json.loads((DATA / "lstm_lm_vocab.json").read_text())["vocab"] if (DATA / "lstm_lm_vocab.json").exists() else vocab
    if committed != vocab:
        raise SystemExit("the rebuilt vocabulary differs from models/data/lstm_lm_vocab.json: retrain instead")
    rng = np.random.default_rng([SEED, 1])
    w = windows(train_ids, SEQ)
    picked = w[rng.choice(len(w), CALIB_SAMPLES * CALIB_BATCH, replace=False)]
    out = DATA / "lstm_lm_calib"
    out.mkdir(parents=True, exist_ok=True)
    for i in range(CALIB_SAMPLES):
        np.savez_compressed(out / f"{i:03d}.npz", tokens=picked[i * CALIB_BATCH : (i + 1) * CALIB_BATCH].astype(np.int16))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/q4c-build/lm"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--calib-only", action="store_true", help="only (re)write models/data/lstm_lm_calib")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module=r"torch\.onnx.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    args.work.mkdir(parents=True, exist_ok=True)
    vocab, train_ids, test_ids = build_corpus()
    print(f"train {len(train_ids):,d} tokens, test {len(test_ids):,d} tokens, "
          f"unk {np.mean(train_ids == 0):.3f} / {np.mean(test_ids == 0):.3f}", flush=True)  # fmt: skip
    if args.calib_only:
        print(export_calib(vocab, train_ids))
        return 0
    model = train(train_ids, test_ids, args.work, args.epochs, args.batch, args.lr)
    info = export(model, vocab, test_ids)
    export_calib(vocab, train_ids)
    from eval_lm import evaluate

    print(json.dumps({"params": info["params"], "bytes": info["bytes"], "test": evaluate(MODELS / "lstm_lm.onnx")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
