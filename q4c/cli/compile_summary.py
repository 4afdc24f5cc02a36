"""What `q4c compile` prints after a compile: the tensor table, objectives, budget and verification."""

from __future__ import annotations

import click

from q4c.cli.render import human_bytes, table


def print_summary(report: dict) -> None:
    inp, out = report["input"], report["output"]
    click.echo(f"{inp['path']} ({human_bytes(inp['bytes'])}) -> {out['path']} ({human_bytes(out['bytes'])}), "
               f"{report['compression']:.2f}x smaller")
    if report.get("avg_weight_bits") is not None:
        click.echo(f"average weight bits: {report['avg_weight_bits']:.2f} over {len(report['tensors'])} quantized tensors")
    measure = report.get("sensitivity", {}).get("measure")
    planned = report.get("plan", {}).get("tensors", {})
    rows = [(t["name"], t["op"], "x".join(map(str, t["shape"])), _key(t), t["granularity"],
             planned.get(t["name"], {}).get("form", "-"), t["sensitivity"].get("weight_sqnr_db", "-"),
             (t["sensitivity"].get(measure, {}).get(_key(t), "-") if measure else "-"))
            for t in report["tensors"]]
    if rows:
        click.echo(table(["tensor", "op", "shape", "bits", "granularity", "form", "weight SQNR dB",
                          f"{measure or 'sensitivity'} score"], rows))
    _print_objectives(report)
    plan = report.get("plan", {}).get("defaults", {})
    if plan.get("mode") == "budgeted":
        click.echo(f"budget: {plan['used_bytes']} of {plan['budget_bytes']} bytes used "
                   f"({plan['sensitivity']} sensitivity, predicted damage {plan['predicted_damage']:.4g})")
    latency = plan.get("latency")
    if latency:
        measured = latency.get("measured_ratio")
        click.echo(f"latency budget {latency['budget']}: {'met' if latency['budget_met'] else 'NOT met'}; predicted "
                   f"{latency['predicted_ratio']:.2f}x FP32 ({latency['predicted_ms']:.3f} ms)"
                   + (f", measured {measured:.2f}x" if measured is not None else "")
                   + f" over {len(latency.get('attempts', []))} plan(s) built and timed; costs from "
                   f"{latency['costs']['cache_path']} (key {latency['costs']['cache_key']}, oldest entry "
                   f"{latency['costs']['oldest_entry_age_s']} s)")
    verification = report.get("verification")
    if verification:
        line = (f"verified: checker ok, ONNX Runtime loads it, interpreter vs ONNX Runtime max |diff| "
                f"{verification['interp_vs_ort_max_abs']:.3g}")
        if "output_sqnr_db" in verification:
            line += "; output SQNR vs FP32: " + ", ".join(f"{k} {v:.1f} dB" for k, v in verification["output_sqnr_db"].items())
        click.echo(line)
    quality = report.get("quality")
    if quality and not quality["ok"]:
        # The warnings went to stderr as they happened; the table says it once more beside the figures.
        click.echo(f"quality: {len(quality['lost'])} output figure(s) below the thresholds (see warnings; "
                   f"--strict makes this exit 4)")


def _print_objectives(report: dict) -> None:
    """One line on what sensitivity scored, one on what the plan measured (task outputs)."""
    sens = report.get("sensitivity", {})
    if "objectives" not in sens:
        return
    parts = [f"{n} {o['objective']} ({o['reason']})" for n, o in sens["objectives"].items()]
    click.echo(f"objectives: {'; '.join(parts)}; scored {sens['scoring']} over {sens['units']} sample(s), "
               f"{sens['calls']} call(s)")
    plan = sens.get("measured", {}).get("plan")
    if plan:
        figures = []
        for name, m in plan.items():
            text = f"{name} {m['objective']} {m['damage']:.4g}"
            if "flips" in m:
                text += f", decision flips {100 * m['flips']:.2f} % of {m['values']}"
            if "sqnr_db" in m:
                text += f", SQNR {m['sqnr_db']:.1f} dB"
            figures.append(text)
        where = "held-out calibration samples" if "require" in sens.get("measured", {}) else "calibration samples"
        click.echo(f"plan measured on the {where} ({sens.get('plans_measured', sens['scoring'])}): "
                   f"{'; '.join(figures)}")
    if "require" in sens.get("measured", {}):
        req = sens["measured"]["require"]
        held = sens.get("held_out", {}).get("samples", [])
        click.echo(f"required {', '.join(req['requirements'])}: met with {', '.join(req['figures'])} at "
                   f"{req['bytes']} of {req['fp32_bytes']} FP32 weight bytes ({req['plans_measured']} plans measured "
                   f"on held-out samples {held})")


def _key(t: dict) -> str:
    from q4c.quant.candidates import scheme_key

    return scheme_key(t["bits"], t.get("scheme", ""))
