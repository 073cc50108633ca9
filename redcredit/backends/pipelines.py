"""Commands and scripts on many keys: one pipeline per node that owns them.

The syncer and the maintenance commands touch every partition at once; on a
Redis Cluster the partitions live on several primaries. Here their commands
are grouped by the node owning each key (:class:`~.topology.Topology`), sent
as one pipeline per node, and handed back in the order given.

A command refused before it ran (MOVED, ASK, TRYAGAIN, CLUSTERDOWN, READONLY
during a reshard or a failover) is sent again, alone with the others refused,
to where the cluster now says its key lives, within ``redis_retry_deadline``;
what was answered is not sent again. Scripts go through :mod:`.channel`, so a
script that may have run is never re-sent, and each node that forgot a script
gets it again by EVAL. Every other failure is raised as a redcredit error.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Concatenate, Final, ParamSpec

import redis
import redis.cluster
from redis.client import Pipeline
from redis.exceptions import MovedError, RedisError

from ..config import Settings
from ..core.engine import ScriptCall
from ..core.scripts import LuaScript, ScriptArgs
from ..errors import RedCreditError
from .channel import NotSent, round_trip
from .redis import translated
from .slots import (
    FIRST_PAUSE_S,
    LONGEST_PAUSE_S,
    Address,
    Next,
    SlotMap,
    next_step,
    redirect_target,
    slot_of,
)
from .topology import Topology, redirected_as_one_server

__all__ = [
    "Command",
    "RedisSource",
    "Replies",
    "as_error",
    "primaries",
    "routed",
    "run_commands",
    "run_scripts",
    "slot_map",
]

RedisSource = Topology | redis.Redis | redis.cluster.RedisCluster | str | None

P = ParamSpec("P")

# A slot moved by a reshard is followed at once; a loop of redirects is a bug.
_MAX_ROUNDS: Final = 16


@contextmanager
def routed(settings: Settings, source: RedisSource) -> Iterator[Topology]:
    """A router for ``source``: a :class:`Topology` as it is, else one made (and closed) here."""
    if isinstance(source, Topology):
        yield source
        return
    topology = Topology(settings, source)
    try:
        yield topology
    finally:
        topology.close()


def slot_map(topology: Topology) -> SlotMap:
    """The topology's map, or the redcredit error for a Redis that cannot be asked."""
    try:
        return topology.slot_map()
    except NotSent as exc:
        raise translated(exc.error) from exc.error


def primaries(topology: Topology) -> list[Address]:
    return slot_map(topology).primaries


