"""The demo's chat API, used as its printed curl commands use it, through a real server."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from redcredit.servers.spawn import free_port


@pytest.mark.parametrize(
    "redis", ["redis_url", "three_primary_cluster_url"], ids=["one-node", "cluster"]
)
def test_demo_serves_the_gated_chat_api(
    redis: str, postgres_url: str, pg_schema: str, request: pytest.FixtureRequest
) -> None:
    """On one server, and on a cluster of three primaries by REDCREDIT_REDIS_URL alone."""
    redis_url = request.getfixturevalue(redis)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDCREDIT_")}
    env.update(
        REDCREDIT_REDIS_URL=redis_url,
        REDCREDIT_DATABASE_URL=postgres_url,
        REDCREDIT_PG_SCHEMA=pg_schema,
    )
    demo = subprocess.Popen(
        [sys.executable, "-m", "redcredit.cli", "demo", "--port", str(port),
         "--serve-seconds", "60"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert demo.stdout is not None
        while not lines or "Stop with Ctrl-C." not in lines[-1]:
            line = demo.stdout.readline()
            assert line, "the demo ended before serving"
            lines.append(line)
        printed = "".join(lines)
        run = re.search(r"Bearer alice-([0-9a-f]+)", printed)
        assert run is not None
        # The scenario's buckets and tree: a promotional grant expired at its
        # instant, and a user's cap refused the spend, naming the user.
        assert "promotional expired; left: base 30" in printed
        assert f"refused: CapReached mia-{run[1]}" in printed
        alice, broke, bursty = (f"{who}-{run[1]}" for who in ("alice", "broke", "bursty"))
        base = f"http://127.0.0.1:{port}"

        def auth(who: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {who}"}

        with httpx.Client(base_url=base, timeout=30) as client:
            # A turn that streams, settled at what it used.
            with client.stream("POST", "/v1/chat", headers=auth(alice),
                               json={"max_tokens": 30}) as response:  # fmt: skip
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                tokens = [line for line in response.iter_lines() if line.startswith("data: {")]
            assert len(tokens) == 30
            # The gate settles once the app has sent the last chunk: a moment after
            # the client has read it, on a busy machine.
            for _ in range(100):
                account = client.get("/v1/account", headers=auth(alice)).json()
                if account["held"] == 0:
                    break
                time.sleep(0.02)
            assert (account["credits"], account["chat_messages"], account["held"]) == (270, 19, 0)

            # 402 with a problem body.
            refused = client.post("/v1/complete", headers=auth(broke))
            assert refused.status_code == 402
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.json()["balance"]["required"] == 5

            # A burst: 5 pass, then 429 with Retry-After.
            codes = [client.post("/v1/complete", headers=auth(bursty)).status_code
                     for _ in range(8)]  # fmt: skip
            assert codes == [200] * 5 + [429] * 3
            limited = client.post("/v1/complete", headers=auth(bursty))
            assert int(limited.headers["retry-after"]) >= 1

            # A stream cut off half way is charged for what it delivered.
            with client.stream("POST", "/v1/chat", headers=auth(alice),
                               json={"max_tokens": 100}) as response:  # fmt: skip
                received = 0
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        received += 1
                    if received == 10:
                        break
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                account = client.get("/v1/account", headers=auth(alice)).json()
                if account["held"] == 0:
                    break
                time.sleep(0.1)
            charged = 270 - account["credits"]
            assert account["held"] == 0 and 10 <= charged <= 15, account

            # The ledger, persisted by the syncer.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                ledger = client.get("/v1/ledger", headers=auth(alice)).json()
                if len(ledger) == 5:
                    break
                time.sleep(0.1)
            assert [row["op"] for row in ledger] == [
                "settle",
                "reserve",
                "settle",
                "reserve",
                "open",
            ]
            assert ledger[0]["credits"] == -charged
    finally:
        demo.send_signal(signal.SIGINT)
        _out, err = demo.communicate(timeout=60)
    # Ctrl-C ends the demo the usual way (130), after closing everything cleanly.
    assert demo.returncode in (0, 130), err[-2000:]
    assert "Traceback" not in err, err[-2000:]
