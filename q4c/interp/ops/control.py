"""Control flow: If, Loop and Scan. Subgraph attributes arrive bound to the enclosing scope.

A bound subgraph is a callable taking the body's inputs and returning its outputs; it sees every
name of the enclosing graphs (outer-scope references) without copying them.
"""

from __future__ import annotations

import numpy as np

from q4c.errors import DataError, UnsupportedOpError
from q4c.interp.registry import op


@op("If", since=1)
def if_(cond, *, then_branch, else_branch):
    if cond.size != 1:
        raise DataError(f"If: cond must hold a single element, got shape {cond.shape}")
    branch = then_branch if bool(cond.reshape(-1)[0]) else else_branch
    return tuple(branch())


def _stack(parts: list[np.ndarray], declared) -> np.ndarray:
    if parts:
        return np.stack(parts)
    dtype, shape = declared
    # Zero iterations: an empty scan output with the body's declared element type.
    tail = tuple(shape) if shape is not None else ()
    return np.empty((0,) + tail, dtype=dtype or np.float32)


@op("Loop", since=1)
def loop(M, cond, *v_initial, body):  # noqa: N803
    """Loop-13: body(iteration, cond, v...) -> (cond, v..., scan outputs...)."""
    n_state = len(v_initial)
    n_scan = body.n_outputs - 1 - n_state
    if n_scan < 0:
        raise DataError(f"Loop body has {body.n_outputs} outputs for {n_state} loop-carried values")
    trip_count = None if M is None else int(M.reshape(-1)[0])
    # Without a cond input the body's cond output is ignored (a plain for loop).
    keep_going = True if cond is None else bool(cond.reshape(-1)[0])
    state = list(v_initial)
    scans: list[list[np.ndarray]] = [[] for _ in range(n_scan)]
    i = 0
    while (trip_count is None or i < trip_count) and keep_going:
        outs = body(np.array(i, dtype=np.int64), np.array(keep_going), *state)
        if cond is not None:
            keep_going = bool(np.asarray(outs[0]).reshape(-1)[0])
        state = list(outs[1:1 + n_state])
        for k in range(n_scan):
            scans[k].append(outs[1 + n_state + k])
        i += 1
    declared = body.output_types()[1 + n_state:]
    return tuple(state) + tuple(_stack(parts, declared[k]) for k, parts in enumerate(scans))


@op("Scan", since=9)
def scan(
    *inputs, body, num_scan_inputs: int, scan_input_axes: list[int] | None = None,
    scan_input_directions: list[int] | None = None, scan_output_axes: list[int] | None = None,
    scan_output_directions: list[int] | None = None,
):
    """Scan-9+: body(state..., scan slices...) -> (state..., scan output slices...)."""
    m = num_scan_inputs
    n_state = len(inputs) - m
    states = list(inputs[:n_state])
    scan_inputs = inputs[n_state:]
    in_axes = [a + x.ndim if a < 0 else a for a, x in zip(scan_input_axes or [0] * m, scan_inputs)]
    in_dirs = scan_input_directions or [0] * m
    lengths = {x.shape[a] for x, a in zip(scan_inputs, in_axes)}
    if len(lengths) != 1:
        raise DataError(f"Scan inputs disagree on the sequence length: {sorted(lengths)}")
    length = lengths.pop()
    n_scan_out = body.n_outputs - n_state
    if n_scan_out < 0:
        raise UnsupportedOpError("Scan body has fewer outputs than state variables")
    collected: list[list[np.ndarray]] = [[] for _ in range(n_scan_out)]
    for t in range(length):
        slices = [
            np.take(x, length - 1 - t if d else t, axis=a) for x, a, d in zip(scan_inputs, in_axes, in_dirs)
        ]
        outs = body(*states, *slices)
        states = list(outs[:n_state])
        for k in range(n_scan_out):
            collected[k].append(outs[n_state + k])
    out_axes = scan_output_axes or [0] * n_scan_out
    out_dirs = scan_output_directions or [0] * n_scan_out
    declared = body.output_types()[n_state:]
    results = []
    for k, parts in enumerate(collected):
        if out_dirs[k]:
            parts = parts[::-1]  # reverse: each iteration's output is prepended
        stacked = _stack(parts, declared[k])
        axis = out_axes[k] + stacked.ndim if out_axes[k] < 0 else out_axes[k]
        results.append(np.moveaxis(stacked, 0, axis) if axis else stacked)
    return tuple(states) + tuple(results)


@op("Scan", since=8)
def scan_8(
    sequence_lens, *inputs, body, num_scan_inputs: int, directions: list[int] | None = None,
):
    """Scan-8: every input has a leading batch axis; the sequence axis is 1."""
    batch = inputs[0].shape[0]
    lengths = None if sequence_lens is None else [int(n) for n in sequence_lens.reshape(-1)]
    per_batch = []
    for b in range(batch):
        sliced = [x[b] for x in inputs]
        n_state = len(inputs) - num_scan_inputs
        if lengths is not None:
            sliced = sliced[:n_state] + [x[: lengths[b]] for x in sliced[n_state:]]
        per_batch.append(scan(*sliced, body=body, num_scan_inputs=num_scan_inputs,
                              scan_input_directions=directions))
    return tuple(np.stack(parts) for parts in zip(*per_batch))
