"""Latency-aware planning: per-layer lowering forms, their measured costs, and a planner over
damage, bytes and time.

- `forms`: the forms a layer can take (Form) and the shape its speed depends on (LayerShape).
- `micro`: one-layer ONNX models of a shape in a form, for micro-benchmarks.
- `costs`: measured seconds per call, cached per machine and ONNX Runtime version.
- `mckp`: the two-resource multiple-choice knapsack (exact DP with a reported optimality gap).
"""
