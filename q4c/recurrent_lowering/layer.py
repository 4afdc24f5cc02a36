"""Read an ONNX LSTM/GRU/RNN node and the weights feeding it (float, or DequantizeLinear of codes).

`match_layer` returns a `RecurrentLayer` (everything the lowerings need, as numpy arrays and
graph tensors) or a `NoMatch` whose `code` is a stable stats key (STYLE.md §4).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from q4c import graph as g
from q4c.nomatch import NoMatch

logger = logging.getLogger(__name__)

#: The activations q4c's lowerings implement for LSTM/GRU: the ops' defaults (ONNX LSTM f, g, h;
#: GRU f, g). RNN takes any of RNN_ACTIVATIONS.
DEFAULT_ACTIVATIONS = {"LSTM": ("sigmoid", "tanh", "tanh"), "GRU": ("sigmoid", "tanh"), "RNN": ("tanh",)}
#: ONNX recurrent activation functions (lowercase) -> (alphas taken, betas taken, default alpha,
#: default beta); activation_alpha/beta are consumed in order by the functions that take them.
RNN_ACTIVATIONS = {
    "tanh": (0, 0, 0.0, 0.0), "sigmoid": (0, 0, 0.0, 0.0), "relu": (0, 0, 0.0, 0.0), "affine": (1, 1, 1.0, 0.0),
    "leakyrelu": (1, 0, 0.01, 0.0), "thresholdedrelu": (1, 0, 1.0, 0.0), "scaledtanh": (1, 1, 1.0, 1.0),
    "hardsigmoid": (1, 1, 0.2, 0.5), "elu": (1, 0, 1.0, 0.0), "softsign": (0, 0, 0.0, 0.0), "softplus": (0, 0, 0.0, 0.0),
}
#: Signed code storage types quantize-weights emits, and the bits they hold at most.
_CODE_BITS = {"int2": 2, "int4": 4, "int8": 8}
#: gates per op: LSTM W stacks i, o, f, c; GRU W stacks z, r, h; RNN has one (h' = f(x·Wᵀ + h·Rᵀ + b)).
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


@dataclass(frozen=True)
class Weight:
    """One direction's weight as [N, K] (N = gates x hidden outputs, K = inputs).

    Quantized: `codes` int8 holding `bits`-bit values, `scale` [N, n_blocks] (float16 or float32)
    over blocks of `block` consecutive inputs (one block spanning K is per channel). Float:
    `values` only.
    """

    values: np.ndarray | None = None
    codes: np.ndarray | None = None
    scale: np.ndarray | None = None
    block: int = 0
    bits: int = 32
    codes_name: str = ""

    @property
    def quantized(self) -> bool:
        return self.codes is not None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes if self.codes is not None else self.values).shape  # type: ignore[union-attr,return-value]

    def dequantize(self) -> np.ndarray:
        if self.codes is None:
            assert self.values is not None
            return self.values.astype(np.float32)
        k = self.codes.shape[1]
        s = np.repeat(self.scale.astype(np.float32), self.block, axis=1)[:, :k]
        return self.codes.astype(np.float32) * s


@dataclass
class RecurrentLayer:
    """An LSTM, GRU or RNN node, its attributes and its weights split per direction."""

    graph: gs.Graph
    node: gs.Node
    op: str  # "LSTM" | "GRU" | "RNN"
    hidden: int
    input_size: int
    reverse: list[bool]  # per direction: processed back to front
    layout: int
    w: list[Weight]  # per direction, [gates*H, I]
    r: list[Weight]  # per direction, [gates*H, H]
    bias: np.ndarray | None  # [nd, 2*gates*H] (Wb then Rb), float32
    linear_before_reset: int = 0
    x: gs.Tensor = field(default=None)  # type: ignore[assignment]
    sequence_lens: gs.Tensor | None = None
    initial_h: gs.Tensor | None = None
    initial_c: gs.Tensor | None = None
    outputs: list[gs.Variable | None] = field(default_factory=list)  # Y, Y_h(, Y_c): None if unused
    activations: list[tuple[str, float, float]] = field(default_factory=list)  # RNN: (name, alpha, beta) per direction
    clip: float | None = None  # RNN: pre-activation clipped to [-clip, clip]

    @property
    def nd(self) -> int:
        return len(self.reverse)

    @property
    def gates(self) -> int:
        return GATES[self.op]

    @property
    def direction(self) -> str:
        if self.nd == 2:
            return "bidirectional"
        return "reverse" if self.reverse[0] else "forward"

    def bits(self) -> set[int]:
        """Bit widths of the quantized weights (32 for float ones)."""
        return {wt.bits for wt in self.w + self.r}


def _input(node: gs.Node, index: int) -> gs.Tensor | None:
    if index < len(node.inputs) and not node.inputs[index].is_empty():
        return node.inputs[index]
    return None


def _array(tensor: gs.Constant) -> np.ndarray:
    """The constant's values, leaving the constant as it is: reading `.values` of a lazily loaded
    constant replaces its TensorProto with a numpy array, which gs cannot export for INT4/INT2
    codes; a copy of the constant shares the proto and loads into itself only."""
    return np.asarray(tensor.copy().values)


def _weight_dirs(tensor: gs.Tensor, bits_of: dict[str, int], nd: int, rows: int) -> list[Weight] | NoMatch:
    """Per-direction [rows, K] weights from a float constant or (Cast of) DequantizeLinear."""
    if isinstance(tensor, gs.Constant):
        values = _array(tensor)
        if values.dtype not in (np.float32, np.float16, np.float64):
            return NoMatch("skipped_weight_dtype", f"{tensor.name} is {values.dtype}")
        values = values.astype(np.float32)
        if values.ndim != 3 or values.shape[:2] != (nd, rows):
            return NoMatch("skipped_weight_layout", f"{tensor.name} has shape {values.shape}")
        return [Weight(values=values[d]) for d in range(nd)]
    dq = g.producer(tensor)
    if dq is not None and dq.op == "Cast":
        dq = g.producer(dq.inputs[0])
    if dq is None or dq.op != "DequantizeLinear":
        return NoMatch("skipped_dynamic_weight", f"{tensor.name} is computed at run time")
    codes_t, scale_t = dq.inputs[0], dq.inputs[1]
    zp_t = _input(dq, 2)
    if not isinstance(codes_t, gs.Constant) or not isinstance(scale_t, gs.Constant):
        return NoMatch("skipped_dynamic_weight", f"{dq.name} dequantizes a non-constant")
    codes = _array(codes_t)
    if codes.dtype.name not in _CODE_BITS:
        return NoMatch("skipped_weight_dtype", f"{codes_t.name} is {codes.dtype}")
    if zp_t is not None and (not isinstance(zp_t, gs.Constant) or np.any(_array(zp_t).astype(np.int32))):
        return NoMatch("skipped_zero_point", f"{dq.name} has a non-zero zero point")
    storage = codes.dtype.name
    codes = codes.astype(np.int8)
    if codes.ndim != 3 or codes.shape[:2] != (nd, rows):
        return NoMatch("skipped_weight_layout", f"{codes_t.name} has shape {codes.shape}")
    scale = np.asarray(scale_t.values)
    k = codes.shape[2]
    block = int(dq.attrs.get("block_size", 0))
    axis = int(dq.attrs.get("axis", 1)) % 3
    if block and axis == 2 and scale.shape == (nd, rows, -(-k // block)):
        pass
    elif not block and scale.size == 1:  # per tensor: one block spanning K
        scale, block = np.full((nd, rows, 1), scale.reshape(()), scale.dtype), k
    elif not block and axis == 1 and scale.shape == (rows,):  # per gate row, shared by directions
        scale, block = np.broadcast_to(scale.reshape(1, rows, 1), (nd, rows, 1)).copy(), k
    elif not block and axis == 0 and scale.shape == (nd,):  # per direction
        scale, block = np.broadcast_to(scale.reshape(nd, 1, 1), (nd, rows, 1)).copy(), k
    else:
        return NoMatch("skipped_weight_layout", f"{dq.name}: axis {axis}, block {block}, scale {scale.shape}")
    bits = bits_of.get(codes_t.name)
    if bits is None:  # no plan entry: the widest value the storage type holds is the safe width
        bits = _CODE_BITS[storage]
        if bits_of:
            logger.warning("%s is not in the precision plan: its width is taken from its %s storage type (%d bits)",
                           codes_t.name, storage, bits)
    return [Weight(codes=codes[d], scale=scale[d], block=block, bits=bits, codes_name=codes_t.name) for d in range(nd)]


def match_layer(graph: gs.Graph, node: gs.Node, bits_of: dict[str, int]) -> RecurrentLayer | NoMatch:
    """The layer `node` computes, if q4c's lowerings can express it, else why not.

    `bits_of` maps codes tensors to their planned bit width. Codes it does not name (a model
    quantized elsewhere; every codes tensor when it is empty) count as wide as their storage
    type; a non-empty plan that misses one is warned about.
    """
    op = node.op
    if op not in GATES or node.domain not in ("", "ai.onnx", None):
        return NoMatch("skipped_op", op)
    gates = GATES[op]
    attrs = node.attrs
    direction = str(attrs.get("direction", "forward"))
    if direction not in ("forward", "reverse", "bidirectional"):
        return NoMatch("skipped_direction", direction)
    reverse = [False, True] if direction == "bidirectional" else [direction == "reverse"]
    nd = len(reverse)
    names = [str(a).lower() for a in attrs.get("activations", None) or []]
    activations: list[tuple[str, float, float]] = []
    if op == "RNN":
        found = _rnn_activations(names, attrs, nd)
        if isinstance(found, NoMatch):
            return found
        activations = found
    elif names and names != list(DEFAULT_ACTIVATIONS[op]) * (nd if len(names) > len(DEFAULT_ACTIVATIONS[op]) else 1):
        return NoMatch("skipped_activations", ",".join(names))
    if attrs.get("clip") is not None and op != "RNN":
        return NoMatch("skipped_clip", str(attrs["clip"]))
    if int(attrs.get("input_forget", 0)):
        return NoMatch("skipped_input_forget")
    if op == "LSTM" and _input(node, 7) is not None:
        return NoMatch("skipped_peephole")
    r_tensor = _input(node, 2)
    w_tensor = _input(node, 1)
    x = _input(node, 0)
    if x is None or w_tensor is None or r_tensor is None:
        return NoMatch("skipped_missing_input")
    hidden = attrs.get("hidden_size")
    if hidden is None:
        shape = r_tensor.shape
        if not shape or not isinstance(shape[-1], int):
            return NoMatch("skipped_hidden_size", "no hidden_size attribute and R's shape is unknown")
        hidden = shape[-1]
    hidden = int(hidden)
    w = _weight_dirs(w_tensor, bits_of, nd, gates * hidden)
    if isinstance(w, NoMatch):
        return w
    r = _weight_dirs(r_tensor, bits_of, nd, gates * hidden)
    if isinstance(r, NoMatch):
        return r
    if r[0].shape[1] != hidden:
        return NoMatch("skipped_weight_layout", "R is not [gates*H, H]")
    bias_t = _input(node, 3)
    bias = None
    if bias_t is not None:
        if not isinstance(bias_t, gs.Constant):
            return NoMatch("skipped_dynamic_bias", bias_t.name)
        bias = _array(bias_t).astype(np.float32)
        if bias.shape != (nd, 2 * gates * hidden):
            return NoMatch("skipped_weight_layout", f"bias has shape {bias.shape}")
    outputs: list[gs.Variable | None] = []
    graph_outputs = {t.name for t in graph.outputs}
    for i in range(3 if op == "LSTM" else 2):
        out = node.outputs[i] if i < len(node.outputs) else None
        used = out is not None and not out.is_empty() and (bool(out.outputs) or out.name in graph_outputs)
        outputs.append(out if used else None)
    return RecurrentLayer(
        graph=graph, node=node, op=op, hidden=hidden, input_size=int(w[0].shape[1]),
        reverse=reverse, layout=int(attrs.get("layout", 0)), w=w, r=r, bias=bias,
        linear_before_reset=int(attrs.get("linear_before_reset", 0)), x=x,
        sequence_lens=_input(node, 4), initial_h=_input(node, 5), initial_c=_input(node, 6) if op == "LSTM" else None,
        outputs=outputs, activations=activations,
        clip=float(attrs["clip"]) if attrs.get("clip") is not None else None,
    )


def _rnn_activations(names: list[str], attrs: dict, nd: int) -> list[tuple[str, float, float]] | NoMatch:
    """(name, alpha, beta) per direction of an ONNX RNN (default Tanh; one name for two
    directions serves both, each direction consuming its own alpha/beta)."""
    names = names or ["tanh"] * nd
    if len(names) == 1 and nd == 2:
        names = names * 2
    if len(names) != nd:
        return NoMatch("skipped_activations", f"{len(names)} activations for {nd} direction(s)")
    alphas = [float(a) for a in attrs.get("activation_alpha", None) or []]
    betas = [float(b) for b in attrs.get("activation_beta", None) or []]
    out = []
    for name in names:
        if name not in RNN_ACTIVATIONS:
            return NoMatch("skipped_activations", name)
        n_alpha, n_beta, alpha, beta = RNN_ACTIVATIONS[name]
        if n_alpha and alphas:
            alpha = alphas.pop(0)
        if n_beta and betas:
            beta = betas.pop(0)
        out.append((name, alpha, beta))
    return out
