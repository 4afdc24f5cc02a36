"""GPTQ rounding time: q4c's `gptq_ranges` (lazy batches of 128 columns) beside the column-by-column
form (`q4c.testing.gptq_column_by_column`: after each column, a rank-1 update of every later
column), on random weights and Hessians of the shapes large speech models have. Both must give
the same codes; the table gives the median of 3 interleaved runs of each and their ratio.

    python benchmarks/gptq_speed.py [--write]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from _common import publish, stamp, with_stamp  # noqa: E402

from q4c.quant.gptq import gptq_ranges  # noqa: E402
from q4c.quant.qparams import CLIP_RATIOS  # noqa: E402
from q4c.testing import gptq_column_by_column  # noqa: E402

KEY = "gptq_speed"
#: (rows, columns, block): an LSTM's R [4H=2048, H=512], a 1024-wide projection, a 2048-wide one
SHAPES = ((2048, 512, 32), (1024, 1024, 64), (2048, 2048, 32))
RUNS = 3


def measure(rows: int, k: int, block: int) -> dict:
    rng = np.random.default_rng(k)
    x = rng.standard_normal((2 * k, k))
    hessian = x.T @ x / len(x)
    w = rng.standard_normal((rows, k)).astype(np.float32)
    ranges = [(lo, min(lo + block, k)) for lo in range(0, k, block)]
    times: dict[str, list[float]] = {"lazy": [], "column": []}
    codes = {}
    for _ in range(RUNS):
        for name, run in (("lazy", lambda: gptq_ranges(w, hessian, 4, ranges, block, CLIP_RATIOS, np.float16)[0]),
                          ("column", lambda: gptq_column_by_column(w, hessian, 4, ranges, block))):
            start = time.perf_counter()
            codes[name] = run()
            times[name].append(time.perf_counter() - start)
    lazy, column = float(np.median(times["lazy"])), float(np.median(times["column"]))
    return {"rows": rows, "columns": k, "block": block, "lazy_s": lazy, "column_s": column,
            "speedup": column / lazy, "same_codes": bool(np.array_equal(codes["lazy"], codes["column"]))}


def section(rows: list[dict]) -> str:
    out = [f"<!-- {KEY}:begin -->", "## GPTQ rounding: lazy batches", "",
           " ".join(__doc__.split("\n\n")[0].split()), "",
           "| weight [rows, columns] | block | column by column s | lazy batches s | speedup | same codes |",
           "|---|---|---|---|---|---|"]
    out += [f"| [{r['rows']}, {r['columns']}] | {r['block']} | {r['column_s']:.2f} | {r['lazy_s']:.2f} | "
            f"{r['speedup']:.1f}x | {'yes' if r['same_codes'] else 'NO'} |" for r in rows]
    out.append(f"<!-- {KEY}:end -->")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"write benchmarks/results/{KEY}.json and BENCHMARKS.md")
    args = parser.parse_args()
    rows = [measure(*shape) for shape in SHAPES]
    print(with_stamp(section(rows), stamp(KEY, rows)[0]))
    if args.write:
        publish(KEY, rows, section(rows))


if __name__ == "__main__":
    main()
