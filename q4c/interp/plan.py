"""The compiled form of an ONNX graph: constants, a topologically ordered plan, liveness.

`Graph` compiles a GraphProto once (op functions looked up, attributes converted, Constant
nodes folded, a free list per step) so that `execute` is a tight loop; subgraph attributes
compile to nested `Graph`s and reach ops bound to the enclosing scope (`BoundGraph`).
"""

from __future__ import annotations

import heapq
import inspect
import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto

from q4c.errors import DataError, ModelLoadError, Q4cError, UnsupportedOpError
from q4c.interp.ops.dtypes import np_dtype
from q4c.interp.protos import attribute_value, declared_type, sparse_to_array, to_array
from q4c.interp.registry import lookup, normalize_domain

RNN_OPS = frozenset({("", "LSTM"), ("", "GRU"), ("", "RNN"), ("com.microsoft", "DynamicQuantizeLSTM")})
# Keyword parameters an op function may declare to receive context rather than an attribute.
N_OUTPUTS = "_n_outputs"
PROBE = "_probe"


class BoundGraph:
    """A subgraph attribute bound to the enclosing scope: call it with the body's inputs."""

    __slots__ = ("_graph", "_outer")

    def __init__(self, graph: Graph, outer: Mapping[str, np.ndarray]) -> None:
        self._graph = graph
        self._outer = outer

    @property
    def n_inputs(self) -> int:
        return len(self._graph.input_names)

    @property
    def n_outputs(self) -> int:
        return len(self._graph.output_names)

    def output_types(self) -> list[tuple[np.dtype | None, tuple[int, ...] | None]]:
        """Declared (dtype, static shape) of each output, None where unknown."""
        return self._graph.output_types

    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]:
        graph = self._graph
        if len(inputs) != len(graph.input_names):
            raise DataError(
                f"subgraph '{graph.name}' takes {len(graph.input_names)} inputs, got {len(inputs)}"
            )
        env = {name: self._outer[name] for name in graph.captured}
        env.update(graph.constants)
        for name, value in zip(graph.input_names, inputs):
            env[name] = value if type(value) is np.ndarray else np.asarray(value)
        graph.execute(env, frozenset(), None, None)
        return [env[name] for name in graph.output_names]


