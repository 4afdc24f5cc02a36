"""An LSTM whose per-step output Y is not read (Silero VAD's decoder LSTM: only Y_h and Y_c) lowers
to a Scan with no scan outputs; the Scan then carries no scan_output_directions (an empty list
attribute has no type, and exporting it failed: `q4c compile silero_vad.onnx --bits 4 --kernels
low-bit` was an internal error)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

import q4c
from q4c.testing import make_model, run_interp, run_ort, sqnr_db


def _lstm_without_y(rng, t=4, b=1, i=64, h=64):
    inits = {"W": (rng.standard_normal((1, 4 * h, i)) * 0.2).astype(np.float32),
             "R": (rng.standard_normal((1, 4 * h, h)) * 0.2).astype(np.float32)}
    node = helper.make_node("LSTM", ["X", "W", "R"], ["", "Y_h", "Y_c"], hidden_size=h)
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, [1, b, h]) for o in ("Y_h", "Y_c")]
    model = make_model([node], [helper.make_tensor_value_info("X", TensorProto.FLOAT, [t, b, i])], outputs, inits)
    return model, {"X": rng.standard_normal((t, b, i)).astype(np.float32)}


def test_an_lstm_without_y_lowers_to_a_scan_without_scan_outputs(tmp_path, rng):
    model, feeds = _lstm_without_y(rng)
    onnx.save(model, tmp_path / "m.onnx")
    report = q4c.compile_file(tmp_path / "m.onnx", tmp_path / "q.onnx", q4c.CompileOptions(bits=4, kernels="low-bit"),
                              verify=False)
    compiled = onnx.load(str(tmp_path / "q.onnx"))
    [scan] = [n for n in compiled.graph.node if n.op_type == "Scan"]
    assert {a.name for a in scan.attribute} == {"body", "num_scan_inputs", "scan_input_directions"}
    assert len(scan.output) == 2  # the final h and c only
    assert {t["form"] for t in report["plan"]["tensors"].values()} == {"scan-matmulnbits"}
    # optimized, as deployed: unoptimized ONNX Runtime 1.32 returns zeros from MatMulNBits whose
    # scales come from a Cast that is not folded (with or without Y; not this fix's concern)
    via_ort = run_ort(compiled, feeds, optimized=True)
    via_interp = run_interp(compiled, feeds)
    fp32 = run_ort(model, feeds)
    for name in ("Y_h", "Y_c"):
        np.testing.assert_allclose(via_interp[name], via_ort[name], rtol=0, atol=0.02)  # int8 activations in MatMulNBits
        assert sqnr_db(fp32[name], via_ort[name]) > 15
