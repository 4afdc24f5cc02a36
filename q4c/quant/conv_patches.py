"""What a Conv weight multiplies: the input patches each output position reads (im2col), the
layer inputs GPTQ rounds Conv weights against (q4c.quant.gptq_conv)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from q4c.errors import ConfigError

#: Largest C_in x kernel a Conv may have for a Hessian (float64 [n, n]: 42 MB at 2304 = 256 x 3 x 3).
MAX_CONV_COLUMNS = 2304


@dataclass(frozen=True)
class ConvGeometry:
    """How a Conv reads its input: kernel, strides, pads (begins then ends), dilations, per
    spatial axis."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]


def conv_geometry(attrs: dict, weight_shape: tuple[int, ...]) -> ConvGeometry | None:
    """The geometry of a 1-D or 2-D Conv with group 1 and explicit pads, or None (no Hessian)."""
    shape = tuple(int(d) for d in weight_shape)
    spatial = len(shape) - 2
    if spatial not in (1, 2) or int(attrs.get("group", 1)) != 1 or math.prod(shape[1:]) > MAX_CONV_COLUMNS:
        return None
    if str(attrs.get("auto_pad", "NOTSET")) not in ("NOTSET", "VALID"):
        return None
    pads = tuple(int(p) for p in attrs.get("pads", [0] * 2 * spatial))
    strides = tuple(int(s) for s in attrs.get("strides", [1] * spatial))
    dilations = tuple(int(d) for d in attrs.get("dilations", [1] * spatial))
    return ConvGeometry(shape[2:], strides, pads, dilations)


def conv_patches(x: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """[N * positions, C * prod(kernel)] patches of x [N, C, *spatial] in W.reshape(O, -1)'s
    column order (channel, then kernel axes), float64."""
    x = np.asarray(x, dtype=np.float64)
    spatial = len(geom.kernel)
    if x.ndim != 2 + spatial:
        raise ConfigError(f"a {spatial}-D Conv input of shape {list(x.shape)}")
    pad = [(0, 0), (0, 0)] + [(geom.pads[i], geom.pads[i + spatial]) for i in range(spatial)]
    xp = np.pad(x, pad)
    index = []
    for i in range(spatial):
        span = geom.dilations[i] * (geom.kernel[i] - 1) + 1
        n = (xp.shape[2 + i] - span) // geom.strides[i] + 1
        index.append(np.arange(max(n, 0))[:, None] * geom.strides[i] + np.arange(geom.kernel[i])[None, :] * geom.dilations[i])
    if spatial == 1:
        cols = xp[:, :, index[0]]  # [N, C, P, K]
        return np.transpose(cols, (0, 2, 1, 3)).reshape(-1, x.shape[1] * geom.kernel[0])
    rows = xp[:, :, index[0][:, None, :, None], index[1][None, :, None, :]]  # [N, C, P1, P2, K1, K2]
    return np.transpose(rows, (0, 2, 3, 1, 4, 5)).reshape(-1, x.shape[1] * math.prod(geom.kernel))
