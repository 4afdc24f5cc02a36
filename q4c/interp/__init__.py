"""q4c's reference interpreter: executes ONNX graphs with numpy, independently of ONNX Runtime.

`Interpreter(model).run(feeds)` returns every graph output by name; `keep=True` adds every node
output, `keep=[names]` just those. One small function per op is registered with
`@op(op_type, since=..., domain=...)` in `q4c.interp.ops`; `registered_ops()` lists them.

Probes (`run(..., probes=True)`) add per-time-step internals of every LSTM, GRU and RNN node
(and com.microsoft DynamicQuantizeLSTM) to the result, keyed `f"{node}::{what}"` where `node` is
the node's name (or `f"{op_type}_{index}"` for an unnamed node) and each array is shaped
[seq_len, num_directions, batch, hidden] in the original time order whatever the direction
or layout:

- LSTM: `i`, `o`, `f` (gate activations), `c_tilde` (cell candidate g(.)), `c` (cell state),
  `h` (hidden state);
- GRU: `z`, `r` (gate activations), `h_tilde` (hidden candidate), `h` (hidden state);
- RNN: `h` (hidden state).

Steps past a batch entry's `sequence_lens` are zero in every probe, as they are in `Y`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx
import onnx.inliner

from q4c.errors import ConfigError
from q4c.interp import ops as _ops  # noqa: F401  (importing registers every op)
from q4c.interp.plan import Graph
from q4c.interp.registry import normalize_domain, op, registered_ops

__all__ = ["Interpreter", "run_model", "op", "registered_ops"]


def run_model(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], keep: Iterable[str] | bool | None = None
) -> dict[str, np.ndarray]:
    """Run `model` once on `feeds`; see `Interpreter.run`."""
    return Interpreter(model).run(feeds, keep=keep)


class Interpreter:
    """A model compiled once into a flat list of steps, then run as many times as wanted."""

    def __init__(self, model: onnx.ModelProto, *, base_dir: str = "") -> None:
        if model.functions:
            model = onnx.inliner.inline_local_functions(model)
        opsets: dict[str, int] = {}
        for imp in model.opset_import:
            opsets[normalize_domain(imp.domain)] = imp.version
        self._graph = Graph(model.graph, opsets, outer=frozenset(), base_dir=base_dir)
        self.input_names = [i.name for i in model.graph.input]
        self.output_names = list(self._graph.output_names)
        self._signature = {
            vi.name: vi.type.tensor_type for vi in model.graph.input if vi.type.HasField("tensor_type")
        }

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        keep: Iterable[str] | bool | None = None,
        probes: bool = False,
    ) -> dict[str, np.ndarray]:
        """Execute the graph on `feeds` (keyed by input name).

        Args:
            feeds: a value for every graph input without an initializer; an input that has an
                initializer of the same name may be overridden.
            keep: True to also return every node output, or an iterable of tensor names to
                return as well; None or False for the graph outputs only.
            probes: also return per-time-step LSTM/GRU/RNN internals (see the module docstring).

        Returns:
            Graph outputs, then kept tensors and probes, by name.
        """
        graph = self._graph
        env = graph.bind_feeds(feeds, self._signature)
        keep_set: frozenset[str] | None
        if keep is True:
            keep_set = None
            kept: dict[str, np.ndarray] | None = {name: env[name] for name in graph.folded}
        elif keep is None or keep is False:
            keep_set, kept = frozenset(), None
        else:
            keep_set = frozenset(keep)
            unknown = keep_set - graph.all_names
            if unknown:
                raise ConfigError(f"keep names tensors the graph does not have: {sorted(unknown)}")
            kept = {n: env[n] for n in keep_set if n in env}
        probe_out: dict[str, np.ndarray] | None = {} if probes else None
        graph.execute(env, keep_set, kept, probe_out)
        result = {name: env[name] for name in graph.output_names}
        if kept:
            result.update(kept)
        if probe_out:
            result.update(probe_out)
        # Constants are read-only inside (so ops may cache what they derive from them); a caller
        # gets arrays it owns, even when an output is a constant or a view of one.
        return {k: v if v.flags.writeable else v.copy() for k, v in result.items()}
