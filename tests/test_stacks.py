"""Stacks, the pure part: an image built on another CustomNBImage (`cnbi:<name>`), the chain
above one, cycles and depth, and the order in which the images above one are rebuilt."""

import asyncio

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
