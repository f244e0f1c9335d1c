"""Generations of an image, pure: each run that ended Ready is one, kept so a user can see what
changed between builds and go back to an earlier one without building.

The current generation is the image's status; earlier ones are saved when a new run starts
(`saved_generation`, at the edge in controller/rebuild.py) into the image's `generations`
artifact — {run: record} — because a record holds the package list and the lock, too large for
status. `listing` joins both into what `GET api/images/{name}/generations` answers, each with
what changed against the generation before it; `rolled_back` is the status that makes a saved
one current again.

A saved record also says when it stopped being current (`savedAt`), when a server last started
on it (`lastStartedAt`) and, once retention has deleted its image from storage, when and why
(`removed`): its packages and lock stay, so what it was can still be read and built again.
"""

from __future__ import annotations

import copy
import json

from . import model
from .model import CONDITION_VALIDATED, PHASE_READY, Condition

#: what of a Ready status a generation keeps (besides packages and the lock)
RECORD_FIELDS = ("image", "completionTime", "specHash", "gitCommit", "baseImageDigest", "resolvedBaseImage",
                 "imageSize", "baseImageInfo", "recipe", "recipeExtras", "lockHash", "reusedFrom")
#: how many changed packages a listing names per kind (the rest is counted)
MAX_CHANGES_NAMED = 30
#: how many records of builds whose image retention removed are kept (their packages and lock)
MAX_REMOVED_RECORDS = 20
#: the `generations` artifact stays under this many characters (a ConfigMap holds 1 MiB; one cut
#: short would not parse, and all history would be lost): the oldest records go first, removed
#: ones before stored ones
MAX_SAVED_CHARS = 600 * 1024


def saved_generation(status: dict, lock_text: str | None, now: str | None = None) -> dict | None:
    """The record of the current generation of a finished image, to keep when a new run starts;
    None when the run did not end Ready with an image (nothing to go back to)."""
    if status.get("phase") != PHASE_READY or not status.get("image"):
        return None
    record = {key: copy.deepcopy(status[key]) for key in RECORD_FIELDS if key in status}
    record["run"] = status.get("run", 1)
    record["savedAt"] = now or model.now_iso()
    if status.get("lastStartedImage") == status["image"] and status.get("lastStartedAt"):
        record["lastStartedAt"] = status["lastStartedAt"]
    record["packages"] = copy.deepcopy(status.get("packages", []))
    if lock_text:
        record["lock"] = lock_text
    return record


def parse_saved(text: str | None) -> dict[int, dict]:
    """The `generations` artifact: {run: record}; an unreadable one is empty (history is a convenience)."""
    if not text:
        return {}
    try:
        raw = json.loads(text)
    except ValueError:
        return {}
    return {int(run): record for run, record in raw.items() if isinstance(record, dict)}


def with_saved(saved: dict[int, dict], record: dict | None) -> dict[int, dict]:
    """`saved` plus `record`. Every record whose image is still stored stays: retention deletes
    the images beyond `keep_generations` (it can tell which a running server uses) and marks
    their records `removed`; of those, the MAX_REMOVED_RECORDS newest stay."""
    merged = dict(saved)
    if record is not None:
        merged[record["run"]] = record
    removed = sorted((run for run, r in merged.items() if r.get("removed")), reverse=True)
    for run in removed[MAX_REMOVED_RECORDS:]:
        del merged[run]
    by_age = sorted(merged, key=lambda run: (not merged[run].get("removed"), run))
    while len(merged) > 1 and len(dump_saved(merged)) > MAX_SAVED_CHARS:
        del merged[by_age.pop(0)]
    return {run: merged[run] for run in sorted(merged)}


def stored(saved: dict[int, dict]) -> dict[int, dict]:
    """The saved generations whose image is still stored: those a server can start on."""
    return {run: record for run, record in saved.items() if not record.get("removed")}


def with_start(saved: dict[int, dict], image: str, at: str) -> dict[int, dict] | None:
    """`saved` with a server start on `image` recorded on the stored generation of that image;
    None when no stored generation has it (a start on the current build)."""
    digest = image.rpartition("@")[2]
    runs = [run for run, r in stored(saved).items() if r.get("image", "").rpartition("@")[2] == digest]
    if not digest or not runs:
        return None
    return {run: ({**r, "lastStartedAt": at} if run in runs else r) for run, r in saved.items()}


def with_removed(saved: dict[int, dict], runs: dict[int, str], at: str) -> dict[int, dict]:
    """`saved` with the generations `runs` ({run: why}) marked removed by retention at `at`."""
    return {run: ({**r, "removed": {"at": at, "reason": runs[run]}} if run in runs else r)
            for run, r in saved.items()}


