"""A Scope and a Cap refuse bad values before any I/O, with messages naming them."""

from __future__ import annotations

from datetime import timedelta

import pytest

from redcredit import AccountIdError, Cap, InvalidInput, Scope


@pytest.mark.parametrize(
    ("path", "names"),
    [
        ((), "1 to 4 levels"),
        (("a", "b", "c", "d", "e"), "1 to 4 levels"),
        (("acme", "alice", "acme"), "each account once"),
        (("acme", ""), "account id"),
        (("acme", 7), "account id"),
        (("acme", "a\x00b"), "account id"),
    ],
)
def test_a_bad_scope_is_refused(path: tuple[object, ...], names: str) -> None:
    with pytest.raises(InvalidInput, match=names):
        Scope(*path)  # type: ignore[arg-type]


def test_a_scope_reads_root_first() -> None:
    key = Scope("acme", "research", "alice", "key-9")
    assert (key.root, key.parent, key.account, key.depth) == ("acme", "alice", "key-9", 4)
    assert key.ancestors == ("alice", "research", "acme")
    assert Scope.of("bob") == Scope("bob") and Scope.of(key) is key
    with pytest.raises(AccountIdError):
        Scope.of(b"bob")


@pytest.mark.parametrize(
    ("arguments", "names"),
    [
        ({}, "credits, chat_messages or both"),
        ({"credits": -1}, "credits"),
        ({"credits": True}, "credits"),
        ({"chat_messages": 2**60}, "chat_messages"),
        ({"credits": 1, "period": "year"}, "period"),
        ({"credits": 1, "period": timedelta(milliseconds=10)}, "at least 1 s"),
        ({"credits": 1, "period": timedelta(seconds=1, microseconds=5)}, "whole milliseconds"),
    ],
)
def test_a_bad_cap_is_refused(arguments: dict[str, object], names: str) -> None:
    with pytest.raises(InvalidInput, match=names):
        Cap(**arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "cap",
    [
        Cap(credits=1_000),
        Cap(chat_messages=20, period="day"),
        Cap(credits=0, chat_messages=5, period="week"),
        Cap(credits=7, period=timedelta(hours=6)),
    ],
)
def test_a_cap_reads_back_from_its_text(cap: Cap) -> None:
    assert Cap.from_text(cap.text()) == cap
