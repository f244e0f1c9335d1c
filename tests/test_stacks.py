"""Stacks, the pure part: an image built on another CustomNBImage (`cnbi:<name>`), the chain
above one, cycles and depth, and the order in which the images above one are rebuilt."""

import asyncio
import copy

import pytest

from cnbi_hub import model, stacks


def test_only_a_cnbi_base_names_another_image():
    assert stacks.parent_of({"baseImage": "cnbi:team-base"}) == "team-base"
    assert stacks.parent_of({"baseImage": "quay.io/jupyter/base-notebook:latest"}) is None
    assert stacks.parent_of({"fromImage": "cnbi:x"}) is None  # an import names a registry's image
    assert stacks.parent_of(None) is None


def chain(name, parent, parents):
    async def parent_of_name(n):
        return parents.get(n)
    return asyncio.run(stacks.check_chain(name, parent, parent_of_name))


def test_the_chain_above_an_image_and_the_cycle_a_reused_name_would_close():
    parents = {"middle": "bottom", "bottom": None, "top": "middle"}
    assert chain("new", "top", parents) == ["new", "top", "middle", "bottom"]
    # "bottom" was deleted and is made again on "top": top → middle → bottom → top
    with pytest.raises(stacks.StackError, match="bottom → top → middle → bottom"):
        chain("bottom", "top", parents)
    with pytest.raises(stacks.StackError, match="self → self"):
        chain("self", "self", {})


def test_a_stack_deeper_than_the_limit_is_refused():
    # level-0 on level-1 ... on level-(n-1), a plain base: n images below a new one
    def levels(n):
        return {f"level-{i}": (f"level-{i + 1}" if i < n - 1 else None) for i in range(n)}
    assert len(chain("new", "level-0", levels(stacks.MAX_DEPTH))) == stacks.MAX_DEPTH + 1
    with pytest.raises(stacks.StackError, match=f"at most {stacks.MAX_DEPTH} deep"):
        chain("new", "level-0", levels(stacks.MAX_DEPTH + 1))


def test_images_above_one_come_nearest_first_and_a_cycle_is_walked_once():
    parents = {"a": None, "b": "a", "c": "b", "d": "a", "e": "c", "other": None, "x": "y", "y": "x"}
    order = stacks.below("a", parents)
    assert order[:2] == ["b", "d"] and order[2:] == ["c", "e"]
    assert stacks.below("x", parents) == ["y"]
    assert list(stacks.direct_children("a", parents)) == ["b", "d"]


def test_validation_keeps_a_cnbi_base_and_names_the_field_when_it_names_nothing():
    body = {"spec": {"buildType": "PackageList", "baseImage": "cnbi:team-base", "packageVersions": ["six"]}}
    assert model.validate_new_object(body, creator="a")["spec"]["baseImage"] == "cnbi:team-base"
    body["spec"]["baseImage"] = "cnbi:Not_A_Name"
    with pytest.raises(model.InvalidObject) as raised:
        model.validate_new_object(body, creator="a")
    assert raised.value.field == "spec.baseImage" and "does not name an image" in raised.value.message


def image(name, creator="alice", base=None, status=None, annotations=None, shared=False):
    spec = {"buildType": "PackageList", "packageVersions": ["six"],
            "baseImage": stacks.reference(base) if base else "localhost/cnbi/notebook-base:py311-user"}
    obj = model.validate_new_object({"metadata": {"name": name}, "spec": spec}, creator=creator)
    obj["metadata"]["annotations"].update(annotations or {})
    if shared:
        obj["metadata"]["annotations"][model.ANNOTATION_SHARED] = "true"
    obj["status"] = {**model.initial_status(), **(status or {})}
    return obj


def test_an_image_is_built_only_on_the_image_its_creator_was_allowed_to_build_on():
    parent = {**image("team-base", creator="bob", shared=True), "metadata": {
        **image("team-base", creator="bob", shared=True)["metadata"], "uid": "uid-1"}}
    child = image("mine", base="team-base", annotations={model.ANNOTATION_BASE_UID: "uid-1"})
    assert stacks.refusal(child, parent) is None
    # deleted, and someone made a new team-base: not the image alice chose
    replaced = {**parent, "metadata": {**parent["metadata"], "uid": "uid-2"}}
    assert "deleted and a new image took its name" in stacks.refusal(child, replaced)
    # bob stopped sharing it
    private = copy.deepcopy(parent)
    del private["metadata"]["annotations"][model.ANNOTATION_SHARED]
    assert "no longer shared" in stacks.refusal(child, private)
    # and the words of a failure reach only those who may see that image
    assert stacks.failure_words(parent, child, "BuildFailed: x").startswith("team-base failed (")
    assert stacks.failure_words(private, child, "BuildFailed: x") == "an image below it failed to rebuild"


