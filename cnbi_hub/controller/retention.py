"""Retention at the edges: read every image and its kept builds, ask who runs what, delete the
images the plan (cnbi_hub/retention.py) names and mark their records removed.

One pass, the same in both modes: the engine runs it every `EmbeddedRunner.retention_interval`
(the service in embedded mode, the operator in cluster mode), an admin at will (`POST
api/retention`, embedded mode). When it cannot tell which images running servers use, it
deletes nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from .. import generations, model, retention
from ..store.base import NotFound
from .rebuild import saved_generations

log = logging.getLogger(__name__)

#: what a running server uses: the digests of the images it runs (raises when it cannot tell)
InUse = Callable[[], Awaitable[set[str]]]


async def retention_pass(store, phases, policy: retention.Policy, images_in_use: InUse | None,
                         now: float | None = None, dry_run: bool = False, only_owner: str | None = None) -> dict:
    """One pass (over `only_owner`'s images only, if given); returns what it did (or, with
    `dry_run`, would do): removed builds, builds kept because a server uses them or another
    build names their image, deletions that failed (tried again next pass)."""
    now = time.time() if now is None else now
    report = {"at": model.now_iso(), "dryRun": dry_run, "policy": policy.__dict__, "removed": [], "inUse": [],
              "shared": [], "failed": []}
    if only_owner is not None:
        report["user"] = only_owner
    if images_in_use is None:
        report["skipped"] = "no way to see which images running servers use: nothing is removed"
        return report
    try:
        in_use = await images_in_use()
    except Exception as e:  # the hub or the apiserver away: never guess
        report["skipped"] = f"could not see which images running servers use ({e}): nothing is removed"
        log.warning("retention: %s", report["skipped"])
        return report
    images = []
    for obj in await store.list():
        images.append((obj, await saved_generations(store, model.name_of(obj))))
    uids = {model.name_of(obj): obj["metadata"]["uid"] for obj, _ in images}
    plan = retention.plan(images, in_use, policy, now, phases.built_here, only_owner=only_owner)
    report["inUse"] = [{"name": name, "run": run, "image": ref} for name, run, ref in plan.in_use]
    report["shared"] = [{"name": name, "run": run, "image": ref} for name, run, ref in plan.shared]
    # the records of one image together: it is deleted once, and they are marked only if it was
    by_image: dict[str, list[retention.Removal]] = {}
    for removal in plan.removals:
        by_image.setdefault(removal.reference.rpartition("@")[2] or removal.reference, []).append(removal)
    done: dict[str, dict[int, str]] = {}
    for removals in by_image.values():
        entries = [{"name": r.name, "owner": r.owner, "run": r.run, "image": r.reference, "reason": r.reason,
                    "bytes": r.bytes, "imageDeleted": r.delete_image} for r in removals]
        if not dry_run and removals[0].delete_image:
            why_kept = await _delete_if_still_unused(store, phases, images_in_use, removals)
            if why_kept:
                report["failed"] += [{**entry, "error": why_kept} for entry in entries]
                log.warning("retention: kept %s: %s", removals[0].reference, why_kept)
                continue
        for entry in entries[1:]:
            entry["imageDeleted"] = False  # the first record's deletion takes it
        report["removed"] += entries
        for removal in removals:
            done.setdefault(removal.name, {})[removal.run] = removal.reason
    if not dry_run:
        for name, runs in done.items():
            await _mark_removed(store, name, uids[name], runs, report["at"])
            log.info("retention: %s: removed the image of run%s %s", name, "s" if len(runs) > 1 else "",
                     ", ".join(map(str, sorted(runs))))
    report["bytesFreed"] = sum(e["bytes"] for e in report["removed"] if e["imageDeleted"])
    return report


async def _delete_if_still_unused(store, phases, images_in_use: InUse, removals: list) -> str | None:
    """Delete one image after looking again (the plan is a moment old; deletions take time):
    its images and their kept builds as they are now, and who runs what now. None when it is
    gone; else why it stays."""
    digest = removals[0].reference.rpartition("@")[2]
    try:
        if digest in await images_in_use():
            return "a server started on it since the pass began"
        for obj in await store.list():
            if digest in retention.current_references(obj):
                return f"it is {model.name_of(obj)}'s current build now"
            mine = {(r.name, r.run) for r in removals}
            for run, record in (await saved_generations(store, model.name_of(obj))).items():
                if ((model.name_of(obj), run) not in mine and not record.get("removed")
                        and retention.digest_of(record.get("image")) == digest):
                    return f"{model.name_of(obj)}'s kept run {run} names it now"
        return await phases.delete_built_image(removals[0].reference)
    except Exception as e:  # podman or the registry away: kept, tried again next pass
        log.exception("retention: deleting %s failed", removals[0].reference)
        return f"{type(e).__name__}: {e}"


async def _mark_removed(store, name: str, uid: str, runs: dict[int, str], at: str) -> None:
    # read again just before the write: a rebuild may have saved a build since the pass began;
    # an image deleted and made again under the same name is another image: left alone
    try:
        obj = await store.get(name)
        if obj["metadata"]["uid"] != uid:
            return
        saved = await saved_generations(store, name)
    except NotFound:
        return
    await store.put_artifact(name, "generations", generations.dump_saved(generations.with_removed(saved, runs, at)),
                             uid=uid)


def policy_of(runner, overrides: dict | None = None) -> retention.Policy:
    """The runner's retention traits, with an admin's one-off `overrides` (POST api/retention)."""
    overrides = overrides or {}
    return retention.Policy(
        keep=overrides.get("keepGenerations", runner.keep_generations),
        drop_unused_days=overrides.get("dropUnusedDays", runner.drop_unused_days),
        max_bytes_per_user=overrides.get("maxBytesPerUser", runner.max_bytes_per_user),
    )
