"""--activations int8 after a plan that chose a codebook scheme (nf4 has no 8-bit form): the weight
becomes int8 per channel with uniform levels instead of failing (bench_calib's conformer run hit
`ConfigError: the nf4 scheme stores 2, 3, 4-bit indices, not 8`)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from q4c.calib.runner import collect
from q4c.config import CompileOptions
from q4c.passes.choose_kernels import ChooseKernelsPass
from q4c.pipeline import PassContext
from q4c.quant.plan import Form, FormBasis, PrecisionPlan, TensorPrecision
from q4c.testing import heavy_tailed, make_model, run_pass

vi = helper.make_tensor_value_info
F = TensorProto.FLOAT


def test_a_codebook_weight_takes_uniform_int8_levels(rng):
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        [vi("x", F, [8, 64])], [vi("y", F, [8, 32])],
        {"W": heavy_tailed(rng, (64, 32)), "b": rng.standard_normal(32).astype(np.float32)})
    samples = [{"x": rng.standard_normal((8, 64)).astype(np.float32)} for _ in range(4)]
    ctx = PassContext(options=CompileOptions(activations="int8", observer="minmax"), samples=samples)
    ctx.calibration = collect(model, samples, observer="minmax")
    ctx.plan = PrecisionPlan({"W": TensorPrecision(4, "channels:2", "nf4")})
    run_pass(ChooseKernelsPass(), model, ctx=ctx)
    assert ctx.plan.tensors["W"] == TensorPrecision(8, "channel", "symmetric", Form.INT8_ACTIVATIONS, FormBasis.OPTION)
