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
    `dry_run`, would do): removed builds, builds kept because a server uses them, deletions
    that failed (tried again next pass)."""
    now = time.time() if now is None else now
    report = {"at": model.now_iso(), "dryRun": dry_run, "policy": policy.__dict__, "removed": [], "inUse": [],
              "failed": []}
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
    plan = retention.plan(images, in_use, policy, now, phases.built_here, only_owner=only_owner)
    report["inUse"] = [{"name": name, "run": run, "image": ref} for name, run, ref in plan.in_use]
    done: dict[str, dict[int, str]] = {}
    for removal in plan.removals:
        entry = {"name": removal.name, "owner": removal.owner, "run": removal.run, "image": removal.reference,
                 "reason": removal.reason, "bytes": removal.bytes, "imageDeleted": removal.delete_image}
        if not dry_run and removal.delete_image:
            why_kept = await phases.delete_built_image(removal.reference)
            if why_kept:
                report["failed"].append({**entry, "error": why_kept})
                log.warning("retention: could not delete %s (%s run %d): %s", removal.reference, removal.name,
                            removal.run, why_kept)
                continue
        report["removed"].append(entry)
        done.setdefault(removal.name, {})[removal.run] = removal.reason
    if not dry_run:
        for name, runs in done.items():
            await _mark_removed(store, name, runs, report["at"])
            log.info("retention: %s: removed the image of run%s %s", name, "s" if len(runs) > 1 else "",
                     ", ".join(map(str, sorted(runs))))
    report["bytesFreed"] = sum(e["bytes"] for e in report["removed"] if e["imageDeleted"])
    return report


async def _mark_removed(store, name: str, runs: dict[int, str], at: str) -> None:
    # read again just before the write: a rebuild may have saved a build since the pass began
    try:
        obj = await store.get(name)
        saved = await saved_generations(store, name)
    except NotFound:
        return
    await store.put_artifact(name, "generations", generations.dump_saved(generations.with_removed(saved, runs, at)),
                             uid=obj["metadata"]["uid"])


def policy_of(runner, overrides: dict | None = None) -> retention.Policy:
    """The runner's retention traits, with an admin's one-off `overrides` (POST api/retention)."""
    overrides = overrides or {}
    return retention.Policy(
        keep=overrides.get("keepGenerations", runner.keep_generations),
        drop_unused_days=overrides.get("dropUnusedDays", runner.drop_unused_days),
        max_bytes_per_user=overrides.get("maxBytesPerUser", runner.max_bytes_per_user),
    )
