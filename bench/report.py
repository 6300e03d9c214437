"""``herald bench --report``: BENCHMARKS.md and PNG plots from one suite JSON.

Every ratio compares two figures of the **same run** and the same parameters
(scenario, rate, subscription or topic count), so machine noise between runs
does not leak into it. Throughput ratios read "Herald / row": above 1, Herald
moved more. Latency ratios read "Herald p99 / row p99": below 1, Herald was
faster. The durability of every figure sits next to it.

Plots (matplotlib, Agg backend: no display needed) go to ``bench/plots/``:
latency percentiles against offered rate, throughput against subscriptions,
throughput against topics, and the live feed's latency against rate.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import orjson

from bench.floor import STORE_FLOOR
from bench.harness import PROJECT_ROOT, RESULTS_DIR

MARKDOWN_PATH: Final = PROJECT_ROOT / "BENCHMARKS.md"
PLOTS_DIR: Final = PROJECT_ROOT / "bench" / "plots"
HERALD: Final = "herald"
HERALD_LIVE: Final = "herald-live"
RAW_SYSTEMS: Final = frozenset({"raw-zmq", "raw-pubsub"})
SYSTEM_ORDER: Final = ("herald", "herald-live", "raw-zmq", "raw-pubsub", STORE_FLOOR, "redis-always", "redis-everysec", "nats", "nats-always")
ISSUE_LATENCY_RATE: Final = 2_000  # the rate issue 5 sets its p99 target at


def latest_suite_json() -> Path:
    """The newest ``bench/results/suite-*.json``.

    Raises:
        FileNotFoundError: when there is none, saying how to make one.
    """
    runs = sorted(RESULTS_DIR.glob("suite-*.json"), key=lambda path: path.stat().st_mtime)
    if not runs:
        raise FileNotFoundError(f"no suite results in {RESULTS_DIR}; run `herald bench --compare` first, or pass --from JSON")
    return runs[-1]


def short_durability(text: str) -> str:
    """The durability's first clause: ``"fsync per group commit"``, ``"fsync every 1 s"``, ``"none"``."""
    return re.split(r"[:(]", text, maxsplit=1)[0].strip()


def _order(system: str) -> int:
    return SYSTEM_ORDER.index(system) if system in SYSTEM_ORDER else len(SYSTEM_ORDER)