class Graph:
    """One (sub)graph: constants, a topologically ordered plan, and its free (outer) names."""

    def __init__(
        self, graph: onnx.GraphProto, opsets: Mapping[str, int], outer: frozenset[str], base_dir: str
    ) -> None:
        self.name = graph.name or "main"
        self.input_names = [i.name for i in graph.input]
        self.output_names = [o.name for o in graph.output]
        self.output_types = [declared_type(o) for o in graph.output]
        self.constants: dict[str, np.ndarray] = {}
        for init in graph.initializer:
            self.constants[init.name] = to_array(init, base_dir)
        for sparse in graph.sparse_initializer:
            self.constants[sparse.values.name] = sparse_to_array(sparse, base_dir)
        self.required_inputs = [n for n in self.input_names if n not in self.constants]

        defined = set(self.input_names) | set(self.constants)
        produced: dict[str, int] = {}
        for index, node in enumerate(graph.node):
            for name in node.output:
                if name:
                    produced[name] = index
        visible = frozenset(defined | set(produced) | outer)

        # Compile nodes (and their subgraphs, which may read any name visible here).
        compiled = [_compile_node(node, index, opsets, visible, base_dir) for index, node in enumerate(graph.node)]
        self.captured: list[str] = []
        order = self._toposort(compiled, defined, produced, outer)
        self.all_names = frozenset(defined | set(produced))

        self._steps = [compiled[i] for i in order]
        # Fold Constant nodes once: their outputs become constants of this graph.
        steps = []
        self.folded: list[str] = []  # outputs of Constant nodes, still node outputs for keep=True
        for step in self._steps:
            if step.op_type == "Constant" and not step.inputs:
                value = step.fn(**step.attrs)[0]
                self.constants[step.outputs[0]] = np.asarray(value)
                self.folded.append(step.outputs[0])
            else:
                steps.append(step)
        self._steps = steps
        for value in self.constants.values():
            value.flags.writeable = False  # ops never write their inputs; this lets them cache
        self.finalize_liveness(extra_live=())

    def _toposort(
        self, compiled: list[_Step], defined: set[str], produced: dict[str, int], outer: frozenset[str]
    ) -> list[int]:
        deps: list[set[int]] = []
        captured: dict[str, None] = {}
        for step in compiled:
            needs: set[int] = set()
            for name in itertools.chain(step.inputs, step.captured):
                if not name or name in defined:
                    continue
                if name in produced:
                    needs.add(produced[name])
                elif name in outer:
                    captured[name] = None
                else:
                    raise ModelLoadError(
                        f"graph '{self.name}': node '{step.name}' ({step.op_type}) reads '{name}', "
                        "which no input, initializer or node defines"
                    )
            deps.append(needs)
        for name in self.output_names:
            if name not in defined and name not in produced:
                if name in outer:
                    captured[name] = None
                else:
                    raise ModelLoadError(f"graph '{self.name}': output '{name}' is never produced")
        self.captured = list(captured)
        # Kahn's algorithm, stable in the original node order.
        users: dict[int, list[int]] = {}
        pending = [len(d) for d in deps]
        for index, needs in enumerate(deps):
            for need in needs:
                users.setdefault(need, []).append(index)
        ready = [i for i, n in enumerate(pending) if n == 0]
        order: list[int] = []
        heapq.heapify(ready)
        while ready:
            index = heapq.heappop(ready)
            order.append(index)
            for user in users.get(index, ()):
                pending[user] -= 1
                if pending[user] == 0:
                    heapq.heappush(ready, user)
        if len(order) != len(compiled):
            cyclic = [compiled[i].name for i in range(len(compiled)) if pending[i]]
            raise ModelLoadError(f"graph '{self.name}' has a cycle through nodes {cyclic[:5]}")
        return order

    def finalize_liveness(self, extra_live: Iterable[str]) -> None:
        """Work out after which step each intermediate is dead, so `execute` can free it."""
        keep = set(self.output_names) | set(extra_live)
        last_use: dict[str, int] = {}
        for index, step in enumerate(self._steps):
            for name in itertools.chain(step.inputs, step.captured):
                if name:
                    last_use[name] = index
            for name in step.outputs:
                if name and name not in last_use:
                    last_use[name] = index  # produced but never read: free at once
        frees: list[list[str]] = [[] for _ in self._steps]
        for name, index in last_use.items():
            if name not in keep:
                frees[index].append(name)
        self._plan = [
            (s.fn, s.inputs, s.outputs, s.attrs, bool(s.graph_attrs or s.probe_key), tuple(frees[i]), s.n_required, s)
            for i, s in enumerate(self._steps)
        ]

    def bind_feeds(
        self, feeds: Mapping[str, np.ndarray], signature: Mapping[str, onnx.TypeProto.Tensor]
    ) -> dict[str, np.ndarray]:
        env = dict(self.constants)
        inputs = set(self.input_names)
        for name, value in feeds.items():
            if name not in inputs:
                raise DataError(f"feed '{name}' is not a graph input; inputs are {self.input_names}")
            array = value if type(value) is np.ndarray else np.asarray(value)
            expected = signature.get(name)
            if expected is not None and expected.elem_type:
                want = np_dtype(expected.elem_type)
                if array.dtype != want:
                    raise DataError(f"feed '{name}' has dtype {array.dtype}; the model expects {want}")
                if expected.HasField("shape") and len(expected.shape.dim) != array.ndim:
                    raise DataError(
                        f"feed '{name}' has rank {array.ndim} (shape {array.shape}); "
                        f"the model expects rank {len(expected.shape.dim)}"
                    )
            env[name] = array
        missing = [n for n in self.required_inputs if n not in feeds]
        if missing:
            raise DataError(f"missing feeds for graph inputs {missing}; inputs are {self.input_names}")
        return env

    def execute(
        self,
        env: dict[str, Any],
        keep: frozenset[str] | None,
        kept: dict[str, np.ndarray] | None,
        probes: dict[str, np.ndarray] | None,
    ) -> None:
        """Run every step on `env` in place. `keep` None keeps everything (no freeing)."""
        if keep is not None and not keep and probes is None:
            self._execute_plain(env)
            return
        for fn, inputs, outputs, attrs, special, frees, n_required, step in self._plan:
            probe = {} if probes is not None and step.probe_key else None
            if special:
                attrs = self._special_attrs(step, attrs, env, probe)
            results = self._call(fn, [env[n] if n else None for n in inputs], attrs, n_required, step)
            for name, value in zip(outputs, results):
                if name:
                    env[name] = value if type(value) is np.ndarray else np.asarray(value)
            if keep is None:
                if kept is not None:
                    kept.update((name, env[name]) for name in outputs if name)
            else:
                if keep:
                    kept.update((name, env[name]) for name in outputs if name in keep)  # type: ignore[union-attr]
                for name in frees:
                    del env[name]
            if probe:
                for what, value in probe.items():
                    probes[f"{step.probe_key}::{what}"] = value  # type: ignore[index]

    def _execute_plain(self, env: dict[str, Any]) -> None:
        """The hot loop: no kept tensors, no probes; dead tensors are freed as soon as possible."""
        for fn, inputs, outputs, attrs, special, frees, n_required, step in self._plan:
            if special:
                attrs = self._special_attrs(step, attrs, env, None)
            try:
                results = fn(*[env[n] if n else None for n in inputs], **attrs)
            except Exception as e:
                self._call(fn, [env[n] if n else None for n in inputs], attrs, n_required, step, failed=e)
                raise  # pragma: no cover - _call re-raises with the node named
            if len(results) < n_required:
                self._call(fn, [], attrs, n_required, step, results=results)
            for name, value in zip(outputs, results):
                if name:
                    env[name] = value if type(value) is np.ndarray else np.asarray(value)
            for name in frees:
                del env[name]

    @staticmethod
    def _special_attrs(step: _Step, attrs: dict[str, Any], env: dict[str, Any], probe: dict | None) -> dict[str, Any]:
        """Bind subgraph attributes to the current scope and hand RNN ops their probe dict."""
        attrs = dict(attrs)
        for key in step.graph_attrs:
            attrs[key] = BoundGraph(attrs[key], env)
        if probe is not None:
            attrs[PROBE] = probe
        return attrs

    def _call(
        self, fn: Callable[..., tuple], args: list[Any], attrs: dict[str, Any], n_required: int, step: _Step,
        failed: Exception | None = None, results: tuple | None = None,
    ) -> tuple:
        """Call one op, naming the node in any error it raises or in a short result."""
        try:
            if failed is not None:
                raise failed
            if results is None:
                results = fn(*args, **attrs)
        except Q4cError as e:
            raise type(e)(f"node '{step.name}' ({step.op_type}): {e}") from e
        except (np.exceptions.AxisError, ValueError) as e:
            # An axis attribute out of range (onnx's checker accepts Softmax axis=2**40): the
            # model's fault, when the node has one; anything else stays a bug with its traceback.
            axes = {k: v for k, v in attrs.items() if k in _AXIS_ATTRS}
            if axes and (isinstance(e, np.exceptions.AxisError) or "fit into a C" in str(e)):
                raise ModelLoadError(f"node '{step.name}' ({step.op_type}): {', '.join(f'{k}={v}' for k, v in axes.items())} "
                                     f"is out of range ({e})") from e
            e.add_note(f"q4c.interp: in node '{step.name}' ({step.op_type}) of graph '{self.name}'")
            raise
        except Exception as e:
            e.add_note(f"q4c.interp: in node '{step.name}' ({step.op_type}) of graph '{self.name}'")
            raise
        if len(results) < n_required:
            raise UnsupportedOpError(
                f"node '{step.name}' ({step.op_type}): {len(results)} outputs computed, {n_required} requested"
            )
        return results


