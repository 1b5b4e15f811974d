"""An evaluate.json as markdown: the comparison table and the evaluation report page.

``comparison_markdown`` is the trade-off at a glance (``visionpipe compare``
prints it; the evaluate stage puts it on top of ``reports/evaluation/report.md``,
which ``report_markdown`` writes whole). Imports nothing heavy: the command
answers in well under a second.
"""

from __future__ import annotations

from typing import Any

from tasks.evaluation.results import (
    BASELINES,
    RUNTIME_VERSIONS,
    STEPS,
    variant_results,
)


def report_markdown(results: dict[str, dict[str, Any]], classes: tuple[str, ...]) -> str:
    """Everything one run's evaluation found, as one markdown page beside its images."""
    lines = ["# visionpipe evaluation (test split)", "", comparison_markdown(results), ""]
    results = variant_results(results)
    variants = list(results)
    lines += [
        "## Per class: F1 (precision / recall), support",
        "",
        "| class | " + " | ".join(variants) + " | support |",
        "|---|" + "---|" * (len(variants) + 1),
    ]
    first = results[variants[0]]
    for name in classes:
        cells = [
            f"{m['f1_per_class'][name]:.3f} ({m['precision_per_class'][name]:.2f} / "
            f"{m['recall_per_class'][name]:.2f})"
            for m in results.values()
        ]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {first['support_per_class'][name]} |"
        )
    if all("robustness" in m for m in results.values()):
        lines += [
            "",
            "## Robustness: accuracy under fixed corruptions",
            "",
            "| corruption | " + " | ".join(variants) + " |",
            "|---|" + "---|" * len(variants),
        ]
        lines.append(
            "| none | " + " | ".join(f"{m['accuracy']:.3f}" for m in results.values()) + " |"
        )
        for corruption in first["robustness"]:
            cells = [f"{m['robustness'][corruption]:.3f}" for m in results.values()]
            lines.append(f"| {corruption} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Calibration",
        "",
        "| variant | ECE | temperature (fitted on val) | ECE after | reliability diagram |",
        "|---|---|---|---|---|",
    ]
    for name, m in results.items():
        lines.append(
            f"| {name} | {m['ece']:.4f} | {m['temperature']:.3f} | "
            f"{m['ece_temperature_scaled']:.4f} | ![]({name}_reliability.png) |"
        )
    lines += ["", "## What each compression step costs", ""]
    for reference, candidate in STEPS:
        lines.append(f"![{candidate} minus {reference}](delta_{candidate}_vs_{reference}.png)")
    lines += ["", "## ROC and precision-recall curves", ""]
    lines += [f"![{name}]({name}_roc_pr.png)" for name in variants]
    lines += ["", "## Grad-CAM", ""]
    lines += [f"![{name}]({name}_grad_cam.png)" for name in variants if name != "student_int8"]
    return "\n".join(lines) + "\n"


