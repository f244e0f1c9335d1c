"""The CustomNBImage state machine, pure: (object, outcome of a phase's work) -> new status.

    Pending -> Prepare -> Resolving -> Building -> Ready      (ImageImport skips Resolving)
    any of them -> Failed

The engine (reconciler.py) does the work of a phase and calls `advance` with what it observed;
this module only decides what that means for status: phase, conditions, timings.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from .. import model
from ..model import (
    CONDITION_BUILDING,
    CONDITION_ERROR_BUILDING,
    CONDITION_ERROR_RESOLVING,
    CONDITION_IMAGE_IMPORT_READY,
    CONDITION_PREPARED,
    CONDITION_RESOLVED,
    CONDITION_VALIDATED,
    PHASE_BUILDING,
    PHASE_FAILED,
    PHASE_PENDING,
    PHASE_PREPARE,
    PHASE_READY,
    PHASE_RESOLVING,
    Condition,
)

_BUILD_PATH = {
    PHASE_PENDING: PHASE_PREPARE,
    PHASE_PREPARE: PHASE_RESOLVING,
    PHASE_RESOLVING: PHASE_BUILDING,
    PHASE_BUILDING: PHASE_READY,
}
NEXT_PHASE = {
    "PackageList": _BUILD_PATH,
    "GitRepository": _BUILD_PATH,
    # an import has nothing to resolve: Building pulls, validates and records it
    "ImageImport": {PHASE_PENDING: PHASE_PREPARE, PHASE_PREPARE: PHASE_BUILDING, PHASE_BUILDING: PHASE_READY},
}


@dataclass
class Outcome:
    """What the work of one phase found out."""

    ok: bool
    reason: str  # CamelCase, for the condition
    message: str = ""
    observed: dict = field(default_factory=dict)  # fields to record in status
    skip_to: str | None = None  # e.g. Ready when an identical image is reused
    condition_type: str | None = None  # override the phase's default failure condition
    # not a failure: the image goes back to Pending and waits there, without a build slot (the
    # image it is built on is still in work: the engine starts it once that one has finished)
    wait: bool = False


def next_phase(build_type: str, phase: str) -> str:
    return NEXT_PHASE[build_type][phase]


def _failure_condition(build_type: str, phase: str, outcome: Outcome, generation) -> list[Condition]:
    if outcome.condition_type:
        kind = outcome.condition_type
        failed = kind.startswith("Error")
        return [Condition(kind, "True" if failed else "False", outcome.reason, outcome.message,
                          observedGeneration=generation)]
    if phase in (PHASE_PENDING, PHASE_PREPARE):
        kind = CONDITION_IMAGE_IMPORT_READY if build_type == "ImageImport" else CONDITION_PREPARED
        return [Condition(kind, "False", outcome.reason, outcome.message, observedGeneration=generation)]
    if phase == PHASE_RESOLVING:
        return [Condition(CONDITION_ERROR_RESOLVING, "True", outcome.reason, outcome.message,
                          observedGeneration=generation)]
    conditions = [
        Condition(CONDITION_BUILDING, "False", outcome.reason, outcome.message, observedGeneration=generation),
        Condition(CONDITION_ERROR_BUILDING, "True", outcome.reason, outcome.message, observedGeneration=generation),
    ]
    if build_type == "ImageImport":
        conditions.append(Condition(CONDITION_IMAGE_IMPORT_READY, "False", outcome.reason, outcome.message,
                                    observedGeneration=generation))
    return conditions


def _success_conditions(build_type: str, phase: str, target: str, outcome: Outcome, generation) -> list[Condition]:
    done = []
    if phase == PHASE_PREPARE:
        done.append(Condition(CONDITION_PREPARED, "True", outcome.reason, outcome.message, observedGeneration=generation))
    elif phase == PHASE_RESOLVING:
        done.append(Condition(CONDITION_RESOLVED, "True", outcome.reason, outcome.message, observedGeneration=generation))
    if target == PHASE_BUILDING:
        done.append(Condition(CONDITION_BUILDING, "True", "Building",
                              "validating the imported image" if build_type == "ImageImport" else "building the image",
                              observedGeneration=generation))
    if target == PHASE_READY:
        if phase == PHASE_BUILDING:
            done.append(Condition(CONDITION_BUILDING, "False", "BuildSucceeded", "", observedGeneration=generation))
        done.append(Condition(CONDITION_VALIDATED, "True", outcome.reason, outcome.message, observedGeneration=generation))
        if build_type == "ImageImport":
            done.append(Condition(CONDITION_IMAGE_IMPORT_READY, "True", "ImageImported", outcome.message,
                                  observedGeneration=generation))
    return done


def advance(obj: dict, outcome: Outcome, now: str | None = None) -> dict:
    """The status after the current phase's work ended with `outcome`."""
    now = now or model.now_iso()
    status = copy.deepcopy(obj.get("status") or model.initial_status())
    build_type = obj["spec"]["buildType"]
    phase = status.get("phase", PHASE_PENDING)
    generation = obj["metadata"].get("generation")
    status.update(outcome.observed)

    if outcome.ok:
        target = outcome.skip_to or next_phase(build_type, phase)
        conditions = _success_conditions(build_type, phase, target, outcome, generation)
    else:
        target = PHASE_FAILED
        conditions = _failure_condition(build_type, phase, outcome, generation)
    for condition in conditions:
        condition.lastTransitionTime = now
        status = model.set_condition(status, condition)

    status["phase"] = target
    status.setdefault("phaseTimes", {})[target] = now
    status.pop("queuePosition", None)
    if phase == PHASE_PENDING:
        status["startTime"] = now
    if target in model.TERMINAL_PHASES:
        status["completionTime"] = now
        if not outcome.ok:
            status["failedPhase"] = phase
    return status


