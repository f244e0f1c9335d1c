"""Generations: earlier Ready builds kept, listed with what changed, and made current again
without a build (rollback) — the pure part, then end to end with real git, uv and podman."""

import asyncio
import time

import pytest

from cnbi_hub import generations, model
from cnbi_hub.controller.statemachine import held_on_earlier_build, rebuilt, schedule_due
from tests.hubfixtures import ADMIN
from tests.infra_podman import podman, push_commit
from tests.test_podmanspawner import hub_request, wait_for_server

USER_BASE = "localhost/cnbi/notebook-base:py311-user"


def ready_status(run: int, image: str, packages: dict, **extra) -> dict:
    return {"phase": "Ready", "run": run, "image": image, "completionTime": f"2026-11-2{run}T10:00:00Z",
            "specHash": f"sha256:{run}", "packages": [{"name": n, "version": v, "visible": True}
                                                      for n, v in packages.items()], **extra}


def test_a_ready_build_is_saved_with_its_lock_and_a_failed_one_is_not():
    status = ready_status(1, "reg/x@sha256:1", {"six": "1.16.0"}, conditions=[{"type": "Validated"}])
    record = generations.saved_generation(status, "six==1.16.0 --hash=sha256:aa\n")
    assert record["run"] == 1 and record["image"] == "reg/x@sha256:1" and record["lock"].startswith("six==")
    assert "conditions" not in record
    assert generations.saved_generation({**status, "phase": "Failed"}, "x") is None
    assert generations.saved_generation({**status, "image": None}, "x") is None


def test_saved_generations_keep_every_stored_build_and_the_newest_removed_records():
    saved = {}
    for run in range(1, 8):
        saved = generations.with_saved(saved, {"run": run, "image": f"i{run}"})
    # retention, not saving, decides which builds lose their image: all seven are still there
    assert sorted(saved) == list(range(1, 8))
    assert generations.parse_saved(generations.dump_saved(saved)) == saved
    assert generations.parse_saved("{not json") == {} and generations.with_saved(saved, None) == saved
    removed = generations.with_removed(saved, {run: "old" for run in range(1, 7)}, "2026-11-24T00:00:00Z")
    assert sorted(generations.stored(removed)) == [7] and removed[1]["removed"]["reason"] == "old"
    many = {run: {"run": run, "image": f"i{run}", "removed": {"at": "x", "reason": "y"}} for run in range(1, 40)}
    kept = generations.with_saved(many, {"run": 40, "image": "i40"})
    assert sorted(kept) == [*range(40 - generations.MAX_REMOVED_RECORDS, 40), 40]


def test_the_saved_builds_stay_small_enough_to_store_whole():
    lock = "x" * 100_000  # a large lock: records of such builds would outgrow a ConfigMap
    saved = {run: {"run": run, "image": f"i{run}", "lock": lock, **({"removed": {"at": "t", "reason": "r"}}
                                                                    if run < 5 else {})} for run in range(1, 12)}
    kept = generations.with_saved(saved, None)
    assert len(generations.dump_saved(kept)) <= generations.MAX_SAVED_CHARS
    # the removed records go first, oldest first; then the oldest stored ones
    assert sorted(kept) == [6, 7, 8, 9, 10, 11]
    assert generations.parse_saved(generations.dump_saved(kept)) == kept


def test_a_start_on_a_kept_build_is_recorded_on_that_build_only():
    saved = {1: {"run": 1, "image": "r/x@sha256:aa"}, 2: {"run": 2, "image": "r/x@sha256:bb"}}
    started = generations.with_start(saved, "other/name@sha256:aa", "2026-11-24T10:00:00Z")
    assert started[1]["lastStartedAt"] == "2026-11-24T10:00:00Z" and "lastStartedAt" not in started[2]
    assert generations.with_start(saved, "r/x@sha256:cc", "t") is None  # the current build
    assert generations.with_start(saved, "r/x:latest", "t") is None
    gone = generations.with_removed(saved, {1: "old"}, "t")
    assert generations.with_start(gone, "r/x@sha256:aa", "t") is None


