"""The syncer's drain into PostgreSQL from one Redis and from three primaries, in the same run.

Each drain journals the same number of entries over 10k accounts (a third of
them on each primary of the cluster), then times one syncer emptying the
journal: one pipeline per node on the cluster, with its replica and disk
waits where the nodes have them.
"""

from __future__ import annotations

import uuid

from ..harness import Config, Results, Servers
from .write_behind import measure_drain, syncer_settings


def run(cfg: Config, servers: Servers, res: Results) -> None:
    urls = {"standalone": servers.redis_url, "3-primary cluster": servers.cluster_urls[0]}
    rates: dict[str, float] = {}
    for kind, url in urls.items():
        settings = syncer_settings(url, servers.postgres_url, "cd" + uuid.uuid4().hex[:8])
        drained, seconds = measure_drain(settings, cfg.drain_entries, timeout_s=120)
        rates[kind] = drained / seconds
        res.extra[f"syncer drain, {kind}"] = (
            f"{drained:,} entries in {seconds:.2f} s = {rates[kind]:,.0f}/s"
        )
        print(f"  syncer drain, {kind}: {drained:,} entries in {seconds:.2f} s")
    res.extra["syncer drain, cluster / standalone"] = (
        f"{rates['3-primary cluster'] / rates['standalone']:.2f}x"
    )