#: attributes that name axes of the node's inputs (see `_call`)
_AXIS_ATTRS = frozenset({"axis", "axes", "perm", "batch_axis", "time_axis", "scan_input_axes", "scan_output_axes"})


class _Step:
    """A node resolved at construction: its function, input/output names and ready attributes."""

    __slots__ = ("fn", "inputs", "outputs", "attrs", "graph_attrs", "captured", "name", "op_type",
                 "probe_key", "n_required")

    def __init__(self, **fields: Any) -> None:
        for key, value in fields.items():
            setattr(self, key, value)


_SIGNATURES: dict[Callable[..., Any], tuple[frozenset[str], int | None]] = {}


def _signature_of(fn: Callable[..., Any]) -> tuple[frozenset[str], int | None]:
    """(keyword-only parameter names, max positional inputs or None for *args) of an op function."""
    if fn not in _SIGNATURES:
        keywords, positional, variadic = set(), 0, False
        for param in inspect.signature(fn).parameters.values():
            if param.kind is param.KEYWORD_ONLY:
                keywords.add(param.name)
            elif param.kind is param.VAR_POSITIONAL:
                variadic = True
            elif param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
                positional += 1
        _SIGNATURES[fn] = (frozenset(keywords), None if variadic else positional)
    return _SIGNATURES[fn]