def test_listing_says_what_changed_between_generations_and_why_each_run_started():
    saved = {1: {**ready_status(1, "i1", {"six": "1.16.0", "toolz": "0.12.0"}), "lock": "x"}}
    current = ready_status(2, "i2", {"six": "1.17.0", "tabulate": "0.9.0"},
                           triggers=[{"kind": "webhook", "run": 2, "by": "dev", "to": "b" * 40}])
    [newest, oldest] = generations.listing(current, saved)
    assert newest["run"] == 2 and newest["current"] and newest["comparedWith"] == 1
    assert newest["changes"]["added"] == ["tabulate 0.9.0"]
    assert newest["changes"]["removed"] == ["toolz 0.12.0"]
    assert newest["changes"]["changed"] == ["six 1.16.0 → 1.17.0"]
    assert newest["trigger"]["kind"] == "webhook" and "trigger" not in oldest
    assert not oldest["current"] and oldest["changes"]["counts"] == {"added": 0, "removed": 0, "changed": 0}
    assert "packages" not in newest and newest["packageCount"] == 2
    # while a rebuild works, the current run is no generation (yet): the saved ones are listed
    assert [g["run"] for g in generations.listing({**current, "phase": "Building"}, saved)] == [1]


def test_rolled_back_status_is_ready_at_once_on_the_saved_build():
    obj = {"metadata": {"name": "x", "generation": 1}, "spec": {"buildType": "PackageList"},
           "status": ready_status(2, "i2", {"six": "1.17.0"})}
    record = {**ready_status(1, "i1", {"six": "1.16.0"}), "lock": "six==1.16.0\n"}
    status = generations.rolled_back(obj, record, "alice", now="2026-11-23T12:00:00Z")
    assert status["phase"] == "Ready" and status["image"] == "i1" and status["run"] == 3
    assert status["packages"][0]["version"] == "1.16.0" and status["rolledBackFrom"] == 1
    assert status["runs"][-1]["run"] == 2 and status["runs"][-1]["image"] == "i2"
    assert status["triggers"][-1] == {"kind": "rollback", "by": "alice", "at": "2026-11-23T12:00:00Z", "toRun": 1,
                                      "from": "i2", "to": "i1", "run": 3}
    validated = [c for c in status["conditions"] if c["type"] == model.CONDITION_VALIDATED][0]
    assert validated["reason"] == "RolledBack" and "rebuildOf" not in status and "lock" not in status
    # a rebuild after it starts from there as from any Ready build, and the image's last use stays
    used = {**status, "lastStartedAt": "2026-11-23T13:00:00Z", "lastStartedImage": "i1"}
    again = rebuilt({**obj, "status": used}, "bob")
    assert again["rebuildOf"] == "i1" and again["lastStartedAt"] == "2026-11-23T13:00:00Z"
    assert again["lastStartedImage"] == "i1" and again["phase"] == "Pending"


def test_a_rollback_or_a_build_again_holds_the_image_on_that_build_until_its_next_rebuild():
    obj = {"metadata": {"name": "x", "generation": 1}, "spec": {"buildType": "PackageList", "rebuildSchedule": "daily"},
           "status": ready_status(2, "i2", {"six": "1.17.0"})}
    week_later = model.parse_iso("2026-11-29T10:00:00Z")
    assert schedule_due(obj, week_later) and not held_on_earlier_build(obj["status"])
    back = generations.rolled_back(obj, {**ready_status(1, "i1", {"six": "1.16.0"}), "lock": "x"}, "alice",
                                   now="2026-11-22T10:00:00Z")
    assert held_on_earlier_build(back) and not schedule_due({**obj, "status": back}, week_later)
    record = {**ready_status(1, "i1", {}), "gitCommit": "c" * 40, "resolvedBaseImage": "b@sha256:1",
              "lockHash": "sha256:aa", "lock": "six==1.16.0\n", "removed": {"at": "t", "reason": "r"}}
    again = {**rebuilt({**obj, "status": back}, "alice"), "restoring": generations.restoring(record)}
    assert again["restoring"] == {"run": 1, "gitCommit": "c" * 40, "resolvedBaseImage": "b@sha256:1",
                                  "lockHash": "sha256:aa"}
    assert held_on_earlier_build({**again, "phase": "Ready"})
    # a build again that failed holds nothing: the image is still on the build it had
    assert not held_on_earlier_build({**again, "phase": "Failed"})
    # the next rebuild (a person's, a push's) lets it follow its base and schedule again
    assert not held_on_earlier_build(rebuilt({**obj, "status": {**again, "phase": "Ready"}}, "bob"))


