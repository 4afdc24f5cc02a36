"""`q4c compile`: FP32 ONNX in, low-bit ONNX out, with a report."""

from __future__ import annotations

import json
from pathlib import Path

import click

from q4c.cli.render import emit_json, human_bytes, table
from q4c.compiler import compile_file
from q4c.config import CompileOptions, Granularity, Target


@click.command("compile")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output file. Default: MODEL with .q4.onnx beside it. Replaced only when the compile succeeds.")
@click.option("--bits", type=click.Choice(["2", "3", "4", "8"]), default=None,
              help="Uniform weight precision instead of the sensitivity-guided default. "
                   "(3-bit codes are stored in 4-bit containers; 2-bit ones as ONNX INT2, opset 25.)")
@click.option("--avg-bits", type=float, default=None,
              help="Budget: average bits per weight (plus scale overhead). Default: 4, i.e. the bytes of uniform "
                   "4-bit, spent where the sensitivity analysis says they matter most.")
@click.option("--size-budget", type=int, default=None, metavar="BYTES",
              help="Budget: bytes for the quantizable weights (codes + scales).")
@click.option("--ratio", type=float, default=None, help="Budget: this fraction of the weights' FP32 bytes.")
@click.option("--candidates", default="2,3,4,8", show_default=True,
              help="Bit widths the allocation may choose from (keeping FP32 is always a choice).")
@click.option("--sensitivity", type=click.Choice(["kl", "hessian", "mse"]), default="kl", show_default=True,
              help="kl: output KL divergence with one tensor quantized; hessian: Hutchinson trace of that "
                   "divergence x weight error; mse: weight error only (data-free, fastest).")
@click.option("--granularity", default="block", show_default=True,
              help="Scale sharing: 'channel' (one scale per output channel), 'block:N' (N in 16..256, "
                   "along the reduction axis), 'tensor', or 'block' (auto: 32 for LSTM/GRU/Conv weights, whose "
                   "scales are float16; 64 for MatMul/embedding weights, whose kernels need float32 scales).")
@click.option("--target", type=click.Choice([t.value for t in Target]), default=Target.ORT_CPU.value, show_default=True,
              help="ort-cpu: ONNX Runtime's fast low-bit kernels (MatMulNBits, GatherBlockQuantized); "
                   "onnx: standard DequantizeLinear only.")
@click.option("--kernels", type=click.Choice(["auto", "low-bit"]), default="auto", show_default=True,
              help="ort-cpu: 'auto' times MatMulNBits against FP32 MatMul (weights folded at load) on the sample "
                   "input and keeps the faster; 'low-bit' always keeps 4-bit weights in memory (MatMulNBits).")
@click.option("--passes", "passes", default=None, metavar="LIST",
              help="Comma-separated passes. Bare names replace the pipeline ('--passes fold-constants'); "
                   "'default' is the default pipeline; '+name'/'-name' add/drop; 'module:Class' loads a pass. "
                   "See 'q4c passes'.")
@click.option("--data", "--calib", "data", type=click.Path(exists=True, path_type=Path), default=None,
              help="Sample inputs (.npz keyed by input name, or a directory of them) used to verify the result. "
                   "Default: synthetic inputs from the model's input signature.")
