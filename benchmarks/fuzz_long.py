"""The long fuzz run: many more generated models and mutated files than CI's fixed-seed batch.

    python benchmarks/fuzz_long.py --models 2000 --pass-models 200 --mutations 20 --seed 7

Runs the same checks as tests/fuzz (strategies.models through `q4c compile` with the five option
sets, each equivalence pass alone, and every mutation entry point), but collects every failure
instead of stopping at the first, and prints a summary: counts of outcomes (compiled, each error
line kind) and each failing case with how to reproduce it (failing inputs are kept in
~/.cache/q4c/fuzz_failures/). Exit 1 if anything failed.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

FUZZ = Path(__file__).resolve().parent.parent / "tests" / "fuzz"
sys.path.insert(0, str(FUZZ))

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st


def _settings(n: int):
    """No shrinking: a long run reports every failure as drawn rather than minimising one."""
    return settings(max_examples=n, deadline=None, database=None, derandomize=False,
                    suppress_health_check=list(HealthCheck), phases=[Phase.generate])


#: failing inputs are kept here (models as .onnx, mutants as written) to reproduce them
FAILURES = Path.home() / ".cache" / "q4c" / "fuzz_failures"


def _keep(model, name: str) -> str:
    """Save a failing generated model; returns its path for the report."""
    import onnx

    FAILURES.mkdir(parents=True, exist_ok=True)
    path = FAILURES / f"{name}.onnx"
    onnx.save(model, path)
    return str(path)


def _kind(line: str) -> str:
    """An error line without paths and numbers, to count kinds."""
    line = re.sub(r"/\S+", "P", line)
    return re.sub(r"\d+(\.\d+)?", "N", line)[:100]


def run_models(n: int, seed_: int, failures: list, outcomes: collections.Counter) -> int:
    from strategies import models
    from test_generated_models import OPTION_SETS, check_compile

    done = [0]

    @_settings(n)
    @given(gm=models(nonfinite=True), option=st.sampled_from(OPTION_SETS))
    def one(gm, option):
        done[0] += 1
        with tempfile.TemporaryDirectory() as d:
            start = time.perf_counter()
            try:
                outcomes[_kind(check_compile(Path(d), gm, option))] += 1
            except BaseException as e:
                if isinstance(e, KeyboardInterrupt):
                    raise
                kept = _keep(gm.model, f"compile_{seed_}_{done[0]}")
                failures.append(("compile", repr(gm), f"{option} kept as {kept}", f"{type(e).__name__}: {e}"[:1500]))
                outcomes["FAILED"] += 1
            if time.perf_counter() - start > 20:
                print(f"slow ({time.perf_counter() - start:.0f} s): {gm!r} {option}", file=sys.stderr)

    seed(seed_)(one)()
    return done[0]


def run_passes(n: int, seed_: int, failures: list, outcomes: collections.Counter) -> int:
    import test_pass_properties as tp
    from strategies import models

    done = [0]

    def make(name: str):
        @_settings(n)
        @given(gm=models(opsets=(21,), min_weight=0))
        def one(gm):
            done[0] += 1
            try:
                tp.check_pass_on(name, gm)
                outcomes[f"pass {name} ok"] += 1
            except BaseException as e:
                if isinstance(e, KeyboardInterrupt):
                    raise
                kept = _keep(gm.model, f"pass_{name}_{seed_}_{done[0]}")
                failures.append((f"pass {name}", repr(gm), f"kept as {kept}", f"{type(e).__name__}: {e}"[:1500]))
                outcomes[f"pass {name} FAILED"] += 1

        return one

    for name in tp.EQUIVALENT:
        seed(seed_)(make(name))()
    return done[0]


def run_mutations(scale: int, seed: int, failures: list, outcomes: collections.Counter) -> int:
    import test_mutations as tm

    total = 0
    with tempfile.TemporaryDirectory() as d:
        base = tm.make_base(Path(d))
        for name in tm.ENTRIES:
            work = Path(d) / name
            work.mkdir()
            cases = tm.CASES[name] * scale
            found, counts = tm.fuzz_entry(name, base, work, cases, seed=seed)
            total += cases
            for code, count in counts.items():
                outcomes[f"mutate {name} exit {code}"] += count
            for case, kind, message in found:
                FAILURES.mkdir(parents=True, exist_ok=True)
                kept = FAILURES / f"mutate_{name}_{seed}_{case}{tm.ENTRIES[name].suffix}"
                shutil.copy(work / f"failed_{case}{tm.ENTRIES[name].suffix}", kept)
                failures.append((f"mutate {name}", f"seed {seed} case {case}, kept as {kept}", kind, message))
    return total


#: odd values for compile's options (the tiny model of test_mutations): each case picks 1-3
OPTION_VALUES = {
    "--bits": ["2", "3", "4", "8", "5", ""], "--avg-bits": ["0", "-1", "4", "1e9", "nan", "inf", "2.5"],
    "--size-budget": ["0", "-5", "1", "10", "99999999999"], "--ratio": ["0", "-1", "0.5", "2", "nan"],
    "--scheme": ["symmetric", "gptq", "symmetric-absmax", "mulaw", "kmeans", "nf4", "bogus"],
    "--workers": ["0", "1", "-3", "100"], "--candidates": ["2,4,8", "", "4", "1", "64", ",,", "2,x"],
    "--sensitivity": ["kl", "hessian", "mse"],
    "--granularity": ["channel", "tensor", "block", "block:16", "block:7", "block:-1", "block:x", "channels:2", ""],
    "--target": ["ort-cpu", "onnx"], "--kernels": ["auto", "low-bit", "fp32-at-load"],
    "--passes": ["default", "fold-constants", "-fold-constants", "+nope", "default,-quantize-weights",
                 "quantize-weights", "", ",", "lower-ort-kernels", "default,+calibrate", "nope:Class", "os:path"],
    "--activations": ["none", "int8"], "--observer": ["minmax", "percentile", "entropy", "mse"],
    "--calib-samples": ["1", "0", "-1", "1000"], "--keep-fp32": ["W", "nothere", ""],
    "--objective": ["p=kl", "p=bce", "p=snr", "p=ignore", "z=kl", "p=bogus", "p", "=kl"],
    "--scoring": ["auto", "closed-loop", "open-loop"],
    "--require": ["flips<=0.5%", "sqnr>=25dB", "kl<=0.01", "bogus", "sqnr>=-inf", "sqnr>=1000dB"],
}
FLAGS = ["--strict", "--allow-nonfinite", "--check", "--no-verify", "--json"]


def run_options(n: int, seed_: int, failures: list, outcomes: collections.Counter) -> int:
    """`q4c compile` with random odd option values: same contract (exit 0/1/2/4, one error line)."""
    import numpy as np
    import test_mutations as tm
    from harness import invoke

    rng = np.random.default_rng([seed_, 99])
    with tempfile.TemporaryDirectory() as d:
        base = tm.make_base(Path(d))
        out = Path(d) / "out" / "o.onnx"
        for case in range(n):
            args = ["compile", str(base["model"]), "-o", str(out)]
            for k in rng.choice(list(OPTION_VALUES), size=int(rng.integers(1, 4)), replace=False):
                args += [k, str(rng.choice(OPTION_VALUES[k]))]
            if rng.integers(0, 3) == 0:
                args.append(str(rng.choice(FLAGS)))
            if rng.integers(0, 3) == 0:
                args += ["--calib", str(base["data"])]
            try:
                result = invoke(args, timeout=300)
                assert result.exit_code in (0, 1, 2, 4), result.stderr[-300:]
                outcomes[f"options exit {result.exit_code}"] += 1
            except BaseException as e:
                if isinstance(e, KeyboardInterrupt):
                    raise
                failures.append(("options", f"case {case}", " ".join(args), f"{type(e).__name__}: {e}"[:1500]))
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=500, help="generated models through q4c compile")
    parser.add_argument("--pass-models", type=int, default=100, help="generated models per equivalence pass")
    parser.add_argument("--mutations", type=int, default=10, help="multiple of CI's mutation case counts (~2800)")
    parser.add_argument("--options", type=int, default=100, help="compiles with random odd option values")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    failures: list = []
    outcomes: collections.Counter = collections.Counter()
    counts = {}
    start = time.perf_counter()
    try:
        if args.models:
            counts["generated models compiled"] = run_models(args.models, args.seed, failures, outcomes)
        if args.pass_models:
            counts["generated models per pass x passes"] = run_passes(args.pass_models, args.seed, failures, outcomes)
        counts["mutated files"] = run_mutations(args.mutations, args.seed, failures, outcomes)
        counts["option sets"] = run_options(args.options, args.seed, failures, outcomes)
    except KeyboardInterrupt:
        print("interrupted: partial results", file=sys.stderr)
    except Exception:  # noqa: BLE001 - a crash of the harness itself: show it, exit 2
        traceback.print_exc()
        return 2
    print(f"fuzz_long seed {args.seed}: {counts} in {time.perf_counter() - start:.0f} s")
    for kind, count in outcomes.most_common():
        print(f"  {count:6d}  {kind}")
    print(f"{len(failures)} failure(s)")
    for f in failures:
        print("FAIL", *f, sep="\n  ")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