@dataclass(frozen=True, slots=True)
class Command:
    """One command on one key; ``add`` puts it on a redis-py pipeline (whose parsing it keeps)."""

    key: str
    add: Callable[[Pipeline], object]

    @classmethod
    def of(
        cls,
        key: str,
        method: Callable[Concatenate[Pipeline, P], object],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Command:
        """``Command.of(stream, Pipeline.xlen, stream)``: the pipeline method and its arguments."""
        return cls(key, lambda pipe: method(pipe, *args, **kwargs))


# Keyless commands sent after a node's own (TIME, WAIT, WAITAOF): they answer
# for that node, on the connection that carried its commands.
Tail = Callable[[Address, Pipeline], object]


@dataclass(slots=True)
class Replies:
    """A reply per command (an error reply as its exception), and the node that gave it."""

    replies: list[Any]
    nodes: list[Address]
    # Per pipeline sent, its node and the replies of its tail.
    tails: list[tuple[Address, list[Any]]] = field(default_factory=list)

    def checked(self) -> list[Any]:
        """The replies, the first error reply raised as a redcredit error."""
        for reply in self.replies:
            if isinstance(reply, Exception):
                raise _refusal(None, reply)
        return self.replies


def run_commands(
    topology: Topology, commands: Sequence[Command], *, tail: Tail | None = None
) -> Replies:
    """Sends ``commands`` in one pipeline per owning node, and ``tail`` after each node's own.

    Redis-py pipelines: a lost connection may make redis-py send a pipeline
    twice, so only commands that may run twice belong here (reads, claims,
    stream groups); scripts go through :func:`run_scripts`.
    """
    out = Replies([None] * len(commands), [("", 0)] * len(commands))

    def send(node: Address, asking: bool, indices: list[int]) -> list[Any]:
        pipe = topology.client(node).pipeline(transaction=False)
        for index in indices:
            if asking:
                pipe.execute_command("ASKING")  # type: ignore[no-untyped-call]
            commands[index].add(pipe)
        if tail is not None:
            tail(node, pipe)
        try:
            replies = pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            # Sent, then the connection failed: the node may be gone.
            topology.refresh_later()
            raise _redis_error(exc) from exc
        # ASKING's own OK comes before each command's reply.
        width = 2 if asking else 1
        keyed = replies[width - 1 : len(indices) * width : width]
        out.tails.append((node, replies[len(indices) * width :]))
        for index in indices:
            out.nodes[index] = node
        return keyed

    out.replies = _routed(topology, [command.key for command in commands], send)
    return out


def run_scripts(
    topology: Topology, script: LuaScript, calls: Sequence[tuple[Sequence[str], ScriptArgs]]
) -> list[Any]:
    """Runs ``script`` once per ``(keys, args)``, one round trip per node; returns the replies.

    An error reply of a script is raised, as a redcredit error.
    """
    script_calls = [ScriptCall(script, keys, args) for keys, args in calls]

    def send(node: Address, asking: bool, indices: list[int]) -> list[Any]:
        try:
            return round_trip(
                topology.pool(node), [script_calls[i] for i in indices], asking=asking
            )
        except RedisError as exc:
            # Sent, then the connection failed: it may have run. Not re-sent.
            topology.refresh_later()
            raise _redis_error(exc) from exc

    replies = _routed(topology, [call.keys[0] for call in script_calls], send)
    for reply in replies:
        if isinstance(reply, Exception):
            raise _refusal(topology, reply)
    return replies


Send = Callable[[Address, bool, list[int]], list[Any]]


def _routed(topology: Topology, keys: Sequence[str], send: Send) -> list[Any]:
    """The reply for each key's command, following redirects and waiting out refusals."""
    replies: list[Any] = [None] * len(keys)
    todo = list(range(len(keys)))
    asking: dict[int, Address] = {}
    unreachable: NotSent | None = None
    deadline = time.monotonic() + topology.retry_deadline_s
    pause = FIRST_PAUSE_S
    for _ in range(_MAX_ROUNDS):
        owners = slot_map(topology)
        groups: dict[tuple[Address, bool], list[int]] = {}
        for index in todo:
            node = asking.get(index) or owners.owner(slot_of(keys[index]))
            groups.setdefault((node, index in asking), []).append(index)
        again: list[int] = []
        asking = {}
        wait = False
        for (node, ask), indices in groups.items():
            try:
                answers = send(node, ask, indices)
            except NotSent as exc:
                # Not one byte left for this node: all of its commands go again.
                unreachable = exc
                topology.refresh_later()
                again += indices
                wait = True
                continue
            for index, reply in zip(indices, answers, strict=True):
                replies[index] = reply
                step = next_step(reply)
                if step is Next.DONE:
                    continue
                again.append(index)
                if step is Next.ASK:
                    asking[index] = redirect_target(reply)
                else:  # moved for good, or refused for now: the map is read again
                    topology.refresh_later()
                    wait = wait or step is Next.LATER
        if not again:
            return replies
        todo = again
        if time.monotonic() >= deadline:
            break
        if wait:
            time.sleep(pause)
            pause = min(pause * 2, LONGEST_PAUSE_S)
    for index in todo:
        if isinstance(replies[index], Exception):
            raise _refusal(topology, replies[index])
    if unreachable is not None:
        raise translated(unreachable.error) from unreachable.error
    raise RedCreditError(f"Redis kept redirecting {len(todo)} commands; will retry")


def as_error(reply: Exception) -> RedCreditError:
    """The redcredit error for an error reply (or any failure) handed back by a pipeline."""
    return _refusal(None, reply)


def _refusal(topology: Topology | None, reply: Exception) -> RedCreditError:
    if isinstance(reply, MovedError) and topology is not None and _standalone(topology):
        return redirected_as_one_server()
    if isinstance(reply, RedisError):
        return translated(reply)
    return RedCreditError(f"Redis call failed: {reply}")


def _standalone(topology: Topology) -> bool:
    try:
        return not topology.is_cluster
    except NotSent:
        return False


def _redis_error(exc: RedisError | OSError) -> RedCreditError:
    if isinstance(exc, RedisError):
        return translated(exc)
    return translated(redis.exceptions.ConnectionError(str(exc)))
