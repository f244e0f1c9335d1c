"""The ImageStore protocol: where CustomNBImage objects live.

Embedded mode keeps them in SQL (store/sqlite.py); cluster mode in custom resources. Both give
the same guarantees: atomic writes, a resourceVersion that a stale write fails on
(`Conflict`), and a change feed (`watch`) that the events stream and the reconciler follow.
"""

from __future__ import annotations

import asyncio
import copy
import random
from dataclasses import dataclass
from typing import Callable, Protocol


class StoreError(Exception):
    """Base of the store's errors; `field` names the part at fault where there is one."""

    status_code = 500

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field


class NotFound(StoreError):
    status_code = 404


class AlreadyExists(StoreError):
    status_code = 409


class StoreBusy(StoreError):
    """The store could not be written (or read) in time: another process holds its lock."""

    status_code = 503


class StoreFull(StoreError):
    """The store's disk is full: the write was refused whole (a transaction), nothing changed."""

    status_code = 507


class Conflict(StoreError):
    """The object changed since it was read (stale resourceVersion)."""

    status_code = 409


@dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED | MODIFIED | DELETED, as in a Kubernetes watch
    object: dict


class ImageStore(Protocol):
    namespace: str

    async def start(self) -> None:
        """Begin the change feed (and wait until it runs); call once before `watch()`."""

    async def create(self, obj: dict) -> dict: ...

    async def get(self, name: str) -> dict: ...

    async def list(
        self, *, owner: str | None = None, include_shared: bool = False, groups=(), phase: str | None = None,
        build_type: str | None = None,
        spec_hash: str | None = None,
        limit: int | None = None,
    ) -> list[dict]:
        """Oldest first; `owner` limits to one creator (plus, with `include_shared`, images
        shared with everyone or with one of `groups`); `limit` (without `owner`) asks for at
        most that many matches, any of them: enough to know one exists."""

    async def count(self, owner: str) -> int: ...

    async def replace(self, obj: dict) -> dict:
        """Write metadata/spec; obj's resourceVersion must be current."""

    async def update_status(self, name: str, status: dict, resource_version: str | None = None) -> dict:
        """Write status; with resource_version, fail with Conflict if it is stale."""

    async def delete(self, name: str) -> None: ...

    def watch(self) -> "Subscription":
        """Start following changes now; read the current state after this call."""

    async def put_artifact(self, name: str, kind: str, text: str, *, uid: str | None = None) -> None:
        """Store an artifact (log, lock) of the image; with `uid`, of that image only (one that
        replaced it under the same name is not written to), and without reading it first."""

    async def get_artifact(self, name: str, kind: str) -> str | None: ...


async def modify_status(
    store: ImageStore, name: str, change: Callable[[dict], dict | None], attempts: int = 20,
    known: dict | None = None,
) -> dict | None:
    """Read-modify-write of an object's status that survives concurrent writers.

    `change(obj)` returns the new status (or None to leave the object alone); on a Conflict the
    object is read again and `change` runs again on the fresh copy, so no update is lost.
    Retries wait a little, with jitter, so two writers do not keep colliding in lockstep
    (client-go's RetryOnConflict does the same). `known`, a copy the caller has (from the
    change feed), is tried first, sparing a read when it is still current.
    """
    for attempt in range(attempts):
        obj = known if attempt == 0 and known is not None else await store.get(name)
        new_status = change(copy.deepcopy(obj))
        if new_status is None:
            return obj
        try:
            return await store.update_status(name, new_status, obj["metadata"]["resourceVersion"])
        except Conflict:
            await asyncio.sleep(random.uniform(0, 0.01 * min(attempt + 1, 10)))
    raise Conflict(f"image {name} kept changing; gave up after {attempts} attempts")


class ChangeBroadcaster:
    """In-process fan-out of watch events to any number of subscribers.

    Each subscriber gets its own bounded queue; a subscriber that falls more than `maxsize`
    events behind is dropped (its iterator ends) rather than letting memory grow without bound.
    """

    def __init__(self, maxsize: int = 10000):
        self._queues: set[asyncio.Queue] = set()
        self._maxsize = maxsize

    def publish(self, event) -> None:
        for queue in list(self._queues):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self._queues.discard(queue)

    def open_subscription(self) -> "Subscription":
        """A subscription that is registered now, before the caller reads the current state,
        so no change between 'read' and 'follow' is missed."""
        queue: asyncio.Queue = asyncio.Queue(self._maxsize)
        self._queues.add(queue)
        return Subscription(self, queue)


class Subscription:
    def __init__(self, broadcaster: ChangeBroadcaster, queue: asyncio.Queue):
        self._broadcaster = broadcaster
        self._queue = queue

    @property
    def overflowed(self) -> bool:
        return self._queue not in self._broadcaster._queues and self._queue.empty()

    async def get(self, timeout: float | None = None):
        return await asyncio.wait_for(self._queue.get(), timeout)

    def close(self) -> None:
        self._broadcaster._queues.discard(self._queue)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
