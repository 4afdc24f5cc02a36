"""`q4c compile`: FP32 ONNX in, low-bit ONNX out, with a report."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from q4c.cli.compile_summary import print_summary
from q4c.cli.render import emit_json
from q4c.compiler import compile_file
from q4c.config import (
    CODEBOOK_SCHEMES,
    DEFAULT_CALIB_SAMPLES,
    KERNELS,
    REQUIRE_CALIB_SAMPLES,
    UNIFORM_SCHEMES,
    CompileOptions,
    Granularity,
    Target,
    WorkerBackend,
)
from q4c.errors import QualityLostError
from q4c.graph import check_writable, write_text


@click.command("compile")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path), required=False)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Output file. Default: MODEL with .q4.onnx beside it. Replaced only when the compile succeeds. "
                   "With --system: the output directory.")
@click.option("--system", "system", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="SPEC",
              help="Compile a system of several graphs run by a driver (TOML SPEC: [graphs] name = \"file.onnx\", "
                   "[driver] run = \"driver.py:run\", samples = \"driver.py:samples\") as one: sensitivity on the "
                   "driver's outputs, one budget over all graphs; writes -o DIR/<name>.onnx and DIR/report.json.")
@click.option("--bits", type=click.Choice(["1", "2", "3", "4", "8"]), default=None,
              help="Uniform weight precision instead of the sensitivity-guided default. "
                   "(3-bit codes are stored in 4-bit containers; 2-bit ones as ONNX INT2, opset 25; codebook "
                   "schemes store 1-4 bit indices packed at their width.)")
@click.option("--avg-bits", type=float, default=None,
              help="Budget: average bits per weight (plus scale overhead). Default: 4, i.e. the bytes of uniform "
                   "4-bit, spent where the sensitivity analysis says they matter most.")
@click.option("--size-budget", type=int, default=None, metavar="BYTES",
              help="Budget: bytes for the quantizable weights (codes + scales).")
@click.option("--ratio", type=float, default=None, help="Budget: this fraction of the weights' FP32 bytes.")
@click.option("--scheme", type=click.Choice([*UNIFORM_SCHEMES, *CODEBOOK_SCHEMES]), default="symmetric",
              show_default=True,
              help="Rounding for --bits: nearest level with MSE-chosen clipping; no clipping; or gptq, which "
                   "rounds each weight column so the layer's output error on the --calib inputs is least (MatMul, "
                   "Gemm, LSTM, GRU, Conv weights; others stay symmetric). Codebooks store an index into a float16 "
                   "table of centroids per group of output channels: mulaw (k-means in mu-law-companded space), "
                   "kmeans (linear space), nf4 (NormalFloat levels x a scale per 64 weights); indices assigned "
                   "GPTQ-style where the layer has calibration inputs. Budgeted plans pick per tensor by measurement.")
@click.option("--schemes", "schemes", default=None, metavar="LIST",
              help="Schemes a budgeted plan may choose from per tensor (comma-separated; symmetric always "
                   "stays). Default: all (symmetric-absmax, gptq, mulaw, kmeans, nf4 where they apply).")
@click.option("--workers", "workers", default="0", show_default=True, metavar="N|ray|ray:N",
              help="Threads that measure sensitivity in parallel (0: one per CPU, at most 4); 'ray': Ray workers, "
                   "one per CPU of the cluster ('ray:N': N of them), see --ray-address.")
@click.option("--ray-address", "ray_address", default=None, metavar="ADDR",
              help="--workers ray: the Ray cluster to join (default: $RAY_ADDRESS, else a local Ray for this run).")
@click.option("--candidates", default=None,
              help="Bit widths the allocation may choose from (keeping FP32 is always a choice). 6: Conv and "
                   "LSTM/GRU/RNN weights only, stored as a 4-bit and a 2-bit plane decoded at session load "
                   "(opset 25). Default: 2,3,4,8; with --require 2,3,4,6,8.")
@click.option("--sensitivity", type=click.Choice(["kl", "hessian", "mse"]), default="kl", show_default=True,
              help="kl: output KL divergence with one tensor quantized; hessian: Hutchinson trace of that "
                   "divergence x weight error; mse: weight error only (data-free, fastest).")
@click.option("--objective", "objective", multiple=True, metavar="OUTPUT=KIND",
              help="How sensitivity scores an output (repeatable): kl (KL divergence of a distribution; logits "
                   "are log-softmaxed), bce (Bernoulli KL of a probability; decision flips at 0.5 reported), snr "
                   "(relative noise power), ignore. Default from the graph: Softmax/LogSoftmax -> kl, Sigmoid -> "
                   "bce, state outputs (fed back as an input) -> ignore, other float outputs -> snr.")
@click.option("--scoring", type=click.Choice(["auto", "closed-loop", "open-loop"]), default="auto", show_default=True,
              help="Stateful models whose samples are sequences of calls: closed-loop runs each sequence with the "
                   "quantized model's own state fed back (as deployed) and scores every call's task outputs; "
                   "open-loop feeds each call the FP32 state (cheaper to reason about, blind to compounding). "
                   "auto: closed-loop when the samples are sequences and the model has state pairs.")
@click.option("--require", "require", multiple=True, metavar="REQUIREMENT",
              help="Find the smallest plan whose measured quality on held-out calibration samples (the second "
                   "half of them; closed loop for a stateful model's sequences) meets this (repeatable; all must "
                   "hold). Grammar: METRIC OP NUMBER[UNIT] with "
                   "flips<=N% (decision flips at 0.5 of probability outputs, worst output; or a fraction), "
                   "sqnr>=N[dB] (lowest output SQNR), kl<=N (KL / Bernoulli KL in nats, highest output); e.g. "
                   "--require 'flips<=0.5%' --require 'sqnr>=25dB'. --avg-bits/--size-budget/--ratio then cap the "
                   "size. None met below the cap (or FP32 size): exit 1, nothing written.")
@click.option("--granularity", default="block", show_default=True,
              help="Scale sharing: 'channel' (one scale per output channel), 'block:N' (N in 16..256, "
                   "along the reduction axis), 'tensor', or 'block' (auto: 32 where scales are float16: LSTM/GRU/Conv "
                   "weights, and all weights folded to FP32 at load; 64 for weights MatMulNBits or "
                   "GatherBlockQuantized read, which need float32 scales: 0.5 bit per weight either way).")
@click.option("--target", type=click.Choice([t.value for t in Target]), default=Target.ORT_CPU.value, show_default=True,
              help="ort-cpu: ONNX Runtime's fast low-bit kernels (MatMulNBits, GatherBlockQuantized); "
                   "onnx: standard DequantizeLinear only.")
@click.option("--kernels", type=click.Choice(list(KERNELS)), default="auto", show_default=True,
              help="ort-cpu: 'low-bit' keeps 4-bit weights in memory (MatMulNBits, GatherBlockQuantized; float32 "
                   "scales); 'fp32-at-load' stores every weight as DequantizeLinear with float16 scales, which ONNX "
                   "Runtime folds to FP32 when the session loads (same file size, smaller blocks, so more accurate; "
                   "FP32 memory and speed); 'auto' builds both, times them on the sample input and keeps low-bit only "
                   "when it is clearly (5 %) faster, else folds at load, so the default never runs slower than FP32 "
                   "(once per machine, model and input shape: cached in ~/.cache/q4c/kernels.json).")
@click.option("--latency-budget", "latency_budget", default=None, metavar="X|Nms",
              help="ort-cpu: also plan for speed. X times the FP32 model's time on the sample input (0.6), or "
                   "milliseconds (12ms): each layer's bits and form (MatMulNBits, INT8 dynamic, Scan, "
                   "DynamicQuantizeLSTM, FP32 at load) are chosen for the least measured damage within the byte "
                   "budget and the predicted time; forms are timed on this machine (cached in ~/.cache/q4c/costs/).")
@click.option("--passes", "passes", default=None, metavar="LIST",
              help="Comma-separated passes. Bare names replace the pipeline ('--passes fold-constants'); "
                   "'default' is the default pipeline; '+name'/'-name' add/drop; 'module:Class' loads a pass. "
                   "See 'q4c passes'.")
@click.option("--calib", "--data", "data", type=click.Path(exists=True, path_type=Path), default=None, metavar="DATA",
              help="Sample inputs (.npz keyed by input name, or a directory of them, sorted by name) to calibrate, "
                   "analyse and verify on. A stateful model's sample may hold a whole sequence along a fixed-size "
                   "axis (e.g. tokens [1, T] for a [batch, 1] input): it is run call by call, state carried. "
                   "Default: synthetic inputs from the model's input signature.")
@click.option("--calib-reader", default=None, metavar="MODULE:FUNCTION",
              help="Python reader instead of DATA ('pkg.mod:fn' or 'file.py:fn'): fn() returns an iterable of feed "
                   "dicts, or of lists of them (sequences of calls); a 'state_pairs' attribute on fn maps output "
                   "names to the input names they feed on the next call.")
@click.option("--calib-samples", type=click.IntRange(min=1), default=None,
              help="Use at most this many samples of DATA or the reader. Default: 32, or 128 with --require "
                   "(the requirement is judged on the samples after those scored, at least half: a bound over "
                   "more held-out samples is tighter, so smaller plans can be shown to meet it).")
@click.option("--activations", type=click.Choice(["none", "int8"]), default="none", show_default=True,
              help="int8: uint8 Q/DQ on the activations of MatMul/Gemm/Conv (ranges from calibration) so ONNX Runtime "
                   "runs integer kernels; their weights become int8 per channel. Recurrent state, LSTM/GRU internals, "
                   "STFT front ends, Softmax and normalization inputs stay float.")
@click.option("--observer", type=click.Choice(["minmax", "percentile", "entropy", "mse"]), default="percentile",
              show_default=True,
              help="How calibration picks each activation's range: min/max, the 99.99th percentiles, KL-optimal "
                   "clipping (TensorRT's entropy method), or the clipping with least quantization MSE.")
@click.option("--save-calib", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="TABLE.json",
              help="Calibrate and write the calibration table (ranges and statistics per tensor).")
@click.option("--load-calib", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              metavar="TABLE.json", help="Use a calibration table from --save-calib instead of calibrating.")
@click.option("--plan", "plan", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Replay a precision plan (JSON from --save-plan, possibly edited by hand).")
@click.option("--save-plan", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the precision plan used, to replay or edit.")
@click.option("--keep-fp32", multiple=True, metavar="NAME", help="Weight tensor or node name to leave in float (repeatable).")
@click.option("--plot-pareto", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Draw the budget-vs-damage Pareto curve of a sensitivity-guided plan to this PNG (needs matplotlib).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the compile report (JSON) here.")
@click.option("--dump-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the graph after each pass as NNN_<pass>.onnx.")
@click.option("--check/--no-check", default=False,
              help="After every pass: run the full ONNX checker and audit the pass (an edit it did not report, "
                   "or an analysis that edits, is an error).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check the output: ONNX checker, ONNX Runtime loads it, interpreter agrees with ONNX Runtime.")
@click.option("--strict", is_flag=True,
              help="Exit 4 and write no output file when the verification measures lost quality: an output "
                   "below 20 dB SQNR vs the FP32 model, or NaN/inf where FP32 has none (without --strict: a "
                   "warning). --report and --json still carry the report, with its 'quality' section.")
@click.option("--allow-nonfinite", is_flag=True,
              help="Compile a model whose weights hold NaN or infinite values (refused by default: a broken "
                   "export); those weights stay float, with a warning.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def compile_cmd(model: Path, output: Path | None, bits: str | None, avg_bits: float | None, size_budget: int | None,
                ratio: float | None, scheme: str, workers: str, ray_address: str | None, candidates: str, sensitivity: str, granularity: str, target: str, kernels: str,
                passes: str | None,
                data: Path | None, calib_reader: str | None, calib_samples: int | None, activations: str, observer: str,
                save_calib: Path | None, load_calib: Path | None, plan: Path | None, save_plan: Path | None, keep_fp32: tuple[str, ...],
                plot_pareto: Path | None, report_path: Path | None, dump_dir: Path | None, check: bool, verify: bool, strict: bool,
                allow_nonfinite: bool, as_json: bool, objective: tuple[str, ...] = (), scoring: str = "auto",
                schemes: str | None = None, require: tuple[str, ...] = (), system: Path | None = None,
                latency_budget: str | None = None) -> None:
    """Compile MODEL (FP32 ONNX, opset >= 11) into a low-bit ONNX model (or --system SPEC: several).

    \b
    Examples:
      q4c compile models/lstm_lm.onnx                  # 4-bit, block 32 -> models/lstm_lm.q4.onnx
      q4c compile am.onnx -o am.q8.onnx --bits 8 --granularity channel
      q4c compile am.onnx --passes fold-constants,lower-gemm   # canonicalize only, no quantization
      q4c compile am.onnx --save-plan plan.json  &&  q4c compile am.onnx --plan plan.json
      q4c compile conformer.onnx --calib samples/ --activations int8 --observer mse

    The input file is never modified. The output records the ONNX Runtime session settings it
    needs in its metadata ('q4c.ort_session_config'); 'q4c run' applies them.

    Exit codes: 0 ok (quality warnings, if any, on stderr), 1 error (nothing written),
    2 bad usage, 4 --strict and the verification measured lost quality (nothing written).
    """
    options = CompileOptions(
        bits=int(bits) if bits else None,
        avg_bits=avg_bits,
        size_budget=size_budget,
        ratio=ratio,
        scheme=scheme,
        **_parse_workers(workers, ray_address),
        candidates=_parse_candidates(candidates) if candidates is not None else None,
        sensitivity=sensitivity,
        granularity=Granularity.parse(granularity),
        target=Target(target),
        plan_path=plan,
        keep_fp32=frozenset(keep_fp32),
        kernels=kernels,
        activations=activations,
        observer=observer,
        calib_samples=calib_samples or (REQUIRE_CALIB_SAMPLES if require else DEFAULT_CALIB_SAMPLES),
        calib_table=load_calib,
        allow_nonfinite=allow_nonfinite,
        objectives=_parse_objectives(objective, model),
        scoring=scoring,
        schemes=_parse_schemes(schemes),
        requirements=_parse_requirements(require),
        latency_budget=latency_budget,
    )
    if system is not None or model is None:
        if system is None or model is not None:
            raise click.UsageError("give MODEL, or --system SPEC, not both")
        from q4c.cli.system import compile_system_cmd

        compile_system_cmd(system, output, options, verify=verify, save_plan=save_plan, report_path=report_path,
                           as_json=as_json, strict=strict,
                           unsupported={"--passes": passes, "--calib": data, "--calib-reader": calib_reader,
                                        "--save-calib": save_calib, "--load-calib": load_calib, "--dump-dir": dump_dir,
                                        "--plot-pareto": plot_pareto, "--check": check})
        return
    _compile_one(model, output, options, passes=passes, data=data, calib_reader=calib_reader, dump_dir=dump_dir,
                 check=check, verify=verify, save_plan=save_plan, save_calib=save_calib, strict=strict,
                 plot_pareto=plot_pareto, report_path=report_path, as_json=as_json)


def _compile_one(model: Path, output: Path | None, options: CompileOptions, *, passes: str | None, data: Path | None,
                 calib_reader: str | None, dump_dir: Path | None, check: bool, verify: bool, save_plan: Path | None,
                 save_calib: Path | None, strict: bool, plot_pareto: Path | None, report_path: Path | None,
                 as_json: bool) -> None:
    """One model: compile with a progress line per pass and a bar over samples, then the outputs."""
    total = [0]
    bar = _SampleBar()

    def progress(name: str) -> None:
        bar.close()  # a bar a pass left open (a search that stopped before its cap) ends with it
        total[0] += 1
        click.echo(f"q4c: [{total[0]}] {name}", err=True)

    # Fail before compiling, not after the output is written (compile_file checks its own paths).
    if report_path is not None:
        check_writable(report_path, "--report")
    if dump_dir is not None:
        check_writable(dump_dir, "--dump-dir", directory=True)
    try:
        with bar:
            report = compile_file(model, output, options, passes=passes, data=data, reader=calib_reader,
                                  dump_dir=dump_dir, check_each=check, verify=verify, progress=progress,
                                  sample_progress=bar.update, save_plan=save_plan, save_calib=save_calib,
                                  strict=strict, task_progress=bar.task)
    except QualityLostError as e:
        # The report says what was measured even though nothing was written.
        if e.report is not None and report_path is not None:
            write_text(report_path, json.dumps(e.report, indent=2, sort_keys=True, default=str) + "\n")
        if e.report is not None and as_json:
            emit_json(e.report)
        click.echo(f"Error: {e}", err=True)
        raise click.exceptions.Exit(e.exit_code) from e
    if plot_pareto is not None:
        from q4c.quant.pareto import plot_pareto as draw

        draw(report.get("pareto", []), plot_pareto, title=Path(report["input"]["path"]).name)
    if report_path is not None:
        write_text(report_path, json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    if as_json:
        emit_json(report)
        return
    print_summary(report)


class _SampleBar:
    """A progress bar on stderr over calibration samples (or, `task`, over an analysis's units of
    work: sensitivity tasks, --require plans), opened on the first report of each."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._done = 0
        self._label = ""

    def __enter__(self) -> _SampleBar:
        return self

    def task(self, what: str, done: int, total: int) -> None:
        self.update(done, total, label=what)

    def update(self, done: int, total: int | None, label: str = "calibrating") -> None:
        if self._bar is None or done < self._done or label != self._label:
            self.close()
            self._bar = click.progressbar(length=total, label=f"q4c: {label}", file=sys.stderr,
                                          show_pos=True, item_show_func=None)
            self._bar.__enter__()
            self._done = 0
            self._label = label
        self._bar.update(done - self._done)
        self._done = done
        if total is not None and done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse_schemes(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    known = (*UNIFORM_SCHEMES, *CODEBOOK_SCHEMES)
    unknown = [s for s in names if s not in known]
    if unknown:
        raise click.BadParameter(f"{unknown[0]!r} is not a scheme (one of {', '.join(known)})", param_hint="--schemes")
    return names


def _parse_objectives(texts: tuple[str, ...], model: Path) -> tuple[tuple[str, str], ...]:
    """--objective OUTPUT=KIND values, checked against the model's output names (usage errors)."""
    if not texts:
        return ()
    from q4c.objectives import parse_objective

    pairs = []
    for text in texts:
        try:
            pairs.append(parse_objective(text))
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--objective") from None
    try:
        import onnx

        outputs = [o.name for o in onnx.load(str(model), load_external_data=False).graph.output]
    except Exception:  # an unreadable model is compile's error to report
        return tuple(pairs)
    unknown = [name for name, _ in pairs if name not in outputs]
    if unknown:
        raise click.BadParameter(f"{', '.join(map(repr, unknown))} is not an output of {model.name} "
                                 f"(outputs: {', '.join(outputs)})", param_hint="--objective")
    return tuple(pairs)


def _parse_requirements(texts: tuple[str, ...]) -> tuple[str, ...]:
    from q4c.requirements import parse_requirement

    for text in texts:
        try:
            parse_requirement(text)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--require") from None
    return tuple(texts)


def _parse_workers(text: str, ray_address: str | None) -> dict[str, Any]:
    """--workers N (threads), ray or ray:N (Ray workers; N = 0: one per cluster CPU)."""
    backend, _, count = text.strip().partition(":") if text.strip().startswith("ray") else ("", "", text)
    try:
        n = int(count or 0)
    except ValueError:
        raise click.BadParameter(f"expected a thread count, 'ray' or 'ray:N', not {text!r}",
                                 param_hint="--workers") from None
    if ray_address is not None and backend != "ray":
        raise click.BadParameter("--ray-address needs --workers ray", param_hint="--ray-address")
    if backend not in ("", "ray"):
        raise click.BadParameter(f"expected a thread count, 'ray' or 'ray:N', not {text!r}", param_hint="--workers")
    return {"workers": n, "workers_backend": WorkerBackend.RAY if backend else WorkerBackend.THREADS,
            "ray_address": ray_address}


def _parse_candidates(text: str) -> tuple[int, ...]:
    try:
        return tuple(sorted({int(b) for b in text.split(",") if b.strip()}))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated bit widths like 2,4,8, not {text!r}",
                                 param_hint="--candidates") from None
