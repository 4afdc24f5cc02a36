"""Latency-aware planning: per-layer lowering forms, their measured costs, and a planner over
damage, bytes and time (used by the choose-forms pass, `q4c compile --latency-budget`).

- `forms`: the forms a layer can take (Form) and the shape its speed depends on (LayerShape).
- `micro`: one-layer ONNX models of a shape in a form, for micro-benchmarks.
- `costs`: measured seconds per call, cached per machine and ONNX Runtime version.
- `layers`: the plannable layers of a graph and the shapes a sample input calls them with.
- `mckp`: the two-resource multiple-choice knapsack (exact DP with a reported optimality gap).
- `planner`: knapsack items from candidates x forms, and the plan they solve to.
- `measure`: build a plan's model on a copy, time it against FP32, correct the prediction.
"""