def dump_saved(saved: dict[int, dict]) -> str:
    return json.dumps({str(run): record for run, record in sorted(saved.items())})


def _versions(packages: list[dict]) -> dict[str, str]:
    return {p["name"].lower(): str(p.get("version", "")) for p in packages if p.get("name")}


def package_changes(older: list[dict] | None, newer: list[dict]) -> dict:
    """What changed from `older`'s packages to `newer`'s: added, removed, changed (at most
    MAX_CHANGES_NAMED named each, with counts); None older (the first generation) → nothing."""
    if older is None:
        return {"added": [], "removed": [], "changed": [], "counts": {"added": 0, "removed": 0, "changed": 0}}
    before, after = _versions(older), _versions(newer)
    added = sorted(f"{n} {after[n]}" for n in after.keys() - before.keys())
    removed = sorted(f"{n} {before[n]}" for n in before.keys() - after.keys())
    changed = sorted(f"{n} {before[n]} → {after[n]}" for n in after.keys() & before.keys() if before[n] != after[n])
    return {"added": added[:MAX_CHANGES_NAMED], "removed": removed[:MAX_CHANGES_NAMED],
            "changed": changed[:MAX_CHANGES_NAMED],
            "counts": {"added": len(added), "removed": len(removed), "changed": len(changed)}}


def _trigger_of_run(status: dict, run: int) -> dict | None:
    for trigger in reversed(status.get("triggers", [])):
        if trigger.get("run") == run:
            return trigger
    return None


def listing(status: dict, saved: dict[int, dict]) -> list[dict]:
    """Every generation, newest first: the current one (when Ready) and the saved ones, each
    with when it was built, what started its run and what changed against the one before."""
    entries: dict[int, dict] = {}
    for run, record in saved.items():
        entries[run] = {**record, "current": False}
    current_run = status.get("run", 1)
    if status.get("phase") == PHASE_READY and status.get("image"):
        entries[current_run] = {**{k: status[k] for k in RECORD_FIELDS if k in status},
                                "run": current_run, "packages": status.get("packages", []), "current": True}
    out = []
    runs = sorted(entries)
    for index, run in enumerate(runs):
        entry = entries[run]
        older = entries[runs[index - 1]]["packages"] if index else None
        shown = {k: entry[k] for k in ("run", "image", "completionTime", "gitCommit", "specHash", "imageSize",
                                        "rolledBackFrom", "savedAt", "lastStartedAt", "removed") if k in entry}
        shown["current"] = entry["current"]
        shown["changes"] = package_changes(older, entry.get("packages", []))
        if index:
            shown["comparedWith"] = runs[index - 1]
        trigger = _trigger_of_run(status, run)
        if trigger is not None:
            shown["trigger"] = trigger
        shown["packageCount"] = len(entry.get("packages", []))
        out.append(shown)
    return list(reversed(out))


def restoring(record: dict) -> dict:
    """What a run that builds a kept build again takes from its record (`status.restoring`):
    the commit, the base by digest and the lock's hash (the lock itself is the `lock` artifact)."""
    return {key: record[key] for key in ("run", "gitCommit", "resolvedBaseImage", "lockHash") if record.get(key)}


def rolled_back(obj: dict, record: dict, by: str, now: str | None = None) -> dict:
    """Status that makes the saved generation `record` current again, without a build: a new
    run that is Ready at once on that image, the run before it kept in `runs` (as a rebuild
    keeps it), the rollback recorded in `triggers`."""
    from .controller.statemachine import rebuilt

    now = now or model.now_iso()
    old = obj.get("status") or {}
    trigger = {"kind": "rollback", "by": by, "at": now, "toRun": record["run"]}
    if old.get("image"):
        trigger["from"] = old["image"]
    trigger["to"] = record["image"]
    status = rebuilt(obj, by, now=now, trigger=trigger)
    for key in ("rebuildOf", "rebuildRequestedBy", "rebuildRequestedAt"):
        status.pop(key, None)
    status.update({key: copy.deepcopy(record[key]) for key in RECORD_FIELDS if key in record})
    status["packages"] = copy.deepcopy(record.get("packages", []))
    status["rolledBackFrom"] = record["run"]
    status["phase"] = PHASE_READY
    status["phaseTimes"] = {PHASE_READY: now}
    status["startTime"] = now
    status["completionTime"] = now
    return model.set_condition(status, Condition(
        CONDITION_VALIDATED, "True", "RolledBack", f"run {record['run']}'s build made current again by {by}",
        lastTransitionTime=now, observedGeneration=obj["metadata"].get("generation")))