async def test_after_a_new_build_only_the_images_that_need_it_are_rebuilt_and_only_once(tmp_path):
    """The engine's follow-up of a new build, on a real store without builds: images built on
    the old build are rebuilt; a cancelled one, one that failed on its own, one whose own
    Containerfile names its base, and one whose base was replaced under its name are not; a
    second round starts nothing (no rebuild loops)."""
    from cnbi_hub.controller.builders.podman import PodmanBuilder
    from cnbi_hub.controller.phases import PhaseWork
    from cnbi_hub.controller.runner import EmbeddedRunner
    from cnbi_hub.controller.statemachine import failure_of
    from cnbi_hub.store.sqlite import SQLImageStore

    store = SQLImageStore(f"sqlite:///{tmp_path}/cnbi.sqlite")
    runner = EmbeddedRunner(store=store, phases=PhaseWork(store=store, builder=PodmanBuilder()))
    new = "sha256:" + "2" * 64
    base = await store.create(image("base", status={"phase": "Ready", "image": f"localhost/cnbi/base@{new}"}))

    def failed(reason):
        return {"phase": "Failed", "conditions": [
            {"type": "BuildingImage", "status": "False", "reason": reason, "message": reason,
             "lastTransitionTime": "2026-11-23T10:00:00Z"}]}

    pinned = {model.ANNOTATION_BASE_UID: base["metadata"]["uid"]}
    old = {"phase": "Ready", "image": "localhost/cnbi/x@sha256:1", "baseImageDigest": "sha256:" + "1" * 64}
    children = {
        "on-old-build": image("on-old-build", base="base", status=old, annotations=pinned),
        "base-had-failed": image("base-had-failed", base="base", status=failed("BaseImageFailed"), annotations=pinned),
        "cancelled": image("cancelled", base="base", status=failed("Cancelled"), annotations=pinned),
        "failed-itself": image("failed-itself", base="base", status=failed("BuildFailed"), annotations=pinned),
        "own-containerfile": image("own-containerfile", base="base", status={**old, "recipe": "containerfile"},
                                   annotations=pinned),
        "chose-another-base": image("chose-another-base", base="base", status=old,
                                    annotations={model.ANNOTATION_BASE_UID: "an-image-deleted-since"}),
        "on-new-build": image("on-new-build", base="base", status={**old, "baseImageDigest": new}, annotations=pinned),
    }
    for obj in [base, *[await store.create(child) for child in children.values()]]:
        runner._note(obj)
    assert await runner._follow_base_now("base") == 2
    after = {name: await store.get(name) for name in children}
    rebuilt = {name for name, obj in after.items() if obj["status"].get("run") == 2}
    assert rebuilt == {"on-old-build", "base-had-failed"}
    for name in rebuilt:
        trigger = after[name]["status"]["triggers"][-1]
        assert (trigger["kind"], trigger["image"], trigger["to"]) == ("baseImage", "cnbi:base", new)
    assert (failure_of(after["cancelled"]["status"]) or {}).get("reason") == "Cancelled"  # a cancel stays
    [note] = [c for c in after["chose-another-base"]["status"]["conditions"]
              if c["type"] == model.CONDITION_BASE_CURRENT]
    assert note["reason"] == "BaseImageNotUsable" and "took its name" in note["message"]
    # the rebuilt ones are Pending now and take the newest when they begin: nothing more
    for obj in after.values():
        runner._note(obj)
    assert await runner._follow_base_now("base") == 0

    # the base's next run fails: the image on its build keeps it, with a note; the run after
    # ends Ready on that same build: nothing to rebuild, and the note goes
    failing = await store.update_status("base", {**base["status"], **failed("BuildFailed")})
    runner._note(failing)
    await runner._follow_base_now("base")
    noted = await store.get("on-new-build")
    assert model.phase_of(noted) == "Ready" and noted["status"]["baseNoteFrom"] == "base"
    [note] = [c for c in noted["status"]["conditions"] if c["type"] == model.CONDITION_BASE_CURRENT]
    assert note["status"] == "False" and note["message"].startswith("base failed (BuildFailed: BuildFailed)")
    again = await store.update_status("base", base["status"])
    runner._note(again)
    assert await runner._follow_base_now("base") == 0
    cleared = await store.get("on-new-build")
    assert "baseNoteFrom" not in cleared["status"]
    assert not [c for c in cleared["status"]["conditions"] if c["type"] == model.CONDITION_BASE_CURRENT]