def comparison_markdown(results: dict[str, dict[str, Any]]) -> str:
    """The trade-off at a glance: one row per variant, latency per runtime, compression targets.

    Latency columns are the variant's fastest runtime at batch 64 (``runtime``).
    """
    header = (
        "| variant | f1_macro | f1_macro 95% CI | accuracy | ECE | params | size_bytes "
        "| latency_ms_b1 | latency_ms_b64 | throughput_ips_b64 | runtime |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    # What learning nothing scores on the same test split (tasks/data/baselines.py).
    for name, b in results.get(BASELINES, {}).items():
        lines.append(
            f"| baseline: {name} | {b['f1_macro']:.4f} | — | {b['accuracy']:.4f} | — | — | — "
            "| — | — | — | — |"
        )
    versions = results.get(RUNTIME_VERSIONS, {})
    results = variant_results(results)
    for name, m in results.items():
        # an evaluate.json written before confidence intervals, ECE and batch 64 has none
        ci = "[{:.4f}, {:.4f}]".format(*m["f1_macro_ci"]) if "f1_macro_ci" in m else "—"
        ece = f"{m['ece']:.4f}" if "ece" in m else "—"
        b64 = f"{m['latency_ms_b64']:.3f}" if "latency_ms_b64" in m else "—"
        ips = f"{m['throughput_ips_b64']:,.0f}" if "throughput_ips_b64" in m else "—"
        lines.append(
            f"| {name} | {m['f1_macro']:.4f} | {ci} | {m['accuracy']:.4f} | {ece} "
            f"| {m['params']:,} | {m['size_bytes']:,} | {m['latency_ms_b1']:.3f} | {b64} | {ips} "
            f"| {m['runtime']} |"
        )
    steps = [
        (name, key, m[key]) for name, m in results.items() for key in m if key.startswith("vs_")
    ]
    if steps:
        lines += ["", "| step | f1_macro delta | 95% CI | McNemar p |", "|---|---|---|---|"]
        for name, key, c in steps:
            low, high = c["f1_macro_delta_ci"]
            lines.append(
                f"| {name} {key.replace('_', ' ')} | {c['f1_macro_delta']:+.4f} "
                f"| [{low:+.4f}, {high:+.4f}] | {c['mcnemar_p']:.3g} |"
            )
    lines += _runtimes_markdown(results, versions)
    lines += _targets_markdown(results)
    return "\n".join(lines)


def _runtimes_markdown(results: dict[str, dict[str, Any]], versions: dict[str, str]) -> list[str]:
    """Every runtime each variant was timed in; the one it reports is marked."""
    rows = [
        f"| {name} | {runtime} | {r['latency_ms_b1']:.3f} | {r['p95_ms_b1']:.3f} "
        f"| {r['latency_ms_b64']:.3f} | {r['throughput_ips_b64']:,.0f} "
        f"| {'fastest' if runtime == m['runtime'] else ''} |"
        for name, m in results.items()
        for runtime, r in m.get("latency_by_runtime", {}).items()
    ]
    if not rows:
        return []
    return [
        "",
        "## Latency by runtime (ms per call; same threads, same run, interleaved)",
        "",
        "| variant | runtime | latency_ms_b1 | p95_ms_b1 | latency_ms_b64 | throughput_ips_b64 "
        "| reported |",
        "|---|---|---|---|---|---|---|",
        *rows,
        *(["", "Runtime versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())]
          if versions else []),
    ]  # fmt: skip


def _number(value: float, spec: str = ".4f") -> str:
    """A count (bytes) with thousands separators, a ratio in ``spec``."""
    return f"{value:,}" if isinstance(value, int) else format(value, spec)


def _targets_markdown(results: dict[str, dict[str, Any]]) -> list[str]:
    """The compression targets, with every miss and every place int8 is slower said in words."""
    lines: list[str] = []
    reference_of = {candidate: reference for reference, candidate in STEPS}
    for name, m in results.items():
        if "targets" not in m:
            continue
        reference = reference_of.get(name, "the fp32 model")
        lines += [
            "",
            f"## Compression targets and budget ({name})",
            "",
            "| target | measured | target | met | against |",
            "|---|---|---|---|---|",
        ]
        for key, t in m["targets"].items():
            met = "yes" if t["met"] else "**NO (missed)**"
            lines.append(
                f"| {key} | {_number(t['value'])} | <= {_number(t['target'], 'g')} | {met} "
                f"| {t['reference']} |"
            )
        missed = [(key, t) for key, t in m["targets"].items() if not t["met"]]
        lines.append("")
        if missed:
            lines.append(
                f"**{len(missed)} of {len(m['targets'])} targets missed:** "
                + "; ".join(
                    f"{key} is {_number(t['value'])}, above the target {_number(t['target'], 'g')}"
                    for key, t in missed
                )
                + "."
            )
        else:
            lines.append("All compression targets and the budget met.")
        lines += _slower_notes(name, m, results.get(reference, {}))
    return lines


def _slower_notes(name: str, int8: dict[str, Any], fp32: dict[str, Any]) -> list[str]:
    """One line per fp32 runtime and batch size where ``name`` is slower than its reference."""
    notes = []
    for runtime, r in fp32.get("latency_by_runtime", {}).items():
        for key, batch in (("latency_ms_b1", 1), ("latency_ms_b64", 64)):
            mine = int8.get(key)
            if mine is not None and mine > r[key]:
                notes.append(
                    f"- {name} ({int8['runtime']}) is slower than the fp32 model in {runtime} "
                    f"at batch {batch}: {mine:.3f} vs {r[key]:.3f} ms per call "
                    f"({mine / r[key]:.2f}x)."
                )
    return ["", *notes] if notes else []
