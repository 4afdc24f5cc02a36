"""The trained RNN-T system models/rnnt_sys (models/train_rnnt.py): its transducer loss, its
greedy decode driver, and its accuracy on the bilstm_am test set.

References are independent of the code under test: the loss against a brute-force sum over
every alignment; the ONNX decode against the transcripts torch's own decode wrote at export
(models/rnnt_sys/reference.json); WER against the human transcripts of the test set."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

MODELS = Path(__file__).resolve().parents[2] / "models"
SYSTEM = MODELS / "rnnt_sys"
sys.path.insert(0, str(MODELS))

import _transducer  # noqa: E402
import eval_rnnt  # noqa: E402

WER_BOUND, CER_BOUND = 0.50, 0.23  # FP32 on these 24: WER 44.07 %, CER 19.18 % (ORT 1 thread)
REFERENCE = json.loads((SYSTEM / "reference.json").read_text())


def _lattice_case(rng, b, t, u, v):
    logits = rng.normal(0, 2, (b, t, u + 1, v))
    lp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    y = rng.integers(1, v, (b, u))
    emit = np.take_along_axis(lp[:, :, :u, :], np.broadcast_to(y[:, None, :, None], (b, t, u, 1)), -1)[..., 0]
    return lp[..., 0], emit


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_transducer_loss_and_gradients_match_brute_force_over_alignments(seed):
    rng = np.random.default_rng(seed)
    blank, emit = _lattice_case(rng, 4, 5, 4, 6)
    t_len, u_len = np.array([5, 3, 1, 4]), np.array([4, 2, 3, 0])  # padding in both axes, T=1, U=0
    nll, g_blank, g_emit = _transducer.lattice(blank, emit, t_len, u_len)
    for i in range(4):
        want, want_gb, want_ge, n_paths = _transducer.brute_force(blank[i], emit[i], t_len[i], u_len[i])
        assert n_paths > 0
        np.testing.assert_allclose(nll[i], want, rtol=1e-12)
        np.testing.assert_allclose(g_blank[i], want_gb, atol=1e-12)
        np.testing.assert_allclose(g_emit[i], want_ge, atol=1e-12)
    # 5 frames x 4 labels: C(4 + 4, 4) = 70 alignments were summed
    assert _transducer.brute_force(blank[0], emit[0], 5, 4)[3] == 70


def test_transducer_loss_uniform_lattice_is_the_alignment_count():
    # every arc probability 1/2: P = n_alignments / 2^(T + U), n = C(T - 1 + U, U)
    t, u = 6, 3
    blank = np.full((1, t, u + 1), np.log(0.5))
    emit = np.full((1, t, u), np.log(0.5))
    nll, _, _ = _transducer.lattice(blank, emit, [t], [u])
    np.testing.assert_allclose(nll[0], -np.log(56 / 2 ** (t + u)), rtol=1e-12)  # C(8, 3) = 56


def test_transducer_gradient_matches_finite_differences():
    rng = np.random.default_rng(5)
    blank, emit = _lattice_case(rng, 2, 4, 3, 5)
    t_len, u_len = np.array([4, 3]), np.array([3, 2])
    _, g_blank, g_emit = _transducer.lattice(blank, emit, t_len, u_len)
    eps = 1e-6
    for arr, grad in ((blank, g_blank), (emit, g_emit)):
        for idx in [(0, 0, 0), (0, 2, 1), (1, 1, 1), (1, 2, 2)]:
            if idx[2] >= arr.shape[2]:
                continue
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += eps
            minus[idx] -= eps
            def nll(a, is_blank=arr is blank):
                return _transducer.lattice(*((a, emit) if is_blank else (blank, a)), t_len, u_len)[0].sum()

            fd = (nll(plus) - nll(minus)) / (2 * eps)
            np.testing.assert_allclose(grad[idx], fd, atol=1e-6)


@pytest.fixture(scope="module")
def system():
    doc, feats = eval_rnnt.load_test_set()
    return eval_rnnt.sessions(eval_rnnt.default_paths()), eval_rnnt.driver(), doc, feats


def test_onnx_decode_equals_torch_greedy_decode_written_at_export(system):
    graphs, drv, _, feats = system
    for ref in REFERENCE["utterances"][:3]:
        tokens, _ = drv.decode(graphs, feats[int(ref["key"])].astype(np.float32)[None])
        assert tokens == ref["tokens"], ref["key"]


def test_decode_driver_is_deterministic_and_follows_the_system_contract(system):
    graphs, drv, _, feats = system
    sample = {"features": feats[4].astype(np.float32)[None]}
    a, b = drv.run(graphs, sample), drv.run(graphs, sample)
    assert set(a) == {"tokens", "logits"}
    assert a["tokens"].dtype == np.int64 and a["logits"].dtype == np.float32
    assert a["logits"].shape == (feats[4].shape[0] // 4, 29)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(a["logits"], b["logits"])
    calib = list(drv.samples())
    assert len(calib) == 24 and all(s["features"].shape[0] == 1 and s["features"].shape[2] == 80 for s in calib)


def test_greedy_decode_emits_blank_argmax_frames_only_without_tokens(system):
    # a frame whose first joiner step argmaxes to blank emits nothing at that frame: tokens can
    # only come from frames whose first-step argmax is a unit, so #tokens >= #such frames
    graphs, drv, _, feats = system
    out = drv.run(graphs, {"features": feats[5].astype(np.float32)[None]})
    starting = int((out["logits"].argmax(-1) != 0).sum())
    assert starting <= len(out["tokens"]) <= drv.MAX_SYMBOLS * starting


def test_wer_on_the_first_test_utterances_is_within_the_documented_bound():
    r = eval_rnnt.evaluate(limit=24)
    # FP32 on all 160 test utterances: see models/README.md; the bound leaves room for ORT versions
    assert r["wer"] <= WER_BOUND, r["examples"]
    assert r["cer"] <= CER_BOUND, r["examples"]


def test_system_spec_loads_with_q4c():
    from q4c.system import load_spec

    spec = load_spec(SYSTEM / "system.toml")
    assert set(spec.graphs) == {"encoder", "predictor", "joiner"}
    assert all(p.is_file() for p in spec.graphs.values())