# --- end to end ----------------------------------------------------------------------------


async def _ends(hub, token, name, run, timeout=600):
    deadline = time.monotonic() + timeout
    while True:
        obj = (await hub.api("GET", f"api/images/{name}", token)).json()
        status = obj.get("status") or {}
        if status.get("run", 1) == run and model.phase_of(obj) in model.TERMINAL_PHASES:
            return obj
        assert time.monotonic() < deadline, status
        await asyncio.sleep(1)


def _tabulate_version(image, podman_env) -> str:
    ran = podman("run", "--rm", image, "python", "-c", "import tabulate; print(tabulate.__version__)", env=podman_env)
    assert ran.returncode == 0, ran.stderr
    return ran.stdout.strip()


@pytest.mark.podman
async def test_a_rebuild_keeps_the_previous_build_and_rollback_makes_it_current_without_a_build(
        hub, make_git_repo, notebook_base_images, podman_env):
    owner, other = hub.token("gen-alice"), hub.token("gen-bob")
    repo = make_git_repo("generations", {"requirements.txt": "tabulate==0.9.0\n"})
    r = await hub.api("POST", "api/images", owner, {"spec": {"buildType": "GitRepository", "repository": repo.url,
                                                             "baseImage": USER_BASE}})
    assert r.code == 201, r.body
    name = r.json()["metadata"]["name"]
    first = await _ends(hub, owner, name, 1)
    assert model.phase_of(first) == "Ready", first["status"]
    first_lock = (await hub.api("GET", f"api/images/{name}/lock", owner)).body.decode()
    assert "tabulate==0.9.0" in first_lock

    push_commit(repo, {"requirements.txt": "tabulate==0.8.10\n"})
    assert (await hub.api("POST", f"api/images/{name}/rebuild", owner)).code == 200
    second = await _ends(hub, owner, name, 2)
    assert model.phase_of(second) == "Ready", second["status"]
    assert second["status"]["image"] != first["status"]["image"]

    listed = (await hub.api("GET", f"api/images/{name}/generations", owner)).json()["items"]
    assert [(g["run"], g["current"], g["image"]) for g in listed] == [
        (2, True, second["status"]["image"]), (1, False, first["status"]["image"])]
    assert listed[0]["changes"]["changed"] == ["tabulate 0.9.0 → 0.8.10"]
    assert listed[0]["trigger"]["kind"] == "rebuild" and listed[0]["trigger"]["by"] == "gen-alice"

    # refusals: not a kept run, the current one, someone else's image, a bad body
    for body, status, field in (({"run": 7}, 422, "run"), ({"run": 2}, 422, "run"), ({"run": "1"}, 422, "run"),
                                ({}, 422, "run")):
        r = await hub.api("POST", f"api/images/{name}/rollback", owner, body)
        assert (r.code, r.json().get("field")) == (status, field), (body, r.body)
    assert (await hub.api("POST", f"api/images/{name}/rollback", other, {"run": 1})).code == 404
    assert (await hub.api("GET", f"api/images/{name}/generations", other)).code == 404

    before = podman("images", "--quiet", "--no-trunc", env=podman_env).stdout.split()
    r = await hub.api("POST", f"api/images/{name}/rollback", owner, {"run": 1})
    assert r.code == 200, r.body
    back = r.json()
    # Ready at once, on the first build: no run of the phases, no new image
    assert model.phase_of(back) == "Ready" and back["status"]["run"] == 3
    assert back["status"]["image"] == first["status"]["image"]
    assert back["status"]["packages"] == first["status"]["packages"]
    assert back["status"]["triggers"][-1]["kind"] == "rollback" and back["status"]["triggers"][-1]["toRun"] == 1
    await asyncio.sleep(2)
    again = (await hub.api("GET", f"api/images/{name}", owner)).json()
    assert model.phase_of(again) == "Ready" and again["status"]["run"] == 3 and "Prepare" not in again["status"][
        "phaseTimes"]
    assert sorted(podman("images", "--quiet", "--no-trunc", env=podman_env).stdout.split()) == sorted(before)
    assert (await hub.api("GET", f"api/images/{name}/lock", owner)).body.decode() == first_lock
    assert _tabulate_version(again["status"]["image"], podman_env) == "0.9.0"
    log = (await hub.api("GET", f"api/images/{name}/logs", owner)).body.decode()
    assert "run 1's build made current again by gen-alice" in log

    # the build it replaced is kept in its turn: going forward again works the same way
    listed = (await hub.api("GET", f"api/images/{name}/generations", owner)).json()["items"]
    assert [(g["run"], g["current"]) for g in listed] == [(3, True), (2, False)]
    assert listed[0]["image"] == first["status"]["image"] and listed[1]["image"] == second["status"]["image"]
    r = await hub.api("POST", f"api/images/{name}/rollback", owner, {"run": 2})
    assert r.code == 200 and r.json()["status"]["image"] == second["status"]["image"]
    assert _tabulate_version(r.json()["status"]["image"], podman_env) == "0.8.10"

    # --- retention: one more build, so runs 3 (the first build's image) and 4 (the second's) are kept
    third_commit = push_commit(repo, {"README.md": "a third build\n"})
    assert (await hub.api("POST", f"api/images/{name}/rebuild", owner)).code == 200
    fifth = await _ends(hub, owner, name, 5)
    assert model.phase_of(fifth) == "Ready" and fifth["status"]["gitCommit"] == third_commit, fifth["status"]
    first_image, second_image = first["status"]["image"], second["status"]["image"]
    listed = (await hub.api("GET", f"api/images/{name}/generations", owner)).json()["items"]
    assert [(g["run"], g["image"]) for g in listed] == [(5, fifth["status"]["image"]), (4, second_image),
                                                         (3, first_image)]
    assert all(g.get("savedAt") for g in listed[1:])

    # a server of alice's runs on run 4's build: the hub lists it with the build it started on,
    # as the spawner hooks record it (user_options cnbi_started)
    r = await hub_request(hub, "POST", "hub/api/users/gen-alice/server", owner,
                          body={"cnbi_image": name, "cnbi_started": second_image})
    assert r.code in (201, 202), r.body
    await wait_for_server(hub, "gen-alice", owner)
    admin = hub.token(ADMIN)
    try:
        # only admins; a bad policy names its field; nothing is removed by either
        assert (await hub.api("POST", "api/retention", owner, {"keepGenerations": 0})).code == 403
        assert (await hub.api("GET", "api/retention", owner)).code == 403
        for body, field in (({"keepGenerations": -1}, "keepGenerations"), ({"keepGenerations": "0"}, "keepGenerations"),
                            ({"dropUnusedDays": True}, "dropUnusedDays"), ({"keep": 1}, "keep"),
                            ({"dryRun": "yes"}, "dryRun"), ({"user": ""}, "user")):
            r = await hub.api("POST", "api/retention", admin, body)
            assert (r.code, r.json().get("field")) == (422, field), (body, r.body)
        r = await hub.api("POST", "api/retention", admin, {"keepGenerations": 0, "user": "gen-alice", "dryRun": True})
        assert r.code == 200, r.body
        preview = r.json()
        assert [(e["run"], e["imageDeleted"]) for e in preview["removed"]] == [(3, True)], preview
        assert [(e["name"], e["run"]) for e in preview["inUse"]] == [(name, 4)]
        assert _stored(first_image, podman_env)  # a dry run removes nothing

        r = await hub.api("POST", "api/retention", admin, {"keepGenerations": 0, "user": "gen-alice"})
        assert r.code == 200, r.body
        report = r.json()
        assert [(e["name"], e["run"], e["imageDeleted"]) for e in report["removed"]] == [(name, 3, True)], report
        assert report["failed"] == [] and [e["run"] for e in report["inUse"]] == [4]
        assert report["bytesFreed"] == first["status"]["imageSize"]
        assert not _stored(first_image, podman_env)
        assert _stored(second_image, podman_env) and _stored(fifth["status"]["image"], podman_env)
        assert _tabulate_version(second_image, podman_env) == "0.8.10"  # the server's build runs on

        # the record stays, says why; it can no longer be made current nor started
        listed = (await hub.api("GET", f"api/images/{name}/generations", owner)).json()["items"]
        gone = next(g for g in listed if g["run"] == 3)
        assert gone["removed"]["reason"] == "this hub keeps no earlier build's image" and gone["packageCount"]
        assert "removed" not in next(g for g in listed if g["run"] == 4)
        r = await hub.api("POST", f"api/images/{name}/rollback", owner, {"run": 3})
        assert (r.code, r.json()["field"]) == (409, "run") and "was removed" in r.json()["message"], r.body
        usage = (await hub.api("GET", "api/usage", admin)).json()["items"]
        mine = next(u for u in usage if u["user"] == "gen-alice")
        assert (mine["keptBuilds"], mine["removedBuilds"]) == (1, 1), mine
        assert (await hub.api("GET", "api/retention", admin)).json()["lastPass"]["removed"][0]["run"] == 3
    finally:
        r = await hub_request(hub, "DELETE", "hub/api/users/gen-alice/server", owner)
        await wait_for_server(hub, "gen-alice", owner, ready=False)

    # the server has stopped: run 4's build goes too; the current one never does
    report = (await hub.api("POST", "api/retention", admin, {"keepGenerations": 0, "user": "gen-alice"})).json()
    assert [(e["run"], e["imageDeleted"]) for e in report["removed"]] == [(4, True)] and report["inUse"] == []
    assert not _stored(second_image, podman_env) and _stored(fifth["status"]["image"], podman_env)
    again = (await hub.api("GET", f"api/images/{name}", owner)).json()
    assert model.phase_of(again) == "Ready" and again["status"]["image"] == fifth["status"]["image"]
    report = (await hub.api("POST", "api/retention", admin, {"keepGenerations": 0, "user": "gen-alice"})).json()
    assert report["removed"] == []  # nothing left to remove

    # a removed build is built again on demand from what its record keeps: the first build's
    # commit (the branch is two commits further), its base by digest and its lock
    r = await hub.api("POST", f"api/images/{name}/rollback", owner, {"run": 3, "rebuild": "yes"})
    assert (r.code, r.json()["field"]) == (422, "rebuild")
    r = await hub.api("POST", f"api/images/{name}/rollback", owner, {"run": 3, "rebuild": True})
    assert r.code == 200, r.body
    assert r.json()["status"]["restoring"] == {"run": 3, "gitCommit": first["status"]["gitCommit"],
                                               "resolvedBaseImage": first["status"]["resolvedBaseImage"],
                                               "lockHash": first["status"]["lockHash"]}
    sixth = await _ends(hub, owner, name, 6)
    assert model.phase_of(sixth) == "Ready", sixth["status"]
    assert sixth["status"]["gitCommit"] == first["status"]["gitCommit"] != third_commit
    assert sixth["status"]["lockHash"] == first["status"]["lockHash"]
    assert (await hub.api("GET", f"api/images/{name}/lock", owner)).body.decode() == first_lock
    assert _tabulate_version(sixth["status"]["image"], podman_env) == "0.9.0"
    assert sixth["status"]["triggers"][-1] == {**sixth["status"]["triggers"][-1], "kind": "restore", "toRun": 3,
                                               "by": "gen-alice", "run": 6}
    log = (await hub.api("GET", f"api/images/{name}/logs", owner)).body.decode()
    assert "installing run 3's lock as it was" in log and "building run 3's commit" in log
    # the build it replaced (run 5's) is kept in its turn, with its image
    listed = (await hub.api("GET", f"api/images/{name}/generations", owner)).json()["items"]
    assert [(g["run"], "removed" in g) for g in listed[:2]] == [(6, False), (5, False)]


def _stored(image, podman_env) -> bool:
    return podman("image", "inspect", "--format", "{{.Id}}", image, env=podman_env).returncode == 0
