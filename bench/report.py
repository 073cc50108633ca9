"""The report: machine info, the ratios against the targets, the tables, the plots, and the
files ``results.json``, ``results.md``, ``throughput.png`` and ``p99.png``."""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psycopg
import redis

from .harness import Point, Results
from .sections import buckets, cluster, scopes


def machine_info(redis_url: str, pg_url: str | None) -> dict[str, Any]:
    with redis.Redis.from_url(redis_url) as conn:
        server = conn.info("server")
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "redis_server": server.get("server_name", "redis"),
        "redis_version": server.get("valkey_version") or server.get("redis_version"),
    }
    if pg_url is not None:
        with psycopg.connect(pg_url) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        info["postgresql_version"] = row[0] if row else None
    return info


def ratios(res: Results) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, num: Point | None, den: Point | None, target: float) -> None:
        value = num.rate / den.rate if num and den else None
        out.append(ratio_row(name, value, f">= {target:g}x", value is not None and value >= target))

    hot = res.find("redcredit async spend", 64)
    spread = res.find("redcredit async spend, 10k accounts", 64)
    add(
        "async spend 64 / ceiling pipelined", hot, res.find("raw RESP EVALSHA, pipelined x16"), 0.35
    )
    add(
        "async spend 64 / raw redis-py 1 call/RTT",
        hot,
        res.find("redis-py EVALSHA, 1 call/round trip"),
        3,
    )
    add("async spend 64 / database-only hot", hot, res.find("database-only, hot row", 64), 10)
    add(
        "async spend 64 (10k accts) / database-only spread",
        spread,
        res.find("database-only, spread 10k rows", 64),
        5,
    )
    limits = [
        p
        for p in (res.find("limits moving window hit", 64), res.find("limits fixed window hit", 64))
        if p
    ]
    add(
        "async spend 64 / limits (faster window)",
        hot,
        max(limits, key=lambda p: p.rate) if limits else None,
        3,
    )
    p99 = hot.p99_ms if hot else None
    out.append(ratio_row("p99 at 64 callers (ms)", p99, "<= 5 ms", p99 is not None and p99 <= 5))
    spends = [
        p.rate for p in res.points if p.system.startswith("redcredit") and "spend" in p.system
    ]
    drain = res.syncer.get("drain_rate")
    value = drain / max(spends) if drain and spends else None
    out.append(
        ratio_row(
            "drain / highest spend rate", value, ">= 1.5x", value is not None and value >= 1.5
        )
    )
    for processes, callers in (
        (1, 64),
        (cluster.PROCESSES, cluster.PROCESSES * cluster.CALLERS_PER_PROCESS),
    ):
        one = res.find(cluster.system(cluster.STANDALONE, processes), callers)
        many = res.find(cluster.system(cluster.CLUSTER, processes), callers)
        shape = cluster.described(processes, callers)
        add(f"cluster / standalone calls/s, {shape}", many, one, 0.9)
        cpu = cluster.cpu_ratio(many, one)
        out.append(
            ratio_row(
                f"cluster / standalone client CPU per call, {shape}",
                cpu,
                "<= 1.3x",
                cpu is not None and cpu <= 1.3,
            )
        )
    out.extend(ratio_row(*row) for row in buckets.ratios(res))
    out.extend(ratio_row(*row) for row in scopes.ratios(res))
    idle = res.memory.get("idle_account_bytes")
    out.append(
        ratio_row(
            "Redis bytes per idle account", idle, "<= 200 B", idle is not None and idle <= 200
        )
    )
    return out


def ratio_row(name: str, value: float | None, target: str, met: bool | None) -> dict[str, Any]:
    """``met`` None: a ratio reported beside the targets, with none of its own."""
    if value is None:
        status = "n/a"
    elif met is None:
        status = "reported"
    else:
        status = "met" if met else "MISSED"
    return {"measure": name, "value": value, "target": target, "status": status}


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def tables(res: Results, rows: list[dict[str, Any]]) -> tuple[str, str]:
    head = (
        "| section | system | callers | calls/s (median) | min-max | p50 ms | p99 ms "
        "| p99.9 ms | client CPU | Redis CPU | PostgreSQL CPU |"
    )
    lines = [head, "|" + "---|" * 11]
    for p in res.points:
        redis_share = "-" if p.redis_cpu is None else f"{p.redis_cpu:.0%}"
        pg_share = "-" if p.postgres_cpu is None else f"{p.postgres_cpu:.0%}"
        lines.append(
            f"| {p.section} | {p.system} | {p.callers} | {p.rate:,.0f} | "
            f"{min(p.rates):,.0f}-{max(p.rates):,.0f} | {p.p50_ms:.2f} | {p.p99_ms:.2f} | "
            f"{p.p999_ms:.2f} | {p.client_cpu:.0%} | {redis_share} | {pg_share} |"
        )
    ratio_lines = ["| measure | value | target | status |", "|---|---|---|---|"]
    for r in rows:
        ratio_lines.append(
            f"| {r['measure']} | {fmt(r['value'])} | {r['target']} | {r['status']} |"
        )
    return "\n".join(lines), "\n".join(ratio_lines)


def plot(res: Results, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[Point]] = {}
    for p in res.points:
        series.setdefault(p.system, []).append(p)
    series = {k: sorted(v, key=lambda p: p.callers) for k, v in series.items() if len(v) > 1}
    if not series:
        return []
    written = []
    for metric, label, name in (
        ("rate", "calls/s", "throughput.png"),
        ("p99_ms", "p99 latency (ms)", "p99.png"),
    ):
        fig, ax = plt.subplots(figsize=(8, 5))
        for system, points in series.items():
            ax.plot(
                [p.callers for p in points],
                [getattr(p, metric) for p in points],
                "o-",
                label=system,
            )
        if metric == "rate":
            for ceiling, style in (("raw RESP EVALSHA, pipelined x16", "--"),
                                   ("raw RESP EVALSHA, unpipelined", ":")):  # fmt: skip
                point = res.find(ceiling)
                if point is not None:
                    ax.axhline(
                        point.rate, color="grey", linestyle=style, label=f"ceiling: {ceiling}"
                    )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent callers")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs concurrency ({res.mode})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def write(res: Results, out: Path) -> None:
    rows = ratios(res)
    table, ratio_table = tables(res, rows)
    out.mkdir(parents=True, exist_ok=True)
    plots = plot(res, out)
    data = {
        "started": res.started,
        "mode": res.mode,
        "machine": res.machine,
        "points": [{**asdict(p), "rate": p.rate} for p in res.points],
        "ratios": rows,
        "syncer": res.syncer,
        "memory": res.memory,
        "extra": res.extra,
        "plots": plots,
    }
    (out / "results.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    machine = ", ".join(f"{k}: {v}" for k, v in res.machine.items())
    extra = "\n".join(f"- {k}: {v}" for k, v in {**res.syncer, **res.memory, **res.extra}.items())
    md = (
        f"# redcredit benchmark ({res.mode}, {res.started})\n\n{machine}\n\n{table}\n\n"
        f"## Ratios and targets\n\n{ratio_table}\n\n## Syncer, memory, other\n\n{extra}\n"
        + "".join(f"\n![{p}]({p})\n" for p in plots)
    )
    (out / "results.md").write_text(md)
    print(f"\nMachine: {machine}\n\n{table}\n\n{ratio_table}\n")
    if extra:
        print(extra)
    print(f"\nwritten to {out}")