def _compile_node(
    node: onnx.NodeProto, index: int, opsets: Mapping[str, int], visible: frozenset[str], base_dir: str
) -> _Step:
    domain = normalize_domain(node.domain)
    name = node.name or f"{node.op_type}_{index}"
    fn = lookup(domain, node.op_type, opsets.get(domain))
    keywords, max_inputs = _signature_of(fn)
    if max_inputs is not None and len(node.input) > max_inputs:
        raise UnsupportedOpError(
            f"node '{name}' ({node.op_type}): {len(node.input)} inputs, q4c.interp knows {max_inputs}"
        )
    attrs: dict[str, Any] = {}
    graph_attrs: list[str] = []
    captured: list[str] = []
    for attr in node.attribute:
        if attr.name not in keywords:
            raise UnsupportedOpError(
                f"node '{name}' ({node.op_type}): attribute '{attr.name}' is not supported by q4c.interp"
            )
        if attr.ref_attr_name:
            raise UnsupportedOpError(f"node '{name}': attribute references are only valid inside functions")
        if attr.type == AttributeProto.GRAPH:
            sub = Graph(attr.g, opsets, outer=visible, base_dir=base_dir)
            attrs[attr.name] = sub
            graph_attrs.append(attr.name)
            captured.extend(sub.captured)
        elif attr.type == AttributeProto.GRAPHS:
            raise UnsupportedOpError(f"node '{name}': GRAPHS attributes are not supported")
        else:
            attrs[attr.name] = attribute_value(attr, base_dir)
    if N_OUTPUTS in keywords:
        attrs[N_OUTPUTS] = len(node.output)
    named = [i for i, out in enumerate(node.output) if out]
    probe_key = name if (domain, node.op_type) in RNN_OPS and PROBE in keywords else None
    return _Step(
        fn=fn,
        inputs=tuple(node.input),
        outputs=tuple(node.output),
        attrs=attrs,
        graph_attrs=tuple(graph_attrs),
        captured=tuple(dict.fromkeys(captured)),
        name=name,
        op_type=node.op_type,
        probe_key=probe_key,
        n_required=(named[-1] + 1) if named else 0,
    )
