"""Retention, the pure planner: which kept builds lose their image, and which never do."""

from cnbi_hub import retention
from cnbi_hub.controller.inuse import digests_of_pods, digests_of_users
from cnbi_hub.retention import DAY, Policy

NOW = 1_800_000_000.0  # 2027-01-15
REPO = "localhost/cnbi"


def iso(seconds: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def digest(tag: str) -> str:
    return "sha256:" + tag.encode().hex().ljust(64, "0")[:64]


def image(name: str, current: str, owner: str = "alice", build_type: str = "PackageList", **status) -> dict:
    return {"metadata": {"name": name, "annotations": {"opendatahub.io/notebook-image-creator": owner}},
            "spec": {"buildType": build_type},
            "status": {"phase": "Ready", "image": f"{REPO}/{name}@{digest(current)}", "imageSize": 100, **status}}


def kept(name: str, run: int, tag: str, days_ago: float, size: int = 100, **extra) -> dict:
    return {"run": run, "image": f"{REPO}/{name}@{digest(tag)}", "savedAt": iso(NOW - days_ago * DAY),
            "imageSize": size, **extra}


def built_here(obj, record) -> bool:
    if obj["spec"]["buildType"] == "ImageImport":
        return False
    return record["image"].startswith(f"{REPO}/{record.get('reusedFrom') or obj['metadata']['name']}@")


def removed_runs(plan) -> dict:
    return {(r.name, r.run): r.delete_image for r in plan.removals}


def test_builds_beyond_keep_lose_their_image_oldest_first_and_the_current_never():
    x = image("x", "x4")
    saved = {run: kept("x", run, f"x{run}", days_ago=10 - run) for run in (1, 2, 3)}
    plan = retention.plan([(x, saved)], set(), Policy(keep=1), NOW, built_here)
    assert removed_runs(plan) == {("x", 1): True, ("x", 2): True}
    assert {r.reason for r in plan.removals} == {"this hub keeps the images of the 1 newest earlier build only"}
    assert retention.plan([(x, saved)], set(), Policy(keep=3), NOW, built_here).removals == []
    # keep 0: every kept build goes, the current one stays
    assert set(removed_runs(retention.plan([(x, saved)], set(), Policy(keep=0), NOW, built_here))) == {
        ("x", 1), ("x", 2), ("x", 3)}


def test_a_build_a_running_server_uses_is_never_removed():
    x = image("x", "x4")
    saved = {run: kept("x", run, f"x{run}", days_ago=10) for run in (1, 2, 3)}
    plan = retention.plan([(x, saved)], {digest("x2")}, Policy(keep=0), NOW, built_here)
    assert set(removed_runs(plan)) == {("x", 1), ("x", 3)}
    assert plan.in_use == [("x", 2, f"{REPO}/x@{digest('x2')}")]


def test_unused_for_d_days_counts_from_the_last_start_or_when_it_stopped_being_current():
    x = image("x", "x9")
    saved = {1: kept("x", 1, "x1", days_ago=40),
             2: kept("x", 2, "x2", days_ago=40, lastStartedAt=iso(NOW - 3 * DAY)),
             3: kept("x", 3, "x3", days_ago=5)}
    plan = retention.plan([(x, saved)], set(), Policy(keep=5, drop_unused_days=30), NOW, built_here)
    assert removed_runs(plan) == {("x", 1): True}
    assert plan.removals[0].reason == "no server started on it for 30 days"
    # a record from before savedAt existed: when it was built
    old = {1: {"run": 1, "image": f"{REPO}/x@{digest('x1')}", "completionTime": iso(NOW - 100 * DAY)}}
    assert set(removed_runs(retention.plan([(x, old)], set(), Policy(keep=5, drop_unused_days=30), NOW,
                                           built_here))) == {("x", 1)}


def shared_runs(plan) -> set:
    return {(name, run) for name, run, _ in plan.shared}


def test_an_image_another_build_names_stays_and_its_record_waits_for_a_later_pass():
    # y reused x's first build (identical input) and still runs on it
    x = image("x", "x2")
    y = image("y", "x1", owner="bob")
    y["status"]["image"] = f"{REPO}/x@{digest('x1')}"
    saved_x = {1: kept("x", 1, "x1", days_ago=1)}
    plan = retention.plan([(x, saved_x), (y, {})], set(), Policy(keep=0), NOW, built_here)
    assert removed_runs(plan) == {} and shared_runs(plan) == {("x", 1)}
    # a child of a stack stands on it (its resolvedBaseImage), or a run layers on it, or it is
    # the build a rebuild in work replaces: the same
    for key, value, phase in (("resolvedBaseImage", f"{REPO}/x@{digest('x1')}", "Ready"),
                              ("layeredOn", {"name": "x", "image": f"{REPO}/x@{digest('x1')}"}, "Building"),
                              ("rebuildOf", f"{REPO}/x@{digest('x1')}", "Building"),
                              ("rebuildOf", f"{REPO}/x@{digest('x1')}", "Failed")):
        z = image("z", "z1", **{key: value, "phase": phase})
        plan = retention.plan([(x, saved_x), (z, {})], set(), Policy(keep=0), NOW, built_here)
        assert removed_runs(plan) == {} and shared_runs(plan) == {("x", 1)}, key
    # once a run is Ready, the build it replaced and the one it layered on are not needed by it
    for key, value in (("rebuildOf", f"{REPO}/x@{digest('x1')}"),
                       ("layeredOn", {"name": "x", "image": f"{REPO}/x@{digest('x1')}"})):
        z = image("z", "z1", **{key: value})
        assert removed_runs(retention.plan([(x, saved_x), (z, {})], set(), Policy(keep=0), NOW, built_here)) == {
            ("x", 1): True}, key


def test_another_owners_kept_build_protects_its_image_in_a_pass_for_one_user():
    # alice's x and bob's y both keep the same build (y reused x's); a pass for alice only
    x, y = image("x", "x2"), image("y", "y2", owner="bob")
    saved_x = {1: kept("x", 1, "x1", days_ago=1)}
    saved_y = {1: {**kept("y", 1, "x1", days_ago=1), "image": f"{REPO}/x@{digest('x1')}", "reusedFrom": "x"}}
    plan = retention.plan([(x, saved_x), (y, saved_y)], set(), Policy(keep=0), NOW, built_here, only_owner="alice")
    assert removed_runs(plan) == {} and shared_runs(plan) == {("x", 1)}
    # for everyone: both records go, and the image with them
    plan = retention.plan([(x, saved_x), (y, saved_y)], set(), Policy(keep=0), NOW, built_here)
    assert removed_runs(plan) == {("x", 1): True, ("y", 1): True}


def test_two_records_of_one_image_both_go_and_a_kept_record_keeps_it():
    x = image("x", "x3")
    same = {1: kept("x", 1, "x1", days_ago=9), 2: kept("x", 2, "x1", days_ago=8)}
    plan = retention.plan([(x, same)], set(), Policy(keep=0), NOW, built_here)
    assert removed_runs(plan) == {("x", 1): True, ("x", 2): True}  # the edge deletes the image once
    # keep 1: run 2 stays and names the image run 1 also names
    plan = retention.plan([(x, same)], set(), Policy(keep=1), NOW, built_here)
    assert removed_runs(plan) == {} and shared_runs(plan) == {("x", 1)}


def test_imports_and_other_repositories_are_never_deleted_only_marked():
    imported = image("imp", "i2", build_type="ImageImport")
    saved = {1: {"run": 1, "image": f"quay.io/org/lab@{digest('i1')}", "savedAt": iso(NOW - DAY)}}
    assert removed_runs(retention.plan([(imported, saved)], set(), Policy(keep=0), NOW, built_here)) == {
        ("imp", 1): False}
    # a record whose image is somewhere else than where x builds to
    odd = {1: {"run": 1, "image": f"{REPO}/notebook-lab@{digest('base')}", "savedAt": iso(NOW - DAY)}}
    assert removed_runs(retention.plan([(image("x", "x2"), odd)], set(), Policy(keep=0), NOW, built_here)) == {
        ("x", 1): False}


def test_over_the_bytes_quota_the_least_recently_used_kept_builds_go_until_it_fits():
    a = image("a", "a9")  # 100 bytes current
    b = image("b", "b9")  # 100 bytes current
    saved_a = {1: kept("a", 1, "a1", days_ago=20, size=300), 2: kept("a", 2, "a2", days_ago=2, size=300)}
    saved_b = {1: kept("b", 1, "b1", days_ago=10, size=300)}
    other = image("c", "c9", owner="carol")
    saved_c = {1: kept("c", 1, "c1", days_ago=50, size=400)}
    images = [(a, saved_a), (b, saved_b), (other, saved_c)]
    # alice: 200 current + 900 kept = 1100; the limit 600 needs two of her kept builds gone,
    # the two least recently used (a1, then b1); carol, at 500, is within it
    plan = retention.plan(images, set(), Policy(keep=5, max_bytes_per_user=600), NOW, built_here)
    assert set(removed_runs(plan)) == {("a", 1), ("b", 1)}
    assert "over this hub's" in plan.removals[0].reason
    # a build in use is not counted as freed: the next least recently used goes instead
    plan = retention.plan(images, {digest("a1")}, Policy(keep=5, max_bytes_per_user=600), NOW, built_here)
    assert set(removed_runs(plan)) == {("b", 1), ("a", 2)}
    assert retention.plan(images, set(), Policy(keep=5, max_bytes_per_user=0), NOW, built_here).removals == []


def test_removed_records_are_not_planned_again():
    x = image("x", "x3")
    saved = {1: kept("x", 1, "x1", days_ago=9, removed={"at": "t", "reason": "r"})}
    assert retention.plan([(x, saved)], set(), Policy(keep=0), NOW, built_here).removals == []


def test_what_servers_use_from_the_hubs_user_models_and_from_pods():
    users = [{"name": "alice", "servers": {"": {"user_options": {"cnbi_started": f"{REPO}/x@{digest('x1')}"}},
                                           "b": {"user_options": {"cnbi_image": "x"}}, "c": {"user_options": None}}},
             {"name": "bob", "servers": {}}, {"name": "carol"}]
    assert digests_of_users(users) == {digest("x1")}
    pods = [{"spec": {"containers": [{"image": f"127.0.0.1:5000/cnbi/x@{digest('x2')}"}]},
             "status": {"phase": "Running",
                        "containerStatuses": [{"imageID": f"docker-pullable://127.0.0.1:5000/cnbi/x@{digest('x3')}"}]}},
            {"spec": {"containers": [{"image": "busybox:latest"}],
                      "initContainers": [{"image": f"r/i@{digest('x4')}"}]}, "status": {"phase": "Pending"}},
            {"spec": {"containers": [{"image": f"r/done@{digest('x5')}"}]}, "status": {"phase": "Succeeded"}}]
    assert digests_of_pods(pods) == {digest("x2"), digest("x3"), digest("x4")}
