"""Least privilege: redcredit runs under a Redis ACL user limited to its prefix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis

from redcredit import BackendUnavailable, RedCredit, RedCreditError, Settings

ACL_DOC = Path(__file__).resolve().parent.parent / "docs" / "security.md"


def _documented_acl(password: str) -> list[str]:
    text = ACL_DOC.read_text()
    block = re.search(r"```\nACL SETUSER (.*?)```", text, re.S)
    assert block is not None
    words = block[1].split()
    return [password if w == ">CHANGE-ME" else w for w in words]


def test_documented_acl_user_can_do_everything_and_nothing_else(
    redis_factory, settings: Settings
) -> None:
    server = redis_factory(password="admin-secret")
    admin = redis.Redis.from_url(server.url)
    rules = _documented_acl(">app-secret")
    admin.execute_command("ACL", "SETUSER", *rules)
    url = f"redis://redcredit:app-secret@127.0.0.1:{server.port}/0"
    limited = settings.model_copy(update={"redis_url": url, "key_prefix": "rc"})
    with RedCredit(settings=limited) as rc:
        rc.spend("acl-user", cost=5, idempotency_key="k")
        reservation = rc.reserve("acl-user", 10)
        rc.extend(reservation)
        rc.settle(reservation, 3)
        rc.grant("acl-user", 1)
        rc.set_plan("acl-user", "paid")
        admin.script_flush()  # NOSCRIPT recovery goes through EVAL, allowed too
        assert rc.balance("acl-user").credits == 93
        # Another prefix is out of reach, even through the scripts.
        other = settings.model_copy(update={"redis_url": url, "key_prefix": "other"})
        with RedCredit(settings=other) as intruder, pytest.raises(RedCreditError):
            intruder.spend("acl-user", cost=1)
    user = redis.Redis.from_url(url)
    with pytest.raises(redis.exceptions.NoPermissionError):
        user.get("other:v1:{1}:a:x")
    with pytest.raises(redis.exceptions.NoPermissionError):
        user.flushall()
    user.close()
    admin.close()


def test_wrong_password_is_a_clear_error_without_the_secret(
    redis_factory, settings: Settings
) -> None:
    server = redis_factory(password="right-secret")
    url = f"redis://default:wrong-secret@127.0.0.1:{server.port}/0"
    with (
        RedCredit(settings=settings.model_copy(update={"redis_url": url})) as rc,
        pytest.raises((BackendUnavailable, RedCreditError)) as failed,
    ):
        rc.spend("x", cost=1)
    assert "wrong-secret" not in str(failed.value)
    assert "right-secret" not in str(failed.value)
