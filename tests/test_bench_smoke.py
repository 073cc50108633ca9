"""`python -m bench --quick` runs end to end on a few fast sections and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    assert 0 < data["memory"]["idle_account_bytes"] < 10_000
    ratios = {r["measure"]: r for r in data["ratios"]}
    assert ratios["async spend 64 / ceiling pipelined"]["status"] in {"met", "MISSED"}
    assert ratios["async spend 64 / database-only hot"]["status"] == "n/a"
    assert (out / "results.md").is_file()
    assert (out / "throughput.png").is_file() and (out / "p99.png").is_file()