def _number(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    if value is None or not math.isfinite(value) or value <= 0:
        return "-"
    return f"{value:.2f}x" if value < 10 else f"{value:.1f}x"


def _us(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value / 1000:,.2f} ms" if value >= 1000 else f"{value:,.0f} us"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return [*lines, ""]


def _by(results: list[dict[str, Any]], scenario: str) -> list[dict[str, Any]]:
    """A scenario's figures, grouped by parameters (so the rows compared sit together), systems in a fixed order."""
    return sorted((r for r in results if r.get("scenario") == scenario), key=lambda r: (sorted(r["params"].items()), _order(r["system"])))


def _key(result: dict[str, Any], *keys: str) -> tuple[Any, ...]:
    return tuple(result["params"].get(key) for key in keys)


def _reference(results: list[dict[str, Any]], system: str, scenario: str, params: dict[str, Any]) -> dict[str, Any] | None:
    for result in results:
        if result.get("scenario") == scenario and result["system"] == system and result["params"] == params:
            return result
    return None


def _throughput_section(title: str, intro: str, results: list[dict[str, Any]], scenario: str, param: str | None, param_label: str) -> list[str]:
    rows = _by(results, scenario)
    if not rows:
        return []
    reference_system = HERALD_LIVE if scenario == "live" else HERALD
    header = [*([param_label] if param else []), "system", "value", "durability", "Herald / row", "row / raw", "server CPU per unit", "steal"]
    table = []
    for result in rows:
        herald = _reference(results, reference_system, scenario, result["params"])
        versus = herald["value"] / result["value"] if herald and result["value"] and result["system"] != reference_system else None
        table.append(
            [
                *([f"{result['params'].get(param):,}"] if param else []),
                result["extra"].get("system_label", result["system"]),
                f"{_number(result['value'])} {result['unit']}{_rounds_note(result)}"
                + (f" **incomplete**: {result['extra']['incomplete']}" if result["extra"].get("incomplete") else ""),
                short_durability(result["durability"]),
                _ratio(versus) if versus else "-",
                _ratio(result.get("ratio")) if result.get("ratio") else "-",
                _server_cpu_per_unit(result),
                _steal(result),
            ]
        )
    return [f"### {title}", "", intro, "", *_table(header, table, ("r" if param else "") + "llll" + "rrr")]


def _rounds_note(result: dict[str, Any]) -> str:
    """`` (median of 3 rounds: 31,204-35,118)`` after a figure measured in rounds, the systems in turn."""
    rounds = result["extra"].get("rounds")
    if not rounds or len(rounds) < 2:
        return ""
    return f" (median of {len(rounds)} rounds: {_number(min(rounds))}-{_number(max(rounds))})"


def _steal_note(result: dict[str, Any]) -> str:
    """`` (steal 12.7%)`` after a headline figure measured while the host took 1% or more of the CPUs."""
    share = result["extra"].get("cpu_steal_share")
    return f" (steal {share:.1%})" if share is not None and share >= 0.01 else ""


def _steal(result: dict[str, Any]) -> str:
    """The CPU steal while the figure was measured (see the header), or - for a run that did not record it."""
    share = result["extra"].get("cpu_steal_share")
    return "-" if share is None else f"{share:.1%}"


def _server_cpu_per_unit(result: dict[str, Any]) -> str:
    """CPU the server's processes used per message (or delivery) of the figure: all Herald roles together, or the peer's one process."""
    used = result["extra"].get("server_cpu_s")
    units = result["value"] * result["seconds"]
    if not used or not units:
        return "-"
    return f"{sum(used.values()) / units * 1e6:,.1f} us"


def _latency_section(title: str, intro: str, results: list[dict[str, Any]], scenario: str) -> list[str]:
    rows = _by(results, scenario)
    if not rows:
        return []
    reference_system = HERALD_LIVE if scenario == "live" else HERALD
    rows = [r for r in rows if r["unit"].startswith("us")]
    if not rows:
        return []
    header = ["offered /s", "system", "p50", "p99", "p99.9", "max", "achieved /s", "kept up", "durability", "Herald p99 / row p99", "steal"]
    table = []
    for result in sorted(rows, key=lambda r: (r["params"].get("rate", 0), _order(r["system"]))):
        latency = result.get("latency") or {}
        herald = _reference(results, reference_system, scenario, result["params"])
        versus = herald["value"] / result["value"] if herald and result["value"] and result["system"] != reference_system else None
        extra = result["extra"]
        kept = "yes" if extra.get("kept_up") else "**no**"
        if extra.get("highest_sustainable"):
            kept += " (highest)"
        offered = f"{result['params'].get('rate', 0):,}" + (" (search)" if result["params"].get("search") else "")
        table.append(
            [
                offered,
                extra.get("system_label", result["system"]),
                _us(latency.get("p50_us")),
                _us(latency.get("p99_us")),
                _us(latency.get("p999_us")),
                _us(latency.get("max_us")),
                _number(extra.get("achieved_msg_per_s")),
                kept,
                short_durability(result["durability"]),
                _ratio(versus) if versus else "-",
                _steal(result),
            ]
        )
    return [f"### {title}", "", intro, "", *_table(header, table, "rlrrrrrllrr")]


def _steal_line(machine: dict[str, Any], results: list[dict[str, Any]]) -> list[str]:
    """How much CPU the hypervisor took for other machines: over the run, and at its worst figure."""
    whole = machine.get("cpu_steal_share")
    if whole is None:
        return []
    worst = max(results, key=lambda result: result["extra"].get("cpu_steal_share", 0.0), default=None)
    line = f"- CPU steal (time the hypervisor gave these CPUs to other machines): {whole:.1%} over the run"
    if worst is not None and worst["extra"].get("cpu_steal_share"):
        line += f"; the most, {worst['extra']['cpu_steal_share']:.1%}, while measuring {worst['name']!r}"
    return [line + ". Each figure's share is in its table's `steal` column; figures move with it."]


def _headline(results: list[dict[str, Any]]) -> list[str]:
    """The figures issue 5 sets targets on, each with its ratio to the peers of the same run."""
    lines = ["## Headline: the issue 5 targets, this run", ""]
    rows: list[list[str]] = []
    e2e = {r["system"]: r for r in results if r.get("scenario") == "fanout" and r["params"].get("subscriptions") == 1}
    if HERALD in e2e:
        herald = e2e[HERALD]["value"]
        for name in ("redis-always", "nats", "nats-always"):
            if name in e2e:
                target = 1.0 if name == "redis-always" else 3.0
                ratio = herald / e2e[name]["value"] if e2e[name]["value"] else math.nan
                verdict = "met" if ratio >= target else "not met"
                rows.append(
                    [
                        "end-to-end publish->deliver->ack, 1 subscription",
                        f"Herald {_number(herald)} msg/s{_rounds_note(e2e[HERALD])}{_steal_note(e2e[HERALD])} vs "
                        f"{e2e[name]['extra'].get('system_label', name)} {_number(e2e[name]['value'])} msg/s{_rounds_note(e2e[name])}{_steal_note(e2e[name])}",
                        f"{_ratio(ratio)} (target >= {target:g}x)",
                        verdict,
                    ]
                )
    latency = {r["system"]: r for r in results if r.get("scenario") == "latency" and r["params"] == {"rate": ISSUE_LATENCY_RATE}}
    if HERALD in latency:
        herald_p99 = latency[HERALD]["value"]
        for name in ("redis-always", "nats"):
            if name in latency:
                peer = latency[name]["value"]
                rows.append(
                    [
                        f"p99 publish->deliver @ {ISSUE_LATENCY_RATE:,}/s",
                        f"Herald {_us(herald_p99)}{_steal_note(latency[HERALD])} vs {latency[name]['extra'].get('system_label', name)} {_us(peer)}"
                        f"{_steal_note(latency[name])}",
                        f"{_ratio(herald_p99 / peer if peer else math.nan)} (target < 1x)",
                        "met" if herald_p99 < peer else "not met",
                    ]
                )
        rows.append(
            [f"p99 publish->deliver @ {ISSUE_LATENCY_RATE:,}/s, aim", f"Herald {_us(herald_p99)}", "aim < 1 ms", "met" if herald_p99 < 1000 else "not met"]
        )
        if STORE_FLOOR in latency:
            floor_p99 = latency[STORE_FLOOR]["value"]
            rows.append(
                [
                    f"context: p99 of Herald's store alone @ {ISSUE_LATENCY_RATE:,}/s",
                    f"{_us(floor_p99)}: the shard append + WAL fsync every publish waits for, with no network (bench/floor.py)",
                    f"Herald {_ratio(herald_p99 / floor_p99 if floor_p99 else math.nan)} of it",
                    "-",
                ]
            )
    live = {r["system"]: r for r in results if r.get("scenario") == "live" and r["unit"] == "msg/s"}
    if HERALD_LIVE in live and "raw-pubsub" in live:
        ratio = live[HERALD_LIVE]["value"] / live["raw-pubsub"]["value"] if live["raw-pubsub"]["value"] else math.nan
        rows.append(
            [
                "live feed SUB receive rate, batched publishing",
                f"Herald {_number(live[HERALD_LIVE]['value'])} msg/s{_rounds_note(live[HERALD_LIVE])} vs raw PUB/SUB {_number(live['raw-pubsub']['value'])} msg/s"
                f"{_rounds_note(live['raw-pubsub'])}",
                f"{_ratio(ratio)} (target >= 0.5x)",
                "met" if ratio >= 0.5 else "not met",
            ]
        )
    if not rows:
        return []
    return [*lines, *_table(["target", "figures", "ratio", "verdict"], rows, "llll")]


def render_markdown(report: dict[str, Any], plots: list[Path], markdown_path: Path) -> str:
    """The text of BENCHMARKS.md for one suite JSON."""
    results: list[dict[str, Any]] = report["results"]
    machine = report["machine"]
    config = report["config"]
    command = " ".join(report.get("command", []))
    lines = [
        "# Herald benchmarks",
        "",
        "Written by `herald bench --report` from one run of `herald bench`; do not edit by hand. How the suite works, the",
        "scenarios and every peer's settings: [bench/README.md](bench/README.md).",
        "",
        f"- Command: `{command}`",
        f"- Finished: {report.get('finished_at', '?')}, {config.get('elapsed_s', '?')} s",
        f"- Machine: {machine.get('usable_cpus', '?')} usable CPUs ({machine.get('cpu_model', '?')}), Linux {machine.get('kernel', '?')}, "
        f"load average at start {', '.join(f'{x:.2f}' for x in machine.get('loadavg_at_start', []))}, data folders on {machine.get('data_dir_filesystem', '?')}",
        f"- Software: CPython {machine.get('python', '?')}, pyzmq {machine.get('pyzmq', '?')} / libzmq {machine.get('libzmq', '?')}, "
        f"rocksdict {machine.get('rocksdict', '?')}, orjson {machine.get('orjson', '?')}, uvloop {machine.get('uvloop', '?')}",
        f"- Peers: {', '.join(f'{name} {version}' for name, version in machine.get('peers', {}).items()) or 'none (run with --compare)'}",
        f"- Herald at commit `{machine.get('git_commit', '?')[:10]}`{' (working tree had changes)' if machine.get('git_dirty') else ''}; JSON: "
        f"`{report.get('json_path', '')}`",
        *_steal_line(machine, results),
        f"- Payload {config.get('size', '?')} bytes; publisher and every consumer each in their own process; ratios are between figures of this run only.",
        "- `server CPU per unit`: user + system CPU of the server's processes during the timed part (every Herald role together; the "
        "peer's one server process), per message or delivery of the figure; the clients' CPU is not in it.",
        "",
    ]
    skipped = machine.get("skipped_peers") or {}
    if skipped:
        lines += ["Skipped peers: " + "; ".join(f"{name}: {reason}" for name, reason in skipped.items()), ""]
    lines += _headline(results)
    durability_rows: dict[str, tuple[str, str]] = {}
    for result in results:
        durability_rows.setdefault(result["system"], (result["extra"].get("system_label", result["system"]), result["durability"]))
    lines += ["## What an acknowledgement means, per system", ""]
    lines += _table(["system", "durability"], (durability_rows[name] for name in sorted(durability_rows, key=_order)), "ll")
    lines += ["## Figures", ""]
    lines += _throughput_section(
        "Durable publish throughput",
        "Pipelined: batches of 100 (one Herald PUBLISH, one Redis pipeline, 100 JetStream `publish_async`), several in flight; "
        "from the first send to the last acknowledgement. The raw row is PUSH->PULL between two processes, timed to the receiver.",
        results,
        "publish",
        None,
        "",
    )
    lines += _throughput_section(
        "Fan-out: publish -> deliver -> ack against subscriptions",
        "One topic (stream), S durable subscriptions (consumer groups, durable pull consumers), consumers in two processes with one "
        "task per subscription. Aggregate deliveries per second from the first publish to the last delivery. A figure marked "
        "'median of N rounds' is the median of N rounds run with the systems in turn, so a slow phase of the machine falls on all of them. Herald consumers "
        "`receive_batch(100)` + `ack_nowait()`; Redis `XREADGROUP COUNT 100` + `XACK`; JetStream `fetch(100)` + `ack()`. The raw row is PUB/SUB to S SUB sockets.",
        results,
        "fanout",
        "subscriptions",
        "S",
    )
    lines += _latency_section(
        "Publish -> deliver latency at fixed offered rates",
        "Open loop: message k is due at t0 + k/rate whatever happened before, and its latency runs from that scheduled time to its "
        "delivery, so stalls are not hidden. `kept up`: all delivered, achieved >= 95% of offered and p99 <= 100 ms; `(search)` rows "
        "are the step search for the highest sustainable rate. JetStream uses a push consumer here. `Herald's store alone` is the shard "
        "append + WAL fsync every durable publish waits for, run alone in the benchmark process on Herald's filesystem (bench/floor.py): "
        "no fsync-before-ack latency is below it, and a peer that acknowledges before its fsync can be.",
        results,
        "latency",
    )
    lines += _throughput_section(
        "Many topics: publish throughput against topic count",
        "Batches of 10 messages, each batch to the next topic round-robin; every topic was published to once before the timer. "
        "Flat across the rows means per-message routing and metadata cost does not grow with the number of topics.",
        results,
        "topics",
        "topics",
        "topics",
    )
    lines += _throughput_section(
        "Backlog drain",
        "N messages published to a subscription nobody reads, then one consumer attaches and drains them, acknowledging as it goes.",
        results,
        "backlog",
        "messages",
        "messages",
    )
    lines += _throughput_section(
        "Live feed: native SUB throughput",
        "A plain pyzmq SUB socket on Herald's live feed (decoded with `clients.protocol.decode`), publisher sending batches of 100; "
        "against raw pyzmq PUB/SUB between two processes. At-most-once on both sides: losses are in the JSON.",
        [r for r in results if r.get("scenario") != "live" or r["unit"] == "msg/s"],
        "live",
        None,
        "",
    )
    lines += _latency_section(
        "Live feed: latency at fixed offered rates",
        "Herald's live message leaves once its batch is written to the WAL, before that batch's fsync, so its latency includes the group commit's write but not its fsync.",
        results,
        "live",
    )
    notes = config.get("notes") or []
    if notes:
        lines += ["## Notes from the run", "", *(f"- {note}" for note in notes), ""]
    if plots:
        lines += ["## Plots", ""]
        for plot in plots:
            relative = plot.relative_to(markdown_path.parent) if plot.is_relative_to(markdown_path.parent) else plot
            lines += [f"![{plot.stem}]({relative.as_posix()})", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _series(results: list[dict[str, Any]], scenario: str, param: str, unit_prefix: str = "") -> dict[str, list[tuple[float, dict[str, Any]]]]:
    series: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for result in results:
        if result.get("scenario") == scenario and param in result["params"] and result["unit"].startswith(unit_prefix):
            series.setdefault(result["system"], []).append((float(result["params"][param]), result))
    for points in series.values():
        points.sort(key=lambda point: point[0])
    return series


def write_plots(results: list[dict[str, Any]], directory: Path) -> list[Path]:
    """The PNG plots; none (with a message) when matplotlib is missing.

    Returns:
        The files written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench] matplotlib is not installed (pip install -e '.[bench]'): no plots")
        return []
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def label(points: list[tuple[float, dict[str, Any]]], system: str) -> str:
        return str(points[0][1]["extra"].get("system_label", system)) if points else system

    for scenario, filename, title in (
        ("latency", "latency_vs_rate.png", "publish -> deliver latency against offered rate"),
        ("live", "live_latency_vs_rate.png", "live feed latency against offered rate"),
    ):
        series = _series(results, scenario, "rate", "us")
        if not series:
            continue
        figure, axes = plt.subplots(figsize=(9, 5.5))
        for system in sorted(series, key=_order):
            points = [point for point in series[system] if point[1].get("latency")]
            if not points:
                continue
            rates = [point[0] for point in points]
            (line,) = axes.plot(rates, [point[1]["latency"]["p99_us"] / 1000 for point in points], marker="o", label=f"{label(points, system)} p99")
            axes.plot(
                rates,
                [point[1]["latency"]["p50_us"] / 1000 for point in points],
                marker=".",
                linestyle="--",
                color=line.get_color(),
                label=f"{label(points, system)} p50",
            )
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("offered rate (msg/s)")
        axes.set_ylabel("latency from scheduled send (ms)")
        axes.set_title(title)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=7, ncol=2)
        figure.tight_layout()
        path = directory / filename
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)

    for scenario, param, filename, xlabel, title in (
        ("fanout", "subscriptions", "throughput_vs_subscriptions.png", "subscriptions of one topic", "aggregate deliveries/s against subscriptions"),
        ("topics", "topics", "throughput_vs_topics.png", "topics published to", "publish msg/s against topic count"),
    ):
        series = _series(results, scenario, param)
        if not series:
            continue
        figure, axes = plt.subplots(figsize=(9, 5.5))
        for system in sorted(series, key=_order):
            points = series[system]
            axes.plot([point[0] for point in points], [point[1]["value"] for point in points], marker="o", label=label(points, system))
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel(xlabel)
        axes.set_ylabel(series[next(iter(series))][0][1]["unit"])
        axes.set_title(title)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        path = directory / filename
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def write(json_path: Path, markdown_path: Path = MARKDOWN_PATH, plots_dir: Path = PLOTS_DIR) -> Path:
    """Write BENCHMARKS.md (and the plots) for the suite run in ``json_path``.

    Returns:
        The Markdown path.
    """
    report = orjson.loads(json_path.read_bytes())
    if report.get("benchmark") != "suite":
        raise ValueError(f"{json_path} is a {report.get('benchmark')!r} result, not a `herald bench` suite run")
    try:
        report["json_path"] = json_path.resolve().relative_to(PROJECT_ROOT).as_posix()
    except ValueError:
        report["json_path"] = str(json_path)
    plots = write_plots(report["results"], plots_dir)
    markdown_path.write_text(render_markdown(report, plots, markdown_path.resolve()))
    return markdown_path


def main_from_args(from_json: Path | None, markdown: Path | None, plots_dir: Path | None = None) -> int:
    """``herald bench --report``: from ``from_json`` or the newest suite JSON.

    Returns:
        The process exit code.
    """
    try:
        source = from_json or latest_suite_json()
        path = write(source, markdown or MARKDOWN_PATH, plots_dir or PLOTS_DIR)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}")
        return 1
    print(f"report: {path} (from {source})")
    return 0
