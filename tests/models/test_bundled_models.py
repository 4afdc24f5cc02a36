"""The committed FP32 models under models/ load, pass the full checker and reproduce torch.

Every ``<name>.onnx`` with a ``<name>.ref.npz`` is checked: onnxruntime (no graph optimizations,
so its fusions cannot hide a broken graph) on ``<name>.npz`` must match the outputs torch
computed when the model was generated (models/make_models.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

MODELS = Path(__file__).resolve().parents[2] / "models"
EXPECTED = [
    "bilstm_am", "rnnt_encoder", "rnnt_predictor", "rnnt_joiner", "conformer", "lstm_lm",
    "transformer_lm", "gru_am", "lstm_unrolled", "lstm_unrolled_concat", "lstm_scan",
]  # fmt: skip
SIZE_LIMIT = 40 * 2**20  # what `du -sh models` shows as 40M
NAMES = sorted({p.name.removesuffix(".ref.npz") for p in MODELS.glob("*.ref.npz")} | set(EXPECTED))


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", NAMES)
def test_bundled_model_is_valid_and_matches_torch_reference(name):
    path = MODELS / f"{name}.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 10  # onnxruntime 1.31 refuses newer IR versions

    with np.load(MODELS / f"{name}.npz") as f:
        feeds = dict(f)
    with np.load(MODELS / f"{name}.ref.npz") as f:
        ref = dict(f)
    assert list(feeds) == [i.name for i in model.graph.input]
    assert list(ref) == [o.name for o in model.graph.output]

    got = _session(path).run(list(ref), feeds)
    for key, value in zip(ref, got):
        assert value.shape == ref[key].shape, key
        np.testing.assert_allclose(value, ref[key], rtol=1e-4, atol=1e-5, err_msg=f"{name}:{key}")


def test_models_folder_stays_under_40_mb():
    files = [p for p in MODELS.rglob("*") if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".q4.onnx")]
    total = sum(p.stat().st_size for p in files)
    assert total < SIZE_LIMIT, f"models/ holds {total / 2**20:.1f} MiB; the limit is 40 MiB"
