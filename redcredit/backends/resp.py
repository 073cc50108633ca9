"""RESP encoding of EVALSHA and EVAL, for the async client's pipelines.

redis-py's general-purpose command packer was the largest cost on the async
hot path (a third of the Python time at 64 callers); a script call has a fixed
shape, so it is encoded here in one pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

__all__ = ["encode_command", "encode_eval", "encode_evalsha"]


# Most arguments repeat from call to call (the plan rules, the bypass list,
# the prefix-laden keys of busy accounts): their encoding is remembered.
@lru_cache(maxsize=8192)
def _bulk(value: str | int | bytes) -> bytes:
    if isinstance(value, str):
        data = value.encode()
    elif isinstance(value, int):
        data = b"%d" % value
    else:
        data = value
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _command(head: Sequence[bytes], keys: Sequence[str], args: Sequence[str | int]) -> bytes:
    count = len(head) + 1 + len(keys) + len(args)
    parts = [b"*%d\r\n" % count]
    parts += [_bulk(part) for part in head]
    parts.append(_bulk(len(keys)))
    parts += [_bulk(key) for key in keys]
    parts += [_bulk(arg) for arg in args]
    return b"".join(parts)


def encode_evalsha(sha: str, keys: Sequence[str], args: Sequence[str | int]) -> bytes:
    return _command((b"EVALSHA", sha.encode()), keys, args)


def encode_eval(source: bytes, keys: Sequence[str], args: Sequence[str | int]) -> bytes:
    return _command((b"EVAL", source), keys, args)


def encode_command(*parts: str | int) -> bytes:
    """Any other command of a script's round trip: ASKING before it, WAIT or WAITAOF after."""
    return b"*%d\r\n" % len(parts) + b"".join(_bulk(part) for part in parts)
