"""Embedded mode's engine: runs the phase work for every image inside the service process.

A queue (oldest Pending first, with positions), at most `max_concurrent_builds` images in work
at once, the build log kept and flushed to the store, cancellation (DELETE, or
api/images/{name}/cancel ending the image Failed) and resuming after a crash. The decisions
are statemachine.py's, the work is phases.py's: the cluster operator drives the same work.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from prometheus_client import Counter, Gauge, Histogram
from traitlets import Float, Instance, Integer
from traitlets.config import LoggingConfigurable

from .. import model, stacks
from ..model import PHASE_BUILDING, PHASE_PENDING, PHASE_PREPARE, PHASE_RESOLVING
from ..store.base import Conflict, NotFound, modify_status
from .buildlog import BuildLog, transition_line
from .phases import PhaseWork
from .rebuild import KEEP_GENERATIONS, rebuild_now_or_after_run, start_rebuild
from .retention import InUse, policy_of, retention_pass
from .statemachine import (
    FIELDS_WRITTEN_BY_OTHERS,
    Outcome,
    advance,
    failure_of,
    held_on_earlier_build,
    queued,
    restart,
    run_separator,
    waiting,
    schedule_due,
    trigger_satisfied,
)

BUILDS = Counter("cnbi_builds_total", "Images that reached a final phase, by outcome", ["outcome"])
PHASE_SECONDS = Histogram(
    "cnbi_phase_duration_seconds", "Time spent in each phase's work", ["phase"],
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
)
QUEUE_LENGTH = Gauge("cnbi_build_queue_length", "Images waiting in Pending for a build slot")
RUNNING = Gauge("cnbi_builds_running", "Images being prepared, resolved or built now")


class EmbeddedRunner(LoggingConfigurable):
    """Drives images from Pending to Ready or Failed, at most `max_concurrent_builds` at once."""

    max_concurrent_builds = Integer(
        2, help="How many images are prepared/resolved/built at once; the rest wait in Pending with a queue position."
    ).tag(config=True)

    max_unexpected_failures = Integer(
        5, help="""Unexpected errors in a row (the store or apiserver away, a bug) after which an
        image ends Failed instead of starting again; each try waits longer (2, 4, 8... s).""",
    ).tag(config=True)

    queue_positions_shown = Integer(
        50,
        help="""How many waiting images are told their place in the queue (`status.queuePosition`);
        those further back show as Pending until they move up. Every dequeue moves each of them
        by one, and each move is a write: this bounds the writes a long queue costs.""",
    ).tag(config=True)

    reuse_concurrency = Integer(
        50,
        help="""How many imports may look for an identical Ready image at once, outside the build
        slots: finding one costs a registry request and a lookup, so a burst of identical
        imports goes to Ready without waiting for slots that builds need.""",
    ).tag(config=True)

    keep_generations = Integer(
        KEEP_GENERATIONS,
        help="""How many earlier Ready builds of each image keep their image to go back to (`GET
        api/images/{name}/generations`, `POST .../rollback`, a spawn pinned with cnbi_build).
        Every rebuild keeps the build it replaces; retention (`retention_interval`) deletes the
        images of those beyond this many, keeping their record (packages, lock), unless a
        running server uses one. A rebuild that ends Failed, and every rebuild while it works,
        leaves the image startable on its newest good build either way. 0 keeps none.""",
    ).tag(config=True)

    retention_interval = Float(
        3600.0,
        help="""Seconds between retention passes, which delete the stored images (local storage,
        the push registry) of earlier builds that `keep_generations`, `drop_unused_days` or
        `max_bytes_per_user` say go. Never an image's current build, never one a running server
        uses (`images_in_use`: the hub's servers, or the cluster's pods), never one another image
        still names; when it cannot tell what runs, a pass deletes nothing. 0 turns it off.""",
    ).tag(config=True)

    drop_unused_days = Float(
        0.0,
        help="""An earlier build no server started on for this many days (counted from when it
        stopped being current, or its last start) loses its image at the next retention pass.
        0: kept builds are dropped only beyond `keep_generations`.""",
    ).tag(config=True)

    max_bytes_per_user = Integer(
        0,
        help="""While one user's builds take more bytes than this (current builds and the earlier
        ones still stored, each build's own size), retention deletes that user's least recently
        used earlier builds until they fit. The service refuses new builds over
        `CNBIService.max_bytes_per_user` (embedded mode copies that here). 0: no limit.""",
    ).tag(config=True)

    rebuild_check_interval = Float(
        3600.0,
        help="""Seconds between checks for Ready images to rebuild, the trigger recorded in
        `status.triggers`: the tags they were built on (`baseImage`, `fromImage`) are pinned
        again, and an image whose tag now names another digest (a base image's security fix, a
        new upstream release) is rebuilt on it (images named by digest never move); an image
        whose `spec.rebuildSchedule` (daily, weekly, monthly) came due is rebuilt, picking up
        newer package versions its requirements allow. 0 turns both off.""",
    ).tag(config=True)

    store = Instance(object, allow_none=True)
    phases = Instance(PhaseWork, allow_none=True)

    def __init__(self, *, store, phases: PhaseWork, publish: Callable[[tuple], None] = lambda event: None, **kwargs):
        super().__init__(store=store, phases=phases, **kwargs)
        self.publish = publish
        self._tasks: dict[str, asyncio.Task] = {}  # uid -> drive task
        self._logs: dict[str, BuildLog] = {}
        self._schedule_lock = asyncio.Lock()
        self._watcher: asyncio.Task | None = None
        self._position_writer: asyncio.Task | None = None
        # uid -> latest copy of each Pending image, kept from the change feed: scheduling reads
        # this instead of listing the store at every change (a long queue made that quadratic)
        self._pending: dict[str, dict] = {}
        self._rebuilding: dict[str, asyncio.Task] = {}  # uid -> starting a rebuild a push asked for
        self._reusing: dict[str, asyncio.Task] = {}  # uid -> its look for an identical Ready image
        self._needs_slot: set[str] = set()  # uids that looked and found none: they wait for a slot
        self._reuse_slots = asyncio.Semaphore(self.reuse_concurrency)
        self._positions_due = asyncio.Event()
        self._base_watcher: asyncio.Task | None = None
        self._stopping = False
        # stacks, kept from the change feed: each image's name -> the image it is built on
        # (None: a plain base), and -> (phase, image) to see a run end and to hold an image
        # until the one below it has finished
        self._stack_parents: dict[str, str | None] = {}
        self._finished: dict[str, tuple[str, str | None]] = {}
        self._following: set[asyncio.Task] = set()
        self._unexpected_failures: dict[str, int] = {}  # uid -> unexpected errors in a row
        #: what running servers use, for retention (set by the service or the operator)
        self.images_in_use: InUse | None = None
        self.last_retention: dict | None = None
        #: held by a retention pass; whoever makes a kept build current holds it too (embedded)
        self.retention_lock = asyncio.Lock()
        self._retention_task: asyncio.Task | None = None

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        changes = self.store.watch()  # before listing, so nothing created meanwhile is missed
        for obj in await self.store.list():
            self._note(obj)
            if not (obj.get("status") or {}).get("phase"):
                await self._begin_status(obj)
            elif model.phase_of(obj) in (PHASE_PREPARE, PHASE_RESOLVING, PHASE_BUILDING):
                self.log.info("image %s was in %s when the service stopped: starting it again",
                              model.name_of(obj), model.phase_of(obj))
                await self._send_back_to_pending(obj)
            if model.phase_of(obj) in model.TERMINAL_PHASES and (obj.get("status") or {}).get("rebuildAfter"):
                self._start_rebuild_after(obj)
        self._watcher = asyncio.create_task(self._watch(changes))
        for parent in sorted({p for p in self._stack_parents.values() if p}):
            if parent in self._finished:
                self._follow_base(parent)  # a run that ended while the engine was stopped
        self._position_writer = asyncio.create_task(self._write_positions())
        if self.rebuild_check_interval > 0:
            self._base_watcher = asyncio.create_task(self._watch_base_images())
        if self.retention_interval > 0:
            self._retention_task = asyncio.create_task(self._retention_loop())
        await self.schedule()

    async def stop(self) -> None:
        # work cut off by a stop resumes at the next start: it is not the user's cancel, so a
        # build running outside this process (a PipelineRun) goes on and is found again
        self._stopping = True
        for background in (self._watcher, self._position_writer, self._base_watcher, self._retention_task):
            if background:
                background.cancel()
        background = [*self._tasks.values(), *self._reusing.values(), *self._rebuilding.values(),
                      *self._following]
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)

    async def _watch(self, changes) -> None:
        with changes:
            while True:
                event = await changes.get()
                uid = event.object["metadata"].get("uid")
                phase = model.phase_of(event.object)
                name = model.name_of(event.object)
                ran_before = self._finished.get(name)
                self._note(event.object, deleted=event.type == "DELETED")
                if self._finished.get(name) not in (None, ran_before) and name in self._stack_parents.values():
                    self._follow_base(name)  # a run ended: the images built on it follow
                if event.type != "DELETED" and not (event.object.get("status") or {}).get("phase"):
                    if self.phases.reusable_without_slot(event.object):
                        await self.schedule()  # it may go to Ready in one write; if not, it begins then
                    else:
                        await self._begin_status(event.object)  # its MODIFIED event schedules it
                elif event.type == "DELETED":
                    task = self._tasks.get(uid)
                    if task:
                        self.log.info("image %s deleted during its build: stopping it", model.name_of(event.object))
                        task.cancel()
                    else:
                        self._stop_reuse(uid)
                        self.phases.release_claim(uid)  # deleted while it waited for a slot
                    await self.schedule()
                elif event.type == "MODIFIED" and phase in model.TERMINAL_PHASES:
                    task = self._tasks.get(uid)
                    if (event.object.get("status") or {}).get("rebuildAfter"):
                        self._start_rebuild_after(event.object)  # after the run's own work ends
                    reason = _cancel_message(event.object)
                    if task and phase == model.PHASE_FAILED and reason:
                        # someone cancelled the build (api/images/{name}/cancel): stop its work
                        name = model.name_of(event.object)
                        self._log_line(name, uid, f"==> {reason}")
                        self.log.info("image %s: %s", name, reason)
                        task.cancel()
                    elif not task:
                        self._stop_reuse(uid)
                        self.phases.release_claim(uid)  # cancelled while it waited for a slot
                    await self.schedule()
                elif event.type == "ADDED" or (event.type == "MODIFIED" and phase == PHASE_PENDING
                                               and uid not in self._tasks):
                    await self.schedule()

    def _note(self, obj: dict, deleted: bool = False) -> None:
        uid, name = obj["metadata"].get("uid"), model.name_of(obj)
        self.phases.note(obj, gone=deleted)
        if deleted:
            self._stack_parents.pop(name, None)
            self._finished.pop(name, None)
        else:
            self._stack_parents[name] = stacks.parent_of(obj.get("spec"))
            if model.phase_of(obj) in model.TERMINAL_PHASES:
                self._finished[name] = (model.phase_of(obj), (obj.get("status") or {}).get("image"))
            else:
                self._finished.pop(name, None)
        if not deleted and (obj.get("status") or {}).get("phase", PHASE_PENDING) == PHASE_PENDING:
            self._pending[uid] = obj
        else:
            self._pending.pop(uid, None)
            self._needs_slot.discard(uid)

    def _waiting(self) -> list[dict]:
        """Pending images not being worked on nor looking for an identical image, oldest first."""
        waiting = [o for uid, o in self._pending.items()
                   if uid not in self._tasks and uid not in self._reusing and not self._base_in_work(o)]
        return sorted(waiting, key=lambda o: (o["metadata"].get("creationTimestamp", ""), o["metadata"]["uid"]))

    def _base_in_work(self, obj: dict) -> bool:
        """Whether `obj` stands on an image whose run has not ended: it waits (without a slot)
        until that one has a build to stand on. Not when the stack leads back to `obj` itself:
        its Prepare says what is wrong."""
        name, parent = model.name_of(obj), stacks.parent_of(obj["spec"])
        if parent is None or parent not in self._stack_parents or parent in self._finished:
            return False
        seen, current = {name}, parent
        while current is not None and current not in seen and len(seen) <= stacks.MAX_DEPTH + 1:
            seen.add(current)
            current = self._stack_parents.get(current)
        return current != name

    async def schedule(self) -> None:
        """Start work on the oldest Pending images while slots are free; number the rest."""
        async with self._schedule_lock:
            waiting = []
            for obj in self._waiting():
                uid = obj["metadata"]["uid"]
                if uid not in self._needs_slot and self.phases.reusable_without_slot(obj):
                    self._reusing[uid] = asyncio.create_task(self._reuse(model.name_of(obj), uid))
                else:
                    waiting.append(obj)
            while waiting and len(self._tasks) < self.max_concurrent_builds:
                obj = waiting.pop(0)
                uid = obj["metadata"]["uid"]
                self._tasks[uid] = asyncio.create_task(self._drive(model.name_of(obj), uid))
            QUEUE_LENGTH.set(len(waiting))
            RUNNING.set(len(self._tasks))
        self._positions_due.set()

    async def _write_positions(self) -> None:
        """Keep the first `queue_positions_shown` waiting images' positions current, off the
        scheduling path; changes that come close together are written as one."""
        while True:
            await self._positions_due.wait()
            self._positions_due.clear()
            try:
                waiting = self._waiting()
                for position, obj in enumerate(waiting[:self.queue_positions_shown], start=1):
                    status = queued(obj, position)
                    if status is not None:
                        await self._write_status(model.name_of(obj), obj["metadata"]["uid"], status,
                                                 expected_phase=PHASE_PENDING)
            except Exception as e:  # positions are a courtesy: the next change writes them again
                self.log.warning("could not write queue positions: %s", e)
            await asyncio.sleep(0.5)

    # --- base images that moved --------------------------------------------------------------

    async def _watch_base_images(self) -> None:
        while True:
            await asyncio.sleep(self.rebuild_check_interval)
            for check in (self.check_base_images, self.check_schedules):
                try:
                    await check()
                except Exception:  # one failed round (the store away): the next one tries again
                    self.log.exception("%s failed", check.__name__)

    async def check_schedules(self, now: float | None = None) -> int:
        """One round: rebuild the Ready images whose `rebuildSchedule` came due since their
        last run finished; how many were rebuilt."""
        now = time.time() if now is None else now
        count = 0
        for obj in await self.store.list(phase=model.PHASE_READY):
            due = schedule_due(obj, now)
            if not due:
                continue
            trigger = {"kind": "schedule", "schedule": obj["spec"]["rebuildSchedule"], "at": model.now_iso(),
                       "by": "rebuild schedule", "from": obj["status"].get("completionTime", "")}
            try:
                await start_rebuild(self.store, obj, f"its {obj['spec']['rebuildSchedule']} schedule", trigger)
            except (Conflict, NotFound):
                continue
            count += 1
            self.log.info("image %s: its %s rebuild is due", model.name_of(obj), obj["spec"]["rebuildSchedule"])
        return count

    async def check_base_images(self) -> int:
        """One round: pin each tag that Ready images were built on (once per tag and pull
        secret) and rebuild those whose tag moved, and those built on another CustomNBImage
        that has a newer build than theirs; how many were rebuilt."""
        rebuilt_count = 0
        for base_name in sorted({p for p in self._stack_parents.values() if p}):
            if base_name in self._finished:
                rebuilt_count += await self._follow_base_now(base_name)
        groups: dict[tuple, list[dict]] = {}
        for obj in await self.store.list(phase=model.PHASE_READY):
            source = self.phases.moving_base(obj)
            if source:
                secret = (obj["spec"].get("imagePullSecret") or {}).get("name")
                groups.setdefault((source, secret), []).append(obj)
        for (source, _), images in groups.items():
            try:
                _, digest, _ = await self.phases.access.pin(source, images[0])
            except Exception as e:  # unreachable now: the next round asks again
                self.log.warning("could not check base image %s: %s", source, e)
                continue
            for obj in images:
                old = obj["status"].get("baseImageDigest")
                if not old or old == digest:
                    continue
                trigger = {"kind": "baseImage", "image": source, "from": old, "to": digest,
                           "at": model.now_iso(), "by": "base image check"}
                try:
                    await start_rebuild(self.store, obj, "a base image update", trigger)
                except (Conflict, NotFound):
                    continue  # changed meanwhile: the next round looks again
                rebuilt_count += 1
                self.log.info("image %s: %s moved from %s to %s: rebuilding", model.name_of(obj), source,
                              old[:19], digest[:19])
        return rebuilt_count

    # --- retention ---------------------------------------------------------------------------

    async def _retention_loop(self) -> None:
        while True:
            await asyncio.sleep(self.retention_interval)
            try:
                await self.check_retention()
            except Exception:  # one failed pass (the store away): the next one tries again
                self.log.exception("retention pass failed")

    async def check_retention(self, overrides: dict | None = None, dry_run: bool = False,
                              only_owner: str | None = None) -> dict:
        """One retention pass (controller/retention.py), with an admin's one-off `overrides` of
        the policy, over one user's images if `only_owner`; the report of the last real one is
        kept (`GET api/retention`)."""
        async with self.retention_lock:
            report = await retention_pass(self.store, self.phases, policy_of(self, overrides), self.images_in_use,
                                          dry_run=dry_run, only_owner=only_owner)
        if not dry_run:
            self.last_retention = report
        return report

    # --- a push that came during a run -------------------------------------------------------

    def _start_rebuild_after(self, obj: dict) -> None:
        uid = obj["metadata"]["uid"]
        if uid not in self._rebuilding:
            self._rebuilding[uid] = asyncio.create_task(self._rebuild_after(obj))

    async def _rebuild_after(self, obj: dict) -> None:
        """The run that a push arrived during has ended: build the pushed commit now, unless
        this run already built it (read again after the run's own work is done, and again
        after each write that lost to another, e.g. kopf releasing its finalizer)."""
        name, uid = model.name_of(obj), obj["metadata"]["uid"]
        try:
            running = self._tasks.get(uid)
            if running is not None:
                await asyncio.gather(running, return_exceptions=True)
            for _ in range(10):
                obj = await self.store.get(name)
                status = obj.get("status") or {}
                trigger = status.get("rebuildAfter")
                if obj["metadata"]["uid"] != uid or not trigger or model.phase_of(obj) not in model.TERMINAL_PHASES:
                    return
                try:
                    if trigger_satisfied(obj, trigger):
                        await self.store.update_status(name, {k: v for k, v in status.items() if k != "rebuildAfter"},
                                                       obj["metadata"]["resourceVersion"])
                        self.log.info("image %s already built %s: no rebuild for the push", name,
                                      trigger.get("to", "")[:12])
                    else:
                        by = (f"{trigger.get('source', 'a')} webhook" if trigger.get("kind") == "webhook"
                              else trigger.get("by") or "a trigger")
                        await start_rebuild(self.store, obj, by, trigger)
                        self.log.info("image %s: rebuilding for the %s trigger that came during its run", name,
                                      trigger.get("kind"))
                    return
                except Conflict:
                    continue
        except NotFound:
            pass
        except Exception:
            self.log.exception("could not start the rebuild of %s for a push", name)
        finally:
            self._rebuilding.pop(uid, None)

    # --- stacks: images built on another CustomNBImage ----------------------------------------

    def _follow_base(self, name: str) -> None:
        task = asyncio.create_task(self._follow_base_now(name))
        self._following.add(task)
        task.add_done_callback(self._following.discard)

    async def _follow_base_now(self, name: str) -> int:
        """`name` ended a run. With a new build, the images built on it are rebuilt on that build
        (each one's own end then rebuilds the next level: parents are Ready before children
        start), and notes that an earlier failure of it left above it go; when it failed, each
        image above it, at any depth, keeps its build and a condition saying why it was not
        rebuilt. How many rebuilds were started."""
        started = 0
        try:
            try:
                base = await self.store.get(name)
            except NotFound:
                return 0
            status = base.get("status") or {}
            if model.phase_of(base) == model.PHASE_READY and status.get("image"):
                for child in stacks.direct_children(name, self._stack_parents):
                    started += await self._rebuild_on(child, base)
                for above in stacks.below(name, self._stack_parents):
                    await self._set_base_note(above, name, None)
            elif model.phase_of(base) == model.PHASE_FAILED:
                failure = failure_of(status) or {}
                why = f"{failure.get('reason', 'Failed')}: {failure.get('message', '')}"
                for above in stacks.below(name, self._stack_parents):
                    await self._set_base_note(above, name, lambda reader: stacks.failure_words(base, reader, why))
        except asyncio.CancelledError:
            raise
        except Exception:  # the store away: the periodic check follows the stack again
            self.log.exception("could not follow the new run of %s in the images built on it", name)
        return started

    async def _rebuild_on(self, name: str, base: dict) -> int:
        """Rebuild `name` on `base`'s new build, unless it was built (or its run was started)
        on that one already, has not begun (it takes the newest when it begins), failed for
        a reason of its own (or was cancelled), or may no longer build on it."""
        base_name, base_image = model.name_of(base), base["status"]["image"]
        digest = base_image.rsplit("@", 1)[-1]
        for _ in range(10):
            try:
                obj = await self.store.get(name)
            except NotFound:
                return 0
            status = obj.get("status") or {}
            phase = model.phase_of(obj)
            if stacks.parent_of(obj["spec"]) != base_name or phase == PHASE_PENDING:
                return 0
            if status.get("recipe") == "containerfile":
                return 0  # its repository's own Containerfile names its base
            if phase in model.TERMINAL_PHASES and held_on_earlier_build(status):
                return 0  # its owner went back to an earlier build: it stays on that one
            if phase == model.PHASE_FAILED and (failure_of(status) or {}).get("reason") not in _BASE_FAILURES:
                return 0
            asked = [t for t in status.get("triggers", [])
                     if t.get("kind") == "baseImage" and t.get("image") == stacks.reference(base_name)]
            if status.get("baseImageDigest") == digest or (asked and asked[-1].get("to") == digest):
                return 0
            refused = stacks.refusal(obj, base)
            if refused:
                await self._set_base_note(name, base_name, lambda reader: refused, reason="BaseImageNotUsable")
                return 0
            trigger = {"kind": "baseImage", "image": stacks.reference(base_name), "from": status.get(
                "baseImageDigest", ""), "to": digest, "at": model.now_iso(), "by": f"a new build of {base_name}"}
            try:
                # in work, maybe on the old build: rebuilt when this run ends, unless it got this one
                done = await rebuild_now_or_after_run(self.store, obj, trigger["by"], trigger)
            except Conflict:
                continue
            if done == "rebuilding":
                self.log.info("image %s: %s has a new build: rebuilding on it", name, base_name)
                return 1
            if done == "afterCurrentRun":
                return 0
            # it finished between the read and the write: read again and rebuild it now
        return 0

    async def _set_base_note(self, name: str, base_name: str, words: Callable[[dict], str] | None,
                             reason: str = "BaseImageFailed") -> None:
        """Say on the Ready image `name` that it keeps its build because of `base_name` (with
        `words(image)`), or, with None, take back such a note about `base_name`."""
        def change(current: dict) -> dict | None:
            status = current.get("status") or {}
            if model.phase_of(current) != model.PHASE_READY:
                return None  # in a run (or failed): that run's own conditions say what happened
            noted = [c for c in status.get("conditions", []) if c.get("type") == model.CONDITION_BASE_CURRENT]
            if words is None:
                if status.get("baseNoteFrom") != base_name:
                    return None
                return {**{k: v for k, v in status.items() if k != "baseNoteFrom"},
                        "conditions": [c for c in status.get("conditions", []) if c not in noted]}
            message = f"{words(current)}; this image keeps its current build"
            if any(c.get("message") == message for c in noted):
                return None  # said already (a restart, the periodic check)
            condition = model.Condition(model.CONDITION_BASE_CURRENT, "False", reason, message,
                                        lastTransitionTime=model.now_iso())
            noted_status = model.set_condition(status, condition)
            if reason == "BaseImageFailed":  # the next good build of base_name takes it back
                noted_status["baseNoteFrom"] = base_name
            return noted_status

        try:
            await modify_status(self.store, name, change)
        except NotFound:
            pass

    # --- reuse outside the slots --------------------------------------------------------------

    def _stop_reuse(self, uid: str) -> None:
        looking = self._reusing.get(uid)
        if looking:
            looking.cancel()  # it left Pending (cancelled, deleted): its registry request goes too

    async def _reuse(self, name: str, uid: str) -> None:
        """Finish an import by reusing an identical Ready image, in one status write (Pending to
        Ready, with Prepare's conditions and times), or wait for the identical one building now;
        when there is none, it joins the queue for a build slot."""
        log = BuildLog()

        def say(line: str) -> None:
            log.append(line)
            self.publish(("log", {"metadata": {"name": name, "uid": uid}, "line": line}))

        try:
            while True:
                obj = self._pending.get(uid)
                if obj is None:
                    return  # it left Pending meanwhile (deleted, cancelled, begun elsewhere)
                async with self._reuse_slots:
                    found = await self.phases.reuse_at_once(obj, say)
                if isinstance(found, asyncio.Future):
                    await asyncio.shield(found)  # the identical build ended: look again
                    continue
                break
            if found is None:
                self._needs_slot.add(uid)
                if not (obj.get("status") or {}).get("phase"):
                    await self._begin_status(obj)
                return
            started = advance(obj, Outcome(True, "Started", "an identical image is Ready"))
            status = advance({**obj, "status": started}, found)
            say(transition_line(PHASE_PENDING, model.PHASE_READY, found.reason, found.message))
            # its lines went to whoever follows it; none is stored when its run did nothing else:
            # its status says what they said (`reuse_log`), so a burst of reused imports costs one
            # write each. A run that worked before it came back to Pending has a log: they join it.
            if set((obj.get("status") or {}).get("phaseTimes") or {}) - {PHASE_PENDING}:
                try:  # the log first, as a finished build's: whoever sees it Ready can read it
                    earlier = await self.store.get_artifact(name, "log") or ""
                    await self.store.put_artifact(name, "log", BuildLog(initial_text=earlier + log.text()).text(),
                                                  uid=uid)
                except NotFound:
                    return
            if await self._write_status(name, uid, status, expected_phase=PHASE_PENDING, known=obj):
                BUILDS.labels("reused").inc()
                # it left Pending now, as a driven image does when its work ends: until the feed
                # brings this write, a scheduling pass would otherwise reuse it a second time
                self._pending.pop(uid, None)
        except asyncio.CancelledError:
            raise
        except Exception:  # it goes the long way, through a slot, which reports what is wrong
            self.log.exception("looking for an image identical to %s failed", name)
            self._needs_slot.add(uid)
        finally:
            self._reusing.pop(uid, None)
            if not self._stopping:
                asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.schedule()))

    # --- driving one image ------------------------------------------------------------------

    async def _drive(self, name: str, uid: str) -> None:
        self._logs.setdefault(uid, BuildLog())
        flusher = asyncio.create_task(self._flush_log_periodically(name, uid))
        cancelled = False
        broke: Exception | None = None
        back_to_pending = None
        try:
            back_to_pending = await self._drive_phases(name, uid)
            self._unexpected_failures.pop(uid, None)
        except asyncio.CancelledError:
            cancelled = True  # DELETE or cancel of the image, or the service stopping
            raise
        except Exception as e:
            broke = e  # the store away (the apiserver restarting), or a bug: it starts again below
            self.log.exception("reconciling image %s failed unexpectedly", name)
        finally:
            flusher.cancel()
            self._tasks.pop(uid, None)
            self._pending.pop(uid, None)  # it left Pending; the feed re-adds it if it goes back
            if back_to_pending is not None:
                self._note(back_to_pending)  # it waits: in case the feed brought that before this
            try:
                await self._save_log(name, uid)
                self._logs.pop(uid, None)
            except Exception:  # kept for the next try, which appends to it and saves it then
                self.log.warning("could not save the log of %s now", name)
            try:
                await self.phases.cleanup(uid, cancelled and not self._stopping)
            except Exception:
                self.log.exception("could not clean up after %s", name)
            if broke is not None and not self._stopping:
                self._start_again_later(name, uid, broke)
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.schedule()))

    async def _send_back_to_pending(self, obj: dict, expected_phase: str | None = None) -> bool:
        """An image whose work was cut off (the engine stopped, or its work broke off) goes back
        to Pending, keeping what it observed, and waits for a slot; whether it was written."""
        restarted = restart(obj)
        if not await self._write_status(model.name_of(obj), obj["metadata"]["uid"], restarted,
                                        expected_phase=expected_phase):
            return False
        self._note({**obj, "status": restarted})
        return True

    def _start_again_later(self, name: str, uid: str, error: Exception) -> None:
        task = asyncio.create_task(self._start_again(name, uid, error))
        self._following.add(task)
        task.add_done_callback(self._following.discard)

    async def _start_again(self, name: str, uid: str, error: Exception) -> None:
        """An image whose work broke off with an unexpected error (not a failed phase: those
        are outcomes) goes back to Pending to run again, as after a restart of the engine,
        once the store answers; after `max_unexpected_failures` in a row it ends Failed."""
        failures = self._unexpected_failures[uid] = self._unexpected_failures.get(uid, 0) + 1
        delay = min(2.0 ** failures, 60.0)
        while not self._stopping:
            await asyncio.sleep(delay)
            try:
                obj = await self.store.get(name)
                if obj["metadata"]["uid"] != uid or model.phase_of(obj) in model.TERMINAL_PHASES:
                    return
                if failures >= self.max_unexpected_failures:
                    message = (f"the engine failed {failures} times in a row on this image "
                               f"({type(error).__name__}: {error}); an administrator can see more in its log")
                    status = advance(obj, Outcome(False, "EngineError", message))
                    await self._write_status(name, uid, status, expected_phase=model.phase_of(obj))
                    self._unexpected_failures.pop(uid, None)
                    return
                self.log.info("image %s starts again after an unexpected error (%d in a row)", name, failures)
                if await self._send_back_to_pending(obj, expected_phase=model.phase_of(obj)):
                    await self.schedule()
                return
            except NotFound:
                return
            except Exception as e:  # still away: wait longer
                self.log.warning("image %s waits for the store to start again: %s", name, e)
                delay = min(delay * 2, 60.0)

    async def _drive_phases(self, name: str, uid: str) -> dict | None:
        """Run the image's phases until it finishes; the object as written when a phase sent it
        back to Pending to wait."""
        try:
            separator = run_separator((await self.store.get(name)).get("status") or {})
        except NotFound:
            return
        if separator:
            self._log_line(name, uid, separator)
        say = lambda line: self._log_line(name, uid, line)  # noqa: E731
        while True:
            try:
                obj = await self.store.get(name)
            except NotFound:
                return
            if obj["metadata"]["uid"] != uid or model.phase_of(obj) in model.TERMINAL_PHASES:
                return
            phase = model.phase_of(obj)
            started = time.monotonic()
            outcome = await self.phases.work(obj, say)
            PHASE_SECONDS.labels(phase).observe(time.monotonic() - started)
            if outcome.wait:
                say(transition_line(phase, PHASE_PENDING, outcome.reason, outcome.message))
                status = waiting(obj, outcome)
                if await self._write_status(name, uid, status, expected_phase=phase):
                    return {**obj, "status": status}  # back in the queue, which holds it meanwhile
                return None
            status = advance(obj, outcome)
            say(transition_line(phase, status["phase"], outcome.reason, outcome.message))
            if status["phase"] in model.TERMINAL_PHASES:
                BUILDS.labels("reused" if status.get("reusedFrom") else status["phase"].lower()).inc()
                await self._save_log(name, uid)
            if not await self._write_status(name, uid, status, expected_phase=phase):
                return

    async def _begin_status(self, obj: dict) -> None:
        """An object created without a status (kubectl, GitOps: the status subresource drops
        whatever status a create carries) starts Pending, as one the service created does."""
        uid = obj["metadata"]["uid"]

        def change(current: dict) -> dict | None:
            if current["metadata"]["uid"] != uid or (current.get("status") or {}).get("phase"):
                return None  # replaced, or begun already (an older event of the same object)
            return model.initial_status()

        self.log.info("image %s has no status yet: it starts Pending", model.name_of(obj))
        try:
            await modify_status(self.store, model.name_of(obj), change)
        except NotFound:
            pass

    async def _write_status(self, name: str, uid: str, status: dict, expected_phase: str | None = None,
                            known: dict | None = None) -> bool:
        """Write `status` unless the object is gone, was replaced, or (with `expected_phase`)
        left that phase meanwhile: a build that was cancelled stays cancelled."""
        written: list[bool] = []

        def change(current: dict) -> dict | None:
            written.clear()  # an attempt that lost to another writer wrote nothing
            if current["metadata"]["uid"] != uid:
                return None
            if expected_phase is not None and model.phase_of(current) != expected_phase:
                return None
            written.append(True)
            theirs = current.get("status") or {}
            return {**status, **{k: theirs[k] for k in FIELDS_WRITTEN_BY_OTHERS if k in theirs}}

        try:
            stored = await modify_status(self.store, name, change, known=known)
        except NotFound:
            return False
        if written and stored is not None:
            self.phases.note(stored)  # the Ready index learns now, not when the feed brings it
        return bool(written)

    def _log_line(self, name: str, uid: str, line: str) -> None:
        log = self._logs.get(uid)
        if log is not None:
            log.append(line)
        self.publish(("log", {"metadata": {"name": name, "uid": uid}, "line": line}))

    async def _save_log(self, name: str, uid: str) -> None:
        log = self._logs.get(uid)
        if log is None:
            return
        try:
            await self.store.put_artifact(name, "log", log.text())
        except NotFound:
            pass

    async def _flush_log_periodically(self, name: str, uid: str) -> None:
        while True:
            await asyncio.sleep(2)
            try:
                await self._save_log(name, uid)
            except Exception as e:  # the store away for a moment: the next flush writes it all
                self.log.warning("could not save the log of %s now: %s", name, e)


# a failed run that a new build of the image below may mend (not one that failed on its own)
_BASE_FAILURES = ("BaseImageFailed", "BaseImageNotFound", "BaseImageNotReady")


def _cancel_message(obj: dict) -> str | None:
    for condition in (obj.get("status") or {}).get("conditions", []):
        if condition.get("reason") == "Cancelled":
            return condition.get("message") or "cancelled"
    return None