def waiting(obj: dict, outcome: Outcome, now: str | None = None) -> dict:
    """Status of an image sent back to Pending by a phase that found it must wait (`outcome.wait`),
    the reason in its Prepared condition."""
    now = now or model.now_iso()
    status = copy.deepcopy(obj.get("status") or model.initial_status())
    status["phase"] = PHASE_PENDING
    status.setdefault("phaseTimes", {})[PHASE_PENDING] = now
    status.pop("startTime", None)
    return model.set_condition(status, Condition(CONDITION_PREPARED, "False", outcome.reason, outcome.message,
                                                 lastTransitionTime=now,
                                                 observedGeneration=obj["metadata"].get("generation")))


def restart(obj: dict, now: str | None = None) -> dict:
    """Status for an object whose work was cut off (the process running it died): back to
    Pending, keeping what it had observed, so it runs again from the start."""
    now = now or model.now_iso()
    status = copy.deepcopy(obj.get("status") or {})
    interrupted = status.get("phase", PHASE_PENDING)
    status["phase"] = PHASE_PENDING
    status.setdefault("phaseTimes", {})[PHASE_PENDING] = now
    for key in ("startTime", "completionTime", "queuePosition"):
        status.pop(key, None)
    status = model.set_condition(
        status,
        Condition(CONDITION_BUILDING, "False", "Restarted",
                  f"the service restarted during {interrupted}; starting again", lastTransitionTime=now),
    )
    return status


def queued(obj: dict, position: int) -> dict | None:
    """Status with the queue position, or None when it is already that."""
    status = obj.get("status") or model.initial_status()
    if status.get("queuePosition") == position:
        return None
    return {**copy.deepcopy(status), "queuePosition": position}


def cancelled(obj: dict, by: str, now: str | None = None) -> dict | None:
    """Status of an unfinished image its owner (or an admin) cancelled: Failed, reason
    Cancelled, saying who; None when it already finished (nothing to cancel)."""
    now = now or model.now_iso()
    status = copy.deepcopy(obj.get("status") or model.initial_status())
    phase = status.get("phase", PHASE_PENDING)
    if phase in model.TERMINAL_PHASES:
        return None
    status = model.set_condition(
        status,
        Condition(CONDITION_BUILDING, "False", "Cancelled", f"cancelled by {by}", lastTransitionTime=now,
                  observedGeneration=obj["metadata"].get("generation")),
    )
    status["phase"] = PHASE_FAILED
    status.setdefault("phaseTimes", {})[PHASE_FAILED] = now
    status["completionTime"] = now
    status["failedPhase"] = phase
    status.pop("queuePosition", None)
    status.pop("rebuildAfter", None)  # cancelled means stopped: a push waiting for this run goes too
    return status


# how many earlier runs and triggers an image remembers (each a few hundred bytes)
MAX_REMEMBERED_RUNS = 20
MAX_REMEMBERED_TRIGGERS = 20


def failure_of(status: dict) -> dict | None:
    """The condition that says why a run failed: the newest that reports a failure (a failed
    run's reason is that, not a success of the same second); None when none does."""
    failing = [c for c in status.get("conditions", []) if c.get("reason")
               and c.get("status") == ("True" if c.get("type", "").startswith("Error") else "False")]
    return max(failing, key=lambda c: c.get("lastTransitionTime", "")) if failing else None


