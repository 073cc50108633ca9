"""`python -m bench --quick` runs end to end on a few fast sections and writes its JSON; every
registered section can be chosen, and a name that is not one is refused before anything starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from bench import bucket_profile, scope_profile
from bench.__main__ import parse
from bench.sections import NAMES, SECTIONS
from bench.sections import buckets as buckets_section
from bench.sections import cluster as cluster_section
from bench.sections import scopes as scopes_section
from redcredit.core.scripts import load_scripts

ROOT = Path(__file__).resolve().parent.parent


def test_quick_bench_runs_and_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        [
            sys.executable, "-m", "bench", "--quick", "--only", "ceiling,async,memory",
            "--runs", "3", "--seconds", "0.2", "--out", str(out),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert {"started", "mode", "machine", "points", "ratios", "memory", "syncer"} <= set(data)
    assert data["mode"] == "quick"
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["redis_version"]
    systems = {(p["system"], p["callers"]) for p in data["points"]}
    assert ("redcredit async spend", 64) in systems
    assert ("raw RESP EVALSHA, pipelined x16", 256) in systems
    for point in data["points"]:
        assert len(point["rates"]) == 3 and point["rate"] > 0 and point["calls"] > 0
        assert point["p50_ms"] <= point["p99_ms"] <= point["p999_ms"]
        assert point["client_cpu"] > 0 and point["redis_cpu"] is not None
        assert point["redis_cpu_us_per_call"] > 0
        # Every point here runs scripts by EVALSHA, so commandstats times them.
        assert point["redis_script_us_per_call"] > 0
    assert 0 < data["memory"]["idle_account_bytes"] < 10_000
    ratios = {r["measure"]: r for r in data["ratios"]}
    assert ratios["async spend 64 / ceiling pipelined"]["status"] in {"met", "MISSED"}
    assert ratios["async spend 64 / database-only hot"]["status"] == "n/a"
    assert (out / "results.md").is_file()
    assert (out / "throughput.png").is_file() and (out / "p99.png").is_file()


def test_quick_cluster_section_sets_a_cluster_beside_one_redis(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        [
            sys.executable, "-m", "bench", "--quick", "--only", "cluster,cluster-drain",
            "--runs", "2", "--seconds", "0.2", "--out", str(out),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["machine"]["redis_cluster"] == "3 primaries, no replicas"
    points = {(p["system"], p["callers"]): p for p in data["points"]}
    for kind in (cluster_section.STANDALONE, cluster_section.CLUSTER):
        shapes = [(cluster_section.system(kind), n) for n in (1, 64, 256)]
        shapes.append((cluster_section.system(kind, 4), 256))
        for shape in shapes:
            point = points[shape]
            assert point["rate"] > 0 and point["client_cpu_us_per_call"] > 0
            assert point["redis_cpu"] > 0 and "calls per round trip" in point["note"]
    # Many accounts, so every node of the cluster has its share.
    per_node = data["extra"]["cluster: keys per node after warming 10k accounts"]
    assert len(per_node) == 3 and min(per_node) > 1000
    ratios = {r["measure"]: r for r in data["ratios"]}
    for shape in ("64 callers", "4 processes x 64 callers"):
        for measure in ("calls/s", "client CPU per call"):
            row = ratios[f"cluster / standalone {measure}, {shape}"]
            assert row["status"] in {"met", "MISSED"} and row["value"] > 0
    assert "cluster / standalone, 256 callers" in data["extra"]
    # The syncer drained the same journal from both, in the same run.
    assert float(data["extra"]["syncer drain, cluster / standalone"].rstrip("x")) > 0


def test_quick_buckets_section_compares_bucket_accounts_with_plain_ones(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        [
            sys.executable, "-m", "bench", "--quick", "--only", "buckets",
            "--runs", "1", "--seconds", "0.2", "--out", str(out),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    points = {p["system"]: p for p in data["points"] if p["section"] == "buckets"}
    expected = {
        series.system(setup) for series in buckets_section.SERIES for setup in series.setups
    }
    assert set(points) == expected
    assert "redcredit async spend, 32 buckets" in points
    for point in points.values():
        assert point["callers"] == 64 and point["rate"] > 0
        assert point["redis_script_us_per_call"] > 0 and point["redis_cpu"] > 0
    ratios = {r["measure"]: r for r in data["ratios"]}
    target = ratios["async spend, 8 buckets / plain account, 64 callers"]
    assert target["target"] == ">= 0.7x" and target["status"] in {"met", "MISSED"}
    for n in ("1 bucket", "32 buckets"):
        row = ratios[f"async spend, {n} / plain account, 64 callers"]
        assert row["status"] == "reported" and row["value"] > 0
    assert ratios["reserve -> settle, 8 buckets / plain account, 64 callers"]["value"] > 0
    summary = data["extra"]["buckets: redcredit async spend, 8 buckets"]
    assert "us in the script (commandstats)" in summary and "over plain account" in summary
    assert data["extra"]["buckets: load average (1 min), before and after"].count(",") == 1


def test_quick_scopes_section_compares_paths_with_a_plain_account(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        [
            sys.executable, "-m", "bench", "--quick", "--only", "scopes",
            "--runs", "1", "--seconds", "0.2", "--out", str(out),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    points = {p["system"]: p for p in data["points"] if p["section"] == "scopes"}
    expected = {series.system(setup) for series in scopes_section.SERIES for setup in series.setups}
    assert set(points) == expected
    for point in points.values():
        assert point["callers"] == 64 and point["rate"] > 0
        assert point["redis_script_us_per_call"] > 0 and point["redis_cpu_us_per_call"] > 0
    ratios = {r["measure"]: r for r in data["ratios"]}
    for path in ("3 levels", "3 levels, team capped"):
        target = ratios[f"spend on a path, {path} / plain account, 64 callers"]
        assert target["target"] == ">= 0.7x" and target["status"] in {"met", "MISSED"}
    for path in (
        "1 level",
        "2 levels",
        "4 levels, team capped",
        "3 levels, team capped, 8 buckets at org",
    ):
        row = ratios[f"spend on a path, {path} / plain account, 64 callers"]
        assert row["status"] == "reported" and row["value"] > 0
    cycle = "reserve -> settle on a path, 3 levels, team capped / plain account, 64 callers"
    assert ratios[cycle]["value"] > 0
    summary = data["extra"]["scopes: redcredit spend on a path, 4 levels, team capped"]
    assert "us in the script (commandstats)" in summary and "over plain account" in summary
    assert data["extra"]["scopes: load average (1 min), before and after"].count(",") == 1


@pytest.mark.parametrize("profile", [bucket_profile, scope_profile], ids=["buckets", "scopes"])
def test_every_profile_variant_still_finds_the_step_it_takes_out(profile: ModuleType) -> None:
    """A variant whose step the debit script no longer has would measure the script unchanged."""
    shipped = load_scripts()["debit"].source
    found = dict(profile.variants(shipped))
    assert found["as shipped"] == shipped
    assert {name for name, _, _ in profile.VARIANTS} <= set(found)
    assert len(set(found.values())) == len(found)  # each variant a script of its own


@pytest.mark.parametrize("name", NAMES)
def test_every_registered_section_is_selectable_and_documented(name: str) -> None:
    plan = parse(["--quick", "--only", name])
    assert [s.name for s in plan.sections] == [name]
    assert f"``{name}``" in (ROOT / "bench" / "__main__.py").read_text()


def test_all_sections_run_in_registry_order_by_default() -> None:
    assert parse([]).sections == list(SECTIONS)
    assert [s.name for s in parse(["--only", "http,ceiling"]).sections] == ["ceiling", "http"]


def test_unknown_section_is_a_clear_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "ceiling,nope"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "unknown sections ['nope']; choose from " + ", ".join(NAMES) in done.stderr


def test_a_section_gets_only_the_servers_it_declares() -> None:
    memory = next(s for s in SECTIONS if s.name == "memory")
    servers = memory.servers("redis://127.0.0.1:1", 1, "postgresql://127.0.0.1:2/x")
    assert servers.redis_url == "redis://127.0.0.1:1"
    with pytest.raises(LookupError, match="'memory' does not declare that it needs PostgreSQL"):
        _ = servers.postgres_url
    with pytest.raises(LookupError, match="the Redis port"):
        _ = servers.redis_port
    with pytest.raises(LookupError, match="'memory' does not declare that it needs a Redis Cl"):
        _ = servers.cluster_urls
    cluster = next(s for s in SECTIONS if s.name == "cluster")
    nodes = ("redis://127.0.0.1:3", "redis://127.0.0.1:4")
    assert cluster.servers("redis://127.0.0.1:1", 1, None, nodes).cluster_urls == nodes
