"""Write results.md and the PNG plots from a list of run results (as produced by the harness)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from benchmark import workloads
from benchmark.systems import SYSTEMS

log = logging.getLogger(__name__)

THROUGHPUT_WORKLOADS = ("wordcount", "frames", "latency")


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _cpu(r: dict[str, Any]) -> str:
    c = r.get("cpu_us_per_task") or {}
    parts = f"{_fmt(c.get('caller'), 1)} / {_fmt(c.get('workers'), 1)}"
    if c.get("redis") is not None:
        parts += f" / {_fmt(c.get('redis'), 1)}"
    return f"{_fmt(c.get('total'), 1)} ({parts})"


def _check(r: dict[str, Any]) -> str:
    check = r.get("check") or {}
    return "pass" if check.get("passed") else "FAIL"


def _order(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    names = list(SYSTEMS)
    return sorted(
        results,
        key=lambda r: (names.index(r["system"]) if r["system"] in names else 99, r["workers"]),
    )


def markdown(doc: dict[str, Any], plots: dict[str, str | None]) -> str:
    results: list[dict[str, Any]] = doc["results"]
    ok = [r for r in results if r["status"] == "ok"]
    m = doc["machine"]
    versions = ", ".join(
        f"{name} {v}" if v else f"{name}: not installed" for name, v in m["versions"].items()
    )
    lines = [
        "# pytaskqml benchmark results",
        "",
        f"Measured by `{doc['command']}` from {doc['started']} to {doc['finished']} "
        f"({doc['elapsed_s']:.0f} s). Every number below was measured in that run; "
        "the raw per-run JSON is written next to this file (git-ignored).",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu_model']}, {m['cores']} cores ({m['cores_usable']} usable)",
        f"- Python {m['python']} ({m['implementation']}), {m['platform']}",
        f"- Versions: {versions}",
        f"- pytaskqml commit: {m.get('commit') or 'unknown'}"
        + (" (with uncommitted changes)" if m.get("dirty") else ""),
        "",
        "## Method",
        "",
        "- Every system gets the same number of worker processes "
        f"({doc['default_workers']} unless the table says otherwise); "
        "`pytaskqml-threads` uses that many thread workers in the caller's process.",
        "- Start-up (spawning workers, connecting) is timed separately and excluded from the "
        "rate; a warm-up batch runs before the timed repeats.",
        f"- {doc['repeats']} timed repeats per case: the rate is the median, the spread is "
        "(max - min) / median.",
        "- CPU per task = CPU time (user + system, from `/proc/<pid>/stat`) of the caller "
        "process + every worker process it started (+ the Redis server for Celery, found via "
        "`INFO server` `process_id`), over the timed repeats, divided by the task count; shown "
        "as total (caller / workers / Redis) in µs.",
        "- Every repeat is checked: wordcount sums the `{word: 1}` results and compares them "
        "with the input counts (and each result with its input, in order); frames compares a "
        "sample in order with a locally computed reference; latency and sleep compare every "
        "result with its input.",
        "- `celery` is pipelined (`delay()` for every task, then `get()` in order); "
        "`celery-seq` is the old one-at-a-time `delay().get()`. Both Celery variants get fewer "
        "tasks per repeat (column n) so that the whole run fits in ~15 minutes.",
        "",
    ]
    if plots.get("throughput"):
        lines += ["![throughput per system and workload](throughput.png)", ""]
    for name in ("wordcount", "frames"):
        rows = _order([r for r in ok if r["workload"] == name])
        if not rows:
            continue
        lines += [
            f"## {name}: {workloads.WORKLOADS[name].description}",
            "",
            "| system | workers | n | tasks/s (median) | spread | CPU µs/task "
            "(caller / workers / Redis) | start-up s | check |",
            "|---|---:|---:|---:|---:|---|---:|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['system']} | {r['workers']} | {r['n']} | {_fmt(r['rate_per_s'])} | "
                f"{r['rate_spread_pct']}% | {_cpu(r)} | {_fmt(r['startup_s'], 2)} | {_check(r)} |"
            )
        lines.append("")
    rows = _order([r for r in ok if r["workload"] == "latency"])
    if rows:
        lines += [
            f"## latency: {workloads.WORKLOADS['latency'].description}",
            "",
            "| system | workers | n x repeats | p50 µs | p99 µs | max µs | echoes/s | "
            "CPU µs/task (caller / workers / Redis) | check |",
            "|---|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for r in rows:
            lat = r["latency_us"]
            lines.append(
                f"| {r['system']} | {r['workers']} | {r['n']} x {r['repeats']} | "
                f"{_fmt(lat['p50'])} | {_fmt(lat['p99'])} | {_fmt(lat['max'])} | "
                f"{_fmt(r['rate_per_s'])} | {_cpu(r)} | {_check(r)} |"
            )
        lines.append("")
    sleep = [r for r in ok if r["workload"] == "sleep"]
    if sleep:
        counts = sorted({r["workers"] for r in sleep})
        lines += [
            f"## sleep: {workloads.WORKLOADS['sleep'].description}",
            "",
            "Tasks/s and efficiency (rate / ideal, ideal = workers / 10 ms) per worker count.",
            "",
        ]
        if plots.get("scaling"):
            lines += ["![scaling of the 10 ms sleep workload](scaling.png)", ""]
        lines += [
            "| system | " + " | ".join(f"{c} workers" for c in counts) + " |",
            "|---|" + "---:|" * len(counts),
        ]
        for system in [s for s in SYSTEMS if any(r["system"] == s for r in sleep)]:
            cells = []
            for c in counts:
                hit = [r for r in sleep if r["system"] == system and r["workers"] == c]
                cells.append(
                    f"{_fmt(hit[0]['rate_per_s'])} ({hit[0]['efficiency']:.0%})" if hit else "-"
                )
            lines.append(f"| {system} | " + " | ".join(cells) + " |")
        lines.append("")
    bad = [r for r in results if r["status"] != "ok"]
    lines += ["## Skipped and failed runs", ""]
    if not bad:
        lines.append("None.")
    grouped: dict[tuple[str, str, str], list[str]] = {}
    for r in _order(bad):
        key = (r["system"], r["status"], r.get("skip_reason") or r.get("error") or "?")
        grouped.setdefault(key, []).append(f"{r['workload']}/{r['workers']}")
    for (system, status, why), runs in grouped.items():
        lines.append(f"- {system} ({', '.join(runs)}): **{status}**: {why}")
    lines += ["", "## Systems", ""]
    lines += [f"- `{s.name}`: {s.label}" for s in SYSTEMS.values()]
    if not plots.get("throughput"):
        lines += ["", f"Plots not written: {plots.get('why')}"]
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], out: Path) -> dict[str, str | None]:
    """Write throughput.png and scaling.png; return which were written (or why not)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return {"throughput": None, "scaling": None, "why": f"matplotlib missing ({exc})"}
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    written: dict[str, str | None] = {"throughput": None, "scaling": None}
    default = doc["default_workers"]
    bars = [r for r in ok if r["workload"] in THROUGHPUT_WORKLOADS and r["workers"] == default]
    if bars:
        systems = [s for s in SYSTEMS if any(r["system"] == s for r in bars)]
        names = [w for w in THROUGHPUT_WORKLOADS if any(r["workload"] == w for r in bars)]
        fig, ax = plt.subplots(figsize=(10, 5.5))
        width = 0.8 / len(systems)
        for i, system in enumerate(systems):
            xs, ys = [], []
            for j, name in enumerate(names):
                hit = [r for r in bars if r["system"] == system and r["workload"] == name]
                if hit:
                    xs.append(j + (i - (len(systems) - 1) / 2) * width)
                    ys.append(hit[0]["rate_per_s"])
            ax.bar(xs, ys, width, label=system)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(
            [f"{n}\n(echoes/s, one at a time)" if n == "latency" else n for n in names]
        )
        ax.set_yscale("log")
        ax.set_ylabel("tasks per second (median, log scale)")
        ax.set_title(f"Throughput with {default} workers per system (higher is better)")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=110)
        plt.close(fig)
        written["throughput"] = "throughput.png"
    sleep = [r for r in ok if r["workload"] == "sleep"]
    if sleep:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
        counts = sorted({r["workers"] for r in sleep})
        ax1.plot(counts, [c / workloads.SLEEP_S for c in counts], "k--", label="ideal")
        for system in [s for s in SYSTEMS if any(r["system"] == s for r in sleep)]:
            rows = sorted((r for r in sleep if r["system"] == system), key=lambda r: r["workers"])
            ax1.plot(
                [r["workers"] for r in rows], [r["rate_per_s"] for r in rows], "o-", label=system
            )
            ax2.plot(
                [r["workers"] for r in rows], [r["efficiency"] for r in rows], "o-", label=system
            )
        for ax in (ax1, ax2):
            ax.set_xscale("log", base=2)
            ax.set_xticks(counts)
            ax.set_xticklabels([str(c) for c in counts])
            ax.set_xlabel("workers")
            ax.grid(alpha=0.3)
        ax1.set_yscale("log")
        ax1.set_ylabel("tasks per second (log scale)")
        ax1.set_title("10 ms sleep tasks: throughput")
        ax2.set_ylabel("efficiency (rate / ideal)")
        ax2.set_ylim(0, 1.1)
        ax2.set_title("10 ms sleep tasks: efficiency")
        ax1.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "scaling.png", dpi=110)
        plt.close(fig)
        written["scaling"] = "scaling.png"
    return written


def write(doc: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plots = plot(doc, out)
    (out / "results.md").write_text(markdown(doc, plots), encoding="utf-8")
    log.info("wrote %s", out / "results.md")
