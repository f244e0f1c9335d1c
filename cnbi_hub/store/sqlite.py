"""The embedded ImageStore: CustomNBImage objects as rows in SQL (SQLite by default).

Each object is stored whole as JSON, with the columns the API filters on beside it. Every write
is one transaction; status writes carry the resourceVersion they were based on and fail with
`Conflict` when someone else wrote in between (a conditional UPDATE), which holds across
processes sharing the database too. Postgres works through the same `db_url`.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import logging
import uuid

from sqlalchemy import (
    Boolean,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    select,
    union,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .. import model
from .base import (AlreadyExists, ChangeBroadcaster, Conflict, NotFound, StoreBusy, StoreFull, Subscription,
                   WatchEvent)

# SQLite waits this long for another writer's lock inside one call, blocking the event loop:
# keep it short and wait longer between tries instead (`SQLImageStore.lock_timeout`)
BUSY_TIMEOUT_MS = 50


_log = logging.getLogger(__name__)


class Base(DeclarativeBase):
    pass


class ImageRow(Base):
    __tablename__ = "cnbi_images"
    __table_args__ = (UniqueConstraint("namespace", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    namespace: Mapped[str] = mapped_column(String(63))
    name: Mapped[str] = mapped_column(String(63))
    uid: Mapped[str] = mapped_column(String(36), unique=True)
    resource_version: Mapped[int] = mapped_column(Integer)
    owner: Mapped[str] = mapped_column(String(255), index=True)
    shared: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    phase: Mapped[str] = mapped_column(String(16), index=True)
    build_type: Mapped[str] = mapped_column(String(16))
    body: Mapped[str] = mapped_column(Text)


class SharedGroupRow(Base):
    """One JupyterHub group an image is shared with (the annotation, indexed for listing)."""

    __tablename__ = "cnbi_image_groups"

    image_id: Mapped[int] = mapped_column(Integer, ForeignKey("cnbi_images.id", ondelete="CASCADE"), primary_key=True)
    group: Mapped[str] = mapped_column(String(255), primary_key=True, index=True)


class ArtifactRow(Base):
    """Large per-image texts (build log, lock file) kept out of the object itself."""

    __tablename__ = "cnbi_artifacts"

    uid: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    text: Mapped[str] = mapped_column(Text)


class CredentialRow(Base):
    """A user's git credential: host and name in the clear, user name and token sealed
    (credentials.CredentialVault); the store never sees the token itself."""

    __tablename__ = "cnbi_git_credentials"

    namespace: Mapped[str] = mapped_column(String(63), primary_key=True)
    owner: Mapped[str] = mapped_column(String(255), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    body: Mapped[str] = mapped_column(Text)


def _sqlite_pragmas(dbapi_connection, _record):
    cursor = dbapi_connection.cursor()
    # WAL lets readers (the API) go on while the reconciler writes; the busy timeout makes a
    # second process wait a moment for the write lock instead of failing at once.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.close()


def _locked(error: OperationalError) -> bool:
    text = str(error.orig if error.orig is not None else error).lower()
    return "database is locked" in text or "database is busy" in text or "database table is locked" in text


def _full(error: OperationalError) -> bool:
    return "database or disk is full" in str(error.orig if error.orig is not None else error).lower()


def _waits_out_locks(method):
    """Retry a store call while another process holds the database's lock, sleeping between
    tries (the event loop goes on: the health check, the event streams, other images), up to
    `lock_timeout`; then StoreBusy (503). Each call is one transaction: a retry repeats it whole."""

    @functools.wraps(method)
    async def waiting(self, *args, **kwargs):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lock_timeout
        delay = 0.02
        while True:
            try:
                return await method(self, *args, **kwargs)
            except OperationalError as e:
                if _full(e):
                    # where, for the admin's log; the answer says what happened, not the server's paths
                    _log.error("the disk of the image database %s is full", self.engine.url.database or "(in memory)")
                    raise StoreFull("the disk of the service's image database is full; nothing was changed: "
                                    "ask an admin to free space") from e
                if not _locked(e):
                    raise
                if loop.time() >= deadline:
                    raise StoreBusy(f"the image database has been locked by another process for more than "
                                    f"{self.lock_timeout:g} s; nothing was changed: try again") from e
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    return waiting


class SQLImageStore:
    """ImageStore on SQLAlchemy. Calls are synchronous underneath: SQLite answers in well under
    a millisecond for this workload, as JupyterHub's own database does in its event loop. A
    lock held by another process is waited out between tries, never inside the event loop."""

    def __init__(self, db_url: str, namespace: str = "default", echo: bool = False, lock_timeout: float = 30.0):
        self.namespace = namespace
        self.lock_timeout = lock_timeout
        self.engine = create_engine(db_url, echo=echo)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)
        self._changes = ChangeBroadcaster()

    async def start(self) -> None:
        """Nothing to start: the change feed is this process's own writes."""

    def close(self) -> None:
        self.engine.dispose()

    # --- reading ---------------------------------------------------------------------------

    @staticmethod
    def _object(row: ImageRow) -> dict:
        obj = json.loads(row.body)
        obj["metadata"]["resourceVersion"] = str(row.resource_version)
        return obj

    def _row(self, session: Session, name: str) -> ImageRow:
        row = session.scalar(
            select(ImageRow).where(ImageRow.namespace == self.namespace, ImageRow.name == name)
        )
        if row is None:
            raise NotFound(f"image {name} not found", "metadata.name")
        return row

    @_waits_out_locks
    async def get(self, name: str) -> dict:
        with Session(self.engine) as session:
            return self._object(self._row(session, name))

    @_waits_out_locks
    async def list(
        self,
        *,
        owner: str | None = None,
        include_shared: bool = False,
        groups=(),
        phase: str | None = None,
        build_type: str | None = None,
        spec_hash: str | None = None,
        limit: int | None = None,
    ) -> list[dict]:
        """Objects, oldest first. `owner` limits to one creator (plus, with `include_shared`,
        images shared with everyone or with one of `groups`); no owner means every object."""
        here = ImageRow.namespace == self.namespace
        query = select(ImageRow).where(here)
        if owner is not None:
            # the rows by id from a union of indexed lookups: an OR across columns, or the
            # namespace on the outer query, reads every row (benchmarks/load.py, 100,000 images)
            visible = [select(ImageRow.id).where(here, ImageRow.owner == owner)]
            if include_shared:
                visible.append(select(ImageRow.id).where(here, ImageRow.shared == True))  # noqa: E712 (SQL)
                if groups:
                    visible.append(select(SharedGroupRow.image_id)
                                   .join(ImageRow, ImageRow.id == SharedGroupRow.image_id)
                                   .where(here, SharedGroupRow.group.in_(list(groups))))
            query = select(ImageRow).where(ImageRow.id.in_(union(*visible) if len(visible) > 1 else visible[0]))
        if phase:
            query = query.where(ImageRow.phase == phase)
        if build_type:
            query = query.where(ImageRow.build_type == build_type)
        with Session(self.engine) as session:
            found = [self._object(row) for row in session.scalars(query.order_by(ImageRow.id))]
        if spec_hash:  # few objects share a phase and owner here: no column for it
            found = [o for o in found if (o.get("status") or {}).get("specHash") == spec_hash]
        return found[:limit] if limit else found

    @_waits_out_locks
    async def count(self, owner: str) -> int:
        with Session(self.engine) as session:
            return session.scalar(
                select(func.count(ImageRow.id)).where(ImageRow.namespace == self.namespace, ImageRow.owner == owner)
            )

    # --- writing ---------------------------------------------------------------------------

    def _columns(self, obj: dict) -> dict:
        body = copy.deepcopy(obj)
        body["metadata"].pop("resourceVersion", None)
        return {
            "owner": model.creator_of(obj),
            "shared": model.is_shared(obj),
            "phase": model.phase_of(obj),
            "build_type": obj["spec"]["buildType"],
            "body": json.dumps(body, separators=(",", ":")),
        }

    @_waits_out_locks
    async def create(self, obj: dict) -> dict:
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        meta["namespace"] = self.namespace
        meta["uid"] = str(uuid.uuid4())
        meta["generation"] = 1
        meta["creationTimestamp"] = model.now_iso()
        obj.setdefault("status", model.initial_status())
        row = ImageRow(
            namespace=self.namespace, name=meta["name"], uid=meta["uid"], resource_version=1, **self._columns(obj)
        )
        with Session(self.engine) as session:
            session.add(row)
            try:
                session.flush()
                self._set_groups(session, row.id, obj)
                # read before the commit: after it, a reload could meet a lock, and the retry of
                # a create that did land would answer "already exists"
                created = self._object(row)
                session.commit()
            except IntegrityError:
                raise AlreadyExists(f"an image named {meta['name']} already exists", "metadata.name")
        self._changes.publish(WatchEvent("ADDED", created))
        return created

    def _conditional_write(self, name: str, expected_version: int | None, mutate) -> dict:
        """Apply `mutate(current) -> new` as one conditional UPDATE.

        With `expected_version`, a write based on a stale read fails with Conflict; without it,
        the read-mutate-write is simply retried until it lands on the version it read.
        """
        for _ in range(20):
            with Session(self.engine) as session:
                row = self._row(session, name)
                if expected_version is not None and row.resource_version != expected_version:
                    raise Conflict(
                        f"image {name} was changed by someone else; read it again and retry",
                        "metadata.resourceVersion",
                    )
                based_on = row.resource_version
                new = mutate(self._object(row))
                result = session.execute(
                    update(ImageRow)
                    .where(ImageRow.id == row.id, ImageRow.resource_version == based_on)
                    .values(resource_version=based_on + 1, **self._columns(new))
                )
                if result.rowcount == 1:
                    self._set_groups(session, row.id, new)
                    session.commit()
                    new["metadata"]["resourceVersion"] = str(based_on + 1)
                    return new
                session.rollback()
            if expected_version is not None:
                raise Conflict(
                    f"image {name} was changed by someone else; read it again and retry", "metadata.resourceVersion"
                )
        raise Conflict(f"image {name} kept changing; gave up writing it", "metadata.resourceVersion")

    @staticmethod
    def _set_groups(session: Session, image_id: int, obj: dict) -> None:
        session.execute(delete(SharedGroupRow).where(SharedGroupRow.image_id == image_id))
        for group in model.shared_groups_of(obj):
            session.add(SharedGroupRow(image_id=image_id, group=group))

    @_waits_out_locks
    async def replace(self, obj: dict) -> dict:
        """Write metadata and spec (never status, as with a status subresource)."""
        name = obj["metadata"]["name"]
        version = obj["metadata"].get("resourceVersion")

        def mutate(current: dict) -> dict:
            new = copy.deepcopy(obj)
            for key in ("uid", "creationTimestamp", "namespace", "generation"):
                new["metadata"][key] = current["metadata"][key]
            new["status"] = current.get("status", {})
            if new["spec"] != current["spec"]:
                new["metadata"]["generation"] = current["metadata"]["generation"] + 1
            return new

        written = self._conditional_write(name, int(version) if version else None, mutate)
        self._changes.publish(WatchEvent("MODIFIED", written))
        return written

    @_waits_out_locks
    async def update_status(self, name: str, status: dict, resource_version: str | None = None) -> dict:
        def mutate(current: dict) -> dict:
            current["status"] = copy.deepcopy(status)
            return current

        written = self._conditional_write(name, int(resource_version) if resource_version else None, mutate)
        self._changes.publish(WatchEvent("MODIFIED", written))
        return written

    @_waits_out_locks
    async def delete(self, name: str) -> None:
        with Session(self.engine) as session:
            row = self._row(session, name)
            gone = self._object(row)
            session.execute(delete(ArtifactRow).where(ArtifactRow.uid == row.uid))
            session.execute(delete(SharedGroupRow).where(SharedGroupRow.image_id == row.id))
            session.delete(row)
            session.commit()
        self._changes.publish(WatchEvent("DELETED", gone))

    def watch(self) -> Subscription:
        return self._changes.open_subscription()

    # --- artifacts -------------------------------------------------------------------------

    @_waits_out_locks
    async def put_artifact(self, name: str, kind: str, text: str, *, uid: str | None = None) -> None:
        with Session(self.engine) as session:
            stored_uid = self._row(session, name).uid
            if uid is not None and uid != stored_uid:
                raise NotFound(f"image {name} was replaced")
            uid = stored_uid
            session.merge(ArtifactRow(uid=uid, kind=kind, text=text))
            session.commit()

    @_waits_out_locks
    async def get_artifact(self, name: str, kind: str) -> str | None:
        with Session(self.engine) as session:
            uid = self._row(session, name).uid
            row = session.get(ArtifactRow, (uid, kind))
            return row.text if row else None

    # --- git credentials (sealed; see cnbi_hub.credentials) ---------------------------------

    @_waits_out_locks
    async def put_credential(self, record: dict) -> None:
        with Session(self.engine) as session:
            session.merge(CredentialRow(namespace=self.namespace, owner=record["owner"], name=record["name"],
                                        body=json.dumps(record)))
            session.commit()

    @_waits_out_locks
    async def get_credential(self, owner: str, name: str) -> dict | None:
        with Session(self.engine) as session:
            row = session.get(CredentialRow, (self.namespace, owner, name))
            return json.loads(row.body) if row else None

    @_waits_out_locks
    async def list_credentials(self, owner: str) -> list[dict]:
        with Session(self.engine) as session:
            rows = session.scalars(select(CredentialRow).where(
                CredentialRow.namespace == self.namespace, CredentialRow.owner == owner).order_by(CredentialRow.name))
            return [json.loads(row.body) for row in rows]

    @_waits_out_locks
    async def delete_credential(self, owner: str, name: str) -> bool:
        with Session(self.engine) as session:
            gone = session.execute(delete(CredentialRow).where(
                CredentialRow.namespace == self.namespace, CredentialRow.owner == owner, CredentialRow.name == name))
            session.commit()
            return gone.rowcount > 0