@click.option("--plan", "plan", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Replay a precision plan (JSON from --save-plan, possibly edited by hand).")
@click.option("--save-plan", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the precision plan used, to replay or edit.")
@click.option("--keep-fp32", multiple=True, metavar="NAME", help="Weight tensor or node name to leave in float (repeatable).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the compile report (JSON) here.")
@click.option("--dump-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the graph after each pass as NNN_<pass>.onnx.")
@click.option("--check/--no-check", default=False, help="Run the full ONNX checker after every pass.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check the output: ONNX checker, ONNX Runtime loads it, interpreter agrees with ONNX Runtime.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def compile_cmd(model: Path, output: Path | None, bits: str | None, avg_bits: float | None, size_budget: int | None,
                ratio: float | None, candidates: str, sensitivity: str, granularity: str, target: str, kernels: str,
                passes: str | None,
                data: Path | None, plan: Path | None, save_plan: Path | None, keep_fp32: tuple[str, ...],
                report_path: Path | None, dump_dir: Path | None, check: bool, verify: bool, as_json: bool) -> None:
    """Compile MODEL (FP32 ONNX, opset >= 11) into a low-bit ONNX model.

    \b
    Examples:
      q4c compile models/lstm_lm.onnx                  # 4-bit, block 32 -> models/lstm_lm.q4.onnx
      q4c compile am.onnx -o am.q8.onnx --bits 8 --granularity channel
      q4c compile am.onnx --passes fold-constants,lower-gemm   # canonicalize only, no quantization
      q4c compile am.onnx --save-plan plan.json  &&  q4c compile am.onnx --plan plan.json

    The input file is never modified. The output records the ONNX Runtime session settings it
    needs in its metadata ('q4c.ort_session_config'); 'q4c run' applies them.
    """
    options = CompileOptions(
        bits=int(bits) if bits else None,
        avg_bits=avg_bits,
        size_budget=size_budget,
        ratio=ratio,
        candidates=_parse_candidates(candidates),
        sensitivity=sensitivity,
        granularity=Granularity.parse(granularity),
        target=Target(target),
        plan_path=plan,
        keep_fp32=frozenset(keep_fp32),
        kernels=kernels,
    )
    total = [0]

    def progress(name: str) -> None:
        total[0] += 1
        click.echo(f"q4c: [{total[0]}] {name}", err=True)

    report = compile_file(model, output, options, passes=passes, data=data, dump_dir=dump_dir,
                          check_each=check, verify=verify, progress=progress, save_plan=save_plan)
    if report_path is not None:
        report_path.write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    if as_json:
        emit_json(report)
        return
    _print_summary(report)


def _parse_candidates(text: str) -> tuple[int, ...]:
    try:
        return tuple(sorted({int(b) for b in text.split(",") if b.strip()}))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated bit widths like 2,4,8, not {text!r}",
                                 param_hint="--candidates") from None


def _print_summary(report: dict) -> None:
    inp, out = report["input"], report["output"]
    click.echo(f"{inp['path']} ({human_bytes(inp['bytes'])}) -> {out['path']} ({human_bytes(out['bytes'])}), "
               f"{report['compression']:.2f}x smaller")
    if report.get("avg_weight_bits") is not None:
        click.echo(f"average weight bits: {report['avg_weight_bits']:.2f} over {len(report['tensors'])} quantized tensors")
    measure = report.get("sensitivity", {}).get("measure")
    rows = [(t["name"], t["op"], "x".join(map(str, t["shape"])), t["bits"], t["granularity"],
             t["sensitivity"].get("weight_sqnr_db", "-"),
             (t["sensitivity"].get(measure, {}).get(str(t["bits"]), "-") if measure else "-"))
            for t in report["tensors"]]
    if rows:
        click.echo(table(["tensor", "op", "shape", "bits", "granularity", "weight SQNR dB", f"{measure or 'sensitivity'} score"],
                         rows))
    plan = report.get("plan", {}).get("defaults", {})
    if plan.get("mode") == "budgeted":
        click.echo(f"budget: {plan['used_bytes']} of {plan['budget_bytes']} bytes used "
                   f"({plan['sensitivity']} sensitivity, predicted damage {plan['predicted_damage']:.4g})")
    verification = report.get("verification")
    if verification:
        line = (f"verified: checker ok, ONNX Runtime loads it, interpreter vs ONNX Runtime max |diff| "
                f"{verification['interp_vs_ort_max_abs']:.3g}")
        if "output_sqnr_db" in verification:
            line += "; output SQNR vs FP32: " + ", ".join(f"{k} {v:.1f} dB" for k, v in verification["output_sqnr_db"].items())
        click.echo(line)