def rebuilt(obj: dict, by: str, now: str | None = None, trigger: dict | None = None) -> dict:
    """Status of a finished image sent through its phases again: a new run, numbered, with the
    finished run kept in `runs` (its own times, outcome and what it reused), and what set it
    off in `triggers` (a person's rebuild, a webhook's push: what, who, when, from -> to)."""
    now = now or model.now_iso()
    old = obj.get("status") or {}
    trigger = {**(trigger or {"kind": "rebuild", "by": by, "at": now}), "run": old.get("run", 1) + 1}
    finished = {"run": old.get("run", 1), "phase": old.get("phase")}
    for key in ("startTime", "completionTime", "reusedFrom", "image"):
        if old.get(key):
            finished[key] = old[key]
    latest = failure_of(old) if old.get("phase") == PHASE_FAILED else None
    # a run's own reason, not the note that the image below it failed later
    reasons = [c for c in old.get("conditions", []) if c.get("reason") and c.get("type") != model.CONDITION_BASE_CURRENT]
    if latest is None and reasons:
        latest = max(reasons, key=lambda c: c.get("lastTransitionTime", ""))
    if latest is not None:
        finished["reason"] = latest["reason"]
    status = model.initial_status()
    status["phaseTimes"] = {PHASE_PENDING: now}
    status["run"] = finished["run"] + 1
    status["runs"] = (list(old.get("runs", [])) + [finished])[-MAX_REMEMBERED_RUNS:]
    # the newest good build: it stays startable while this run works, and after it fails
    previous = old.get("image") or old.get("rebuildOf")
    if previous:  # none when no run before built one
        status["rebuildOf"] = previous
    status["rebuildRequestedBy"] = by
    status["rebuildRequestedAt"] = now
    status["triggers"] = (list(old.get("triggers", [])) + [trigger])[-MAX_REMEMBERED_TRIGGERS:]
    for key in ("lastStartedAt", "lastStartedImage"):  # the image's use, not the run's
        if old.get(key):
            status[key] = old[key]
    return status


def rebuild_after_this_run(obj: dict, trigger: dict) -> dict | None:
    """Status of an image in work with `trigger` kept for when its run ends (a push arrived
    while it built an older commit: its rebuild follows); None when it has finished (rebuild
    it now instead)."""
    status = obj.get("status") or model.initial_status()
    if status.get("phase", PHASE_PENDING) in model.TERMINAL_PHASES:
        return None
    return {**copy.deepcopy(status), "rebuildAfter": trigger}


SCHEDULE_SECONDS = {"daily": 86400, "weekly": 7 * 86400, "monthly": 30 * 86400}


def held_on_earlier_build(status: dict) -> bool:
    """Whether the current run made an earlier build current again (a rollback, or a kept build
    built again from its lock): the owner chose that build, so base-image updates and schedules
    leave the image on it; their next rebuild, or a push, moves it on."""
    return bool(status.get("rolledBackFrom")
                or (status.get("restoring") and status.get("phase") == PHASE_READY))  # a failed one holds nothing


def schedule_due(obj: dict, now: float) -> bool:
    """Whether a finished image's `spec.rebuildSchedule` has come due: its period has passed
    since its last run completed (`now` in seconds since the epoch); never for an image held on
    an earlier build."""
    period = SCHEDULE_SECONDS.get((obj.get("spec") or {}).get("rebuildSchedule") or "")
    finished = (obj.get("status") or {}).get("completionTime")
    if not period or not finished or held_on_earlier_build(obj.get("status") or {}):
        return False
    return now - model.parse_iso(finished) >= period


def trigger_satisfied(obj: dict, trigger: dict) -> bool:
    """Whether the run that just ended already built what `trigger` asked for (the pushed
    commit, the moved base's new digest): then no rebuild follows it."""
    status = obj.get("status") or {}
    if trigger.get("kind") == "baseImage":
        return bool(trigger.get("to")) and status.get("baseImageDigest") == trigger["to"]
    return bool(trigger.get("to")) and status.get("gitCommit") == trigger["to"]


# status fields that others than the engine write while it works (a push's pending rebuild, the
# spawner hooks' record of a server start): the engine's own writes keep them
FIELDS_WRITTEN_BY_OTHERS = ("rebuildAfter", "lastStartedAt", "lastStartedImage")


def run_separator(status: dict) -> str | None:
    """The log line that opens a rebuild's run (the panel draws it as a rule); None for run 1."""
    run = status.get("run", 1)
    if run <= 1:
        return None
    who = status.get("rebuildRequestedBy")
    why = f"rebuild requested by {who}" if who else "rebuild"
    return f"=== Run {run} · {why} · {status.get('rebuildRequestedAt') or model.now_iso()} ==="
