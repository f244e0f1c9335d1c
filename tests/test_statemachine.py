"""The pure state machine: every path of the seed's diagram, and what status says about it."""

import pytest

from cnbi_hub import model
from cnbi_hub.controller.statemachine import Outcome, advance, next_phase, queued, restart


def obj(build_type="PackageList", phase="Pending", **status):
    spec = {"buildType": build_type}
    return {"metadata": {"name": "x", "generation": 3}, "spec": spec,
            "status": {"phase": phase, "conditions": [], "phaseTimes": {"Pending": "t0"}, **status}}


@pytest.mark.parametrize("build_type,path", [
    ("PackageList", ["Pending", "Prepare", "Resolving", "Building", "Ready"]),
    ("GitRepository", ["Pending", "Prepare", "Resolving", "Building", "Ready"]),
    ("ImageImport", ["Pending", "Prepare", "Building", "Ready"]),
])
def test_happy_paths(build_type, path):
    current = obj(build_type)
    seen = ["Pending"]
    for i in range(len(path) - 1):
        current["status"] = advance(current, Outcome(True, "Ok", "fine"), now=f"t{i + 1}")
        seen.append(current["status"]["phase"])
    assert seen == path
    status = current["status"]
    assert list(status["phaseTimes"]) == path
    assert status["startTime"] == "t1" and status["completionTime"] == f"t{len(path) - 1}"
    validated = [c for c in status["conditions"] if c["type"] == model.CONDITION_VALIDATED]
    assert validated and validated[0]["status"] == "True" and validated[0]["observedGeneration"] == 3
    building = [c for c in status["conditions"] if c["type"] == model.CONDITION_BUILDING][0]
    assert building["status"] == "False" and building["reason"] == "BuildSucceeded"
    if build_type == "ImageImport":
        assert any(c["type"] == model.CONDITION_IMAGE_IMPORT_READY and c["status"] == "True"
                   for c in status["conditions"])


@pytest.mark.parametrize("phase,build_type,condition,condition_status", [
    ("Prepare", "PackageList", model.CONDITION_PREPARED, "False"),
    ("Prepare", "ImageImport", model.CONDITION_IMAGE_IMPORT_READY, "False"),
    ("Resolving", "PackageList", model.CONDITION_ERROR_RESOLVING, "True"),
    ("Building", "GitRepository", model.CONDITION_ERROR_BUILDING, "True"),
    ("Building", "ImageImport", model.CONDITION_IMAGE_IMPORT_READY, "False"),
])
def test_any_phase_can_fail_with_a_condition_saying_why(phase, build_type, condition, condition_status):
    status = advance(obj(build_type, phase), Outcome(False, "Broken", "the reason"), now="t9")
    assert status["phase"] == "Failed" and status["failedPhase"] == phase
    assert status["completionTime"] == "t9"
    match = [c for c in status["conditions"] if c["type"] == condition]
    assert match and match[0]["status"] == condition_status and match[0]["message"] == "the reason"


def test_reuse_skips_to_ready_and_records_what_was_observed():
    status = advance(obj(phase="Resolving"), Outcome(True, "Reused", "same", {"image": "a@sha256:1"},
                                                     skip_to="Ready"))
    assert status["phase"] == "Ready" and status["image"] == "a@sha256:1"
    assert "Building" not in status["phaseTimes"]


def test_restart_goes_back_to_pending_and_says_why():
    status = restart(obj(phase="Building", startTime="t1", queuePosition=2))
    assert status["phase"] == "Pending" and "startTime" not in status and "queuePosition" not in status
    assert [c["reason"] for c in status["conditions"]] == ["Restarted"]


def test_queue_position_written_only_when_it_changes():
    waiting = obj()
    assert queued(waiting, 2)["queuePosition"] == 2
    waiting["status"]["queuePosition"] = 2
    assert queued(waiting, 2) is None
    assert "queuePosition" not in advance(waiting, Outcome(True, "Started"))


def test_no_transition_out_of_terminal_phases():
    with pytest.raises(KeyError):
        next_phase("PackageList", "Ready")
    with pytest.raises(KeyError):
        next_phase("ImageImport", "Resolving")


def test_a_rebuild_schedule_comes_due_a_period_after_the_last_run_finished():
    from cnbi_hub.controller.statemachine import schedule_due

    finished = "2026-11-01T00:00:00Z"
    start = model.parse_iso(finished)
    weekly = {"spec": {"rebuildSchedule": "weekly"}, "status": {"phase": "Ready", "completionTime": finished}}
    assert not schedule_due(weekly, start + 6 * 86400)
    assert schedule_due(weekly, start + 7 * 86400)
    daily = {**weekly, "spec": {"rebuildSchedule": "daily"}}
    assert schedule_due(daily, start + 86400) and not schedule_due(daily, start + 3600)
    assert not schedule_due({**weekly, "spec": {}}, start + 365 * 86400)  # no schedule: never
    assert not schedule_due({**weekly, "status": {"phase": "Ready"}}, start + 365 * 86400)  # never finished


def test_the_ready_index_forgets_an_image_that_left_ready_even_when_its_status_no_longer_names_the_hash():
    from cnbi_hub.controller.phases import PhaseWork
    from cnbi_hub.controller.statemachine import rebuilt

    phases = PhaseWork(work_dir="/tmp/unused")
    ready = {"metadata": {"name": "r", "uid": "u1"},
             "spec": {"buildType": "ImageImport", "fromImage": "registry.example.org/a/b:1"},
             "status": {"phase": "Ready", "specHash": "sha256:k1", "image": "registry.example.org/a/b@sha256:1"}}
    phases.note(ready)
    assert phases.reusable_without_slot({"spec": ready["spec"]})
    # a rebuild resets status (no specHash any more): the index lets go of k1 all the same
    phases.note({**ready, "status": rebuilt(ready, "alice")})
    assert "sha256:k1" not in phases._ready_by_hash and not phases.reusable_without_slot({"spec": ready["spec"]})
    phases.note(ready)
    phases.note(ready, gone=True)  # deleted
    assert "sha256:k1" not in phases._ready_by_hash and not phases._ready_key_of


def test_a_cancel_drops_a_push_that_waited_for_the_run():
    from cnbi_hub.controller.statemachine import cancelled

    building = {"metadata": {"generation": 1}, "spec": {"buildType": "GitRepository"},
                "status": {"phase": "Building", "rebuildAfter": {"kind": "webhook", "to": "b" * 40}}}
    status = cancelled(building, "alice")
    assert status["phase"] == "Failed" and "rebuildAfter" not in status


def test_a_cancelled_run_is_remembered_as_cancelled_even_when_other_conditions_share_its_second():
    from cnbi_hub.controller.statemachine import cancelled, rebuilt

    second = "2026-11-23T18:26:57Z"
    building = {"metadata": {"generation": 1}, "spec": {"buildType": "PackageList"},
                "status": {"phase": "Building", "startTime": "2026-11-23T18:26:56Z", "conditions": [
                    {"type": "Resolved", "status": "True", "reason": "LockResolved", "message": "2 packages",
                     "lastTransitionTime": second},
                    {"type": "Building", "status": "True", "reason": "Building", "message": "",
                     "lastTransitionTime": second}]}}
    failed = {**building, "status": cancelled(building, "bob", now=second)}
    [run] = rebuilt(failed, "bob")["runs"]
    assert run["reason"] == "Cancelled" and run["phase"] == "Failed"
