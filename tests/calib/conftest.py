"""Calibration data for the bundled models: a directory of seeded variations of the committed
sample (`models/<name>.npz`): float inputs cropped along their symbolic time axis and perturbed,
token inputs redrawn, a stateful model's step inputs lengthened into sequences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from q4c.calib.readers import infer_state_pairs, input_specs

MODELS = Path(__file__).resolve().parent.parent.parent / "models"
BUNDLED = sorted(p.stem for p in MODELS.glob("*.onnx") if not p.name.endswith(".q4.onnx"))


def vocab_size(model: onnx.ModelProto, name: str) -> int:
    """The rows of the table an integer input indexes (Gather in the main graph), else 2."""
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    consts = {n.output[0]: list(a.t.dims) for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"}
    shapes.update(consts)
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[1] == name and node.input[0] in shapes:
            return shapes[node.input[0]][0]
    return 2


def make_sample_dir(name: str, directory: Path, count: int = 32, seed: int = 0, max_frames: int = 48) -> Path:
    """`count` .npz samples for bundled model `name` in `directory`."""
    model = onnx.load(MODELS / f"{name}.onnx")
    base = dict(np.load(MODELS / f"{name}.npz"))
    specs = {s.name: s for s in input_specs(model)}
    state_inputs = set(infer_state_pairs(model).values())
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        sample = {}
        for key, value in base.items():
            spec = specs[key]
            if key in state_inputs:
                if i % 2:  # half the sequences start from the committed state, half from zero
                    sample[key] = (value * rng.uniform(0.5, 1.5)).astype(value.dtype)
                continue
            if np.issubdtype(value.dtype, np.integer):
                fixed = isinstance(spec.shape[1], int) and spec.shape[1] > 0
                length = int(rng.integers(4, 9)) if fixed else int(rng.integers(8, value.shape[1] + 1))
                sample[key] = rng.integers(0, vocab_size(model, key), size=(value.shape[0], length)).astype(value.dtype)
                continue
            crop = value
            for axis, dim in enumerate(spec.shape):
                if isinstance(dim, str) and axis > 0 and value.shape[axis] > 8:
                    length = int(rng.integers(min(16, value.shape[axis]), min(max_frames, value.shape[axis]) + 1))
                    start = int(rng.integers(0, value.shape[axis] - length + 1))
                    crop = np.take(crop, np.arange(start, start + length), axis=axis)
                elif isinstance(dim, int) and dim > 1 and axis == 1 and state_inputs:
                    # a streaming model's fixed-size chunk: two chunks in one sample, state carried
                    crop = np.concatenate([crop, np.flip(crop, axis=1)], axis=1)
            noise = rng.standard_normal(crop.shape) * 0.1 * (float(np.std(crop)) or 1.0)
            sample[key] = (crop * rng.uniform(0.7, 1.3) + noise).astype(value.dtype)
        np.savez(directory / f"{i:03d}.npz", **sample)
    return directory


@pytest.fixture(scope="session")
def sample_dirs(tmp_path_factory):
    """Path of a 32-sample directory for a bundled model, built once per session."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = make_sample_dir(name, tmp_path_factory.mktemp(f"calib_{name}"))
        return made[name]

    return get
