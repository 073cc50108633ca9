"""The Lua scripts, loaded once from the ``lua/`` folder with their SHA1.

Each script is sent as ``_prelude.lua``, ``_buckets.lua`` and ``_scopes.lua`` followed by its
own file, because Redis cannot include one script from another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

__all__ = [
    "PRELUDE_NAMES",
    "SCRIPT_NAMES",
    "STANDALONE_NAMES",
    "LuaScript",
    "ScriptArgs",
    "load_scripts",
    "lua_dir",
]

SCRIPT_NAMES = (
    "adjust",
    "attach",
    "balance",
    "debit",
    "extend",
    "grant",
    "hydrate",
    "move_in",
    "move_out",
    "rebase",
    "reserve",
    "reset_limits",
    "set_cap",
    "set_plan",
    "settle",
    "void",
)
# Sent, in this order, before each of SCRIPT_NAMES.
PRELUDE_NAMES = ("_prelude", "_buckets", "_scopes")
# Scripts of the syncer and maintenance: they share none of the prelude.
STANDALONE_NAMES = (
    "ack",
    "evict",
    "join",
    "locate",
    "move_done",
    "restub",
    "sync_lease",
    "sync_members",
)


@dataclass(frozen=True, slots=True)
class LuaScript:
    name: str
    source: bytes
    sha: str


def lua_dir() -> Traversable:
    # Installed wheels carry the scripts inside the package; a source checkout
    # (and an editable install) keeps them in the top-level lua/ folder.
    packaged = resources.files("redcredit").joinpath("lua")
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "lua"


@cache
def load_scripts() -> dict[str, LuaScript]:
    folder = lua_dir()
    prelude = b"".join(folder.joinpath(f"{name}.lua").read_bytes() for name in PRELUDE_NAMES)
    scripts = {}
    for name in SCRIPT_NAMES:
        source = prelude + folder.joinpath(f"{name}.lua").read_bytes()
        scripts[name] = LuaScript(name, source, hashlib.sha1(source).hexdigest())  # noqa: S324
    for name in STANDALONE_NAMES:
        source = folder.joinpath(f"{name}.lua").read_bytes()
        scripts[name] = LuaScript(name, source, hashlib.sha1(source).hexdigest())  # noqa: S324
    return scripts


# The arguments of one script call, after its keys.
ScriptArgs = Sequence[str | int]
