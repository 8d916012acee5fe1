"""Render step_bench's JSON as Markdown: machine, command, settings, one table per case, profiles.

    python -m bench.report results.json [more.json ...] > table.md

Several files (runs of one session on one machine, e.g. a second invocation for the
compiled variants) are merged into one table per case; ratios are to that case's faster
textbook baseline (float32 or bf16 frozen weights), measured in the same session on the same inputs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .models import CASES
from .profile import kernel_kind
from .steps import LEARNING_RATE, PEFT_TARGET_MODULES, RANK


def merge(reports: list[dict]) -> dict:
    """One report from several runs: the first one's machine and settings, all results."""
    merged = {**reports[0], "results": [], "profiles": {}, "memory": {}}
    merged["commands"] = [r["machine"]["command"] for r in reports]
    for r in reports:
        merged["results"] += r["results"]
        merged["profiles"].update(r.get("profiles", {}))
        merged["memory"].update(r.get("memory", {}))
    return merged


def render(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    commands = report.get("commands", [m["command"]])
    lines = [
        f"Machine: {m['device']}; torch {m['torch']} (CUDA {m['cuda']}, cuDNN {m.get('cudnn')}), "
        f"diffusers {m['diffusers']}, peft {m['peft']}, Python {m['python']}.",
        "",
        "Commands (one session, one machine):",
        "",
        *(f"    {c}" for c in commands),
        "",
        f"Settings: {s['warmup']} warm-up steps after one FLOP-counted step, then {s['steps']} timed "
        f"steps (median); LoRA rank = alpha = {RANK} on {', '.join(PEFT_TARGET_MODULES)} inside "
        f"the transformer blocks; lr {LEARNING_RATE:g}, grad-norm clip 1.0; random weights and inputs.",
        "",
    ]
    for case_name in CASES:
        rows = [r for r in report["results"] if r["case"] == case_name]
        if rows:
            lines += _case_table(case_name, rows)
    for key, prof in report.get("profiles", {}).items():
        lines += _profile(key, prof)
    for key, phases in report.get("memory", {}).items():
        lines += [
            f"#### Memory by phase: {key}",
            "",
            "| GiB | start | peak | after |",
            "| --- | ---: | ---: | ---: |",
        ]
        start = phases["start_gib"]
        for phase in ("forward", "backward", "optimizer"):
            peak, after = phases[f"{phase}_peak_gib"], phases[f"after_{phase}_gib"]
            lines.append(f"| {phase} | {start:.2f} | {peak:.2f} | {after:.2f} |")
            start = after
        lines.append("")
    return "\n".join(lines)


def _case_table(case_name: str, rows: list[dict]) -> list[str]:
    case = CASES[case_name]
    baselines = [r for r in rows if r["variant"].startswith("baseline") and "error" not in r]
    base = max(baselines, key=lambda r: r["images_per_s"], default=None)
    gc = ", gradient checkpointing" if case.gradient_checkpointing else ""
    out = [
        f"#### {case.family.upper()} {case.resolution}², batch {case.batch_size}{gc}",
        "",
        "| variant | images/s | × best baseline | step ms | peak GiB | steady GiB | GFLOP/step | TFLOP/s "
        "| one-off s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['variant']} | {r['error'][:80]} | | | | | | | |")
            continue
        ratio = f"{r['images_per_s'] / base['images_per_s']:.2f}" if base else "–"
        compile_s = f"{r['compile_s']:.0f}" if "compile_s" in r else ""
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "–"
        steady = f"{r['steady_gib']:.2f}" if "steady_gib" in r else "–"  # runs 1-6 lack it
        out.append(
            f"| {r['variant']} | {r['images_per_s']:.2f} | {ratio} | {r['step_ms_median']:.1f} "
            f"| {peak} | {steady} "
            f"| {r['flops_per_step'] / 1e9:,.0f} | {r['tflops']:.1f} | {compile_s} |"
        )
    return [*out, ""]


def _profile(key: str, prof: dict) -> list[str]:
    # kinds are re-derived from the names with profile.kernel_kind, over the top kernels kept
    top = prof["top_kernels"]
    by_kind: dict[str, float] = {}
    for k in top:
        by_kind[kernel_kind(k["name"])] = by_kind.get(kernel_kind(k["name"]), 0.0) + k["pct"]
    kinds = ", ".join(f"{kind} {pct:.0f}%" for kind, pct in sorted(by_kind.items(), key=lambda kv: -kv[1]))
    out = [
        f"#### Profile: {key}",
        "",
        f"{prof['steps']} steps: wall {prof['wall_ms_per_step']:.1f} ms/step, GPU kernels "
        f"{prof['kernel_ms_per_step']:.1f} ms/step (profiler on). The top {len(top)} kernels hold "
        f"{sum(by_kind.values()):.0f}% of the GPU time: {kinds}.",
        "",
        "| kernel | kind | ms/step | % | calls/step |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for k in top[:15]:
        name = k["name"].replace("|", "\\|")[:90]
        cells = f"{k['ms_per_step']:.2f} | {k['pct']:.1f} | {k['calls_per_step']:.0f}"
        out.append(f"| `{name}` | {kernel_kind(k['name'])} | {cells} |")
    return [*out, ""]


def main(argv: list[str] | None = None) -> None:
    paths = argv if argv is not None else sys.argv[1:]
    reports = [json.loads(Path(p).read_text()) for p in paths]
    sys.stdout.write(render(merge(reports)) + "\n")


if __name__ == "__main__":
    main()
