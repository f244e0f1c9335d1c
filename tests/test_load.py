"""Load on the real service and engine (bounded, 127.0.0.1 only): 100 image requests from 20 users
at once. Each is accepted or refused with a clear status, none is lost, the engine never works on
more images than its build slots, and every accepted image ends Ready or Failed."""

from __future__ import annotations

import asyncio
import time

import pytest

from cnbi_hub import model

USERS = 20
PER_USER = 5  # the session hub's max_images_per_user: the fifth valid one would be refused
SLOTS = 2  # the session hub's max_concurrent_builds
IN_WORK = (model.PHASE_PREPARE, model.PHASE_RESOLVING, model.PHASE_BUILDING)


def import_of(source: str, i: int) -> dict:
    return {"metadata": {"annotations": {model.ANNOTATION_DISPLAY_NAME: f"load {i}"}},
            "spec": {"buildType": "ImageImport", "fromImage": source}}


@pytest.mark.podman
async def test_a_hundred_requests_at_once_are_each_answered_none_lost_and_slots_held(hub, notebook_base_images):
    tokens = [hub.token(f"load-{i}") for i in range(USERS)]
    sources = [notebook_base_images["user"], notebook_base_images["root"]]
    requests = []
    for u, token in enumerate(tokens):
        for k in range(PER_USER - 1):
            requests.append((token, import_of(sources[(u + k) % 2], u * PER_USER + k)))
        # and one bad one each: a refusal that names its field, in the same burst
        requests.append((token, {"spec": {"buildType": "ImageImport", "fromImage": "not a reference"}}))
    assert len(requests) == 100

    answers = await asyncio.gather(*(hub.api("POST", "api/images", token, body) for token, body in requests))
    codes = [r.code for r in answers]
    assert codes.count(201) == 80 and codes.count(422) == 20, sorted(set(codes))
    assert {r.json()["field"] for r in answers if r.code == 422} == {"spec.fromImage"}
    created = {r.json()["metadata"]["name"] for r in answers if r.code == 201}

    # the engine drives them all; at no moment are more than its slots in work
    most_in_work, deadline = 0, time.monotonic() + 900
    try:
        while True:
            mine = []
            for token in tokens:
                mine += [o for o in (await hub.api("GET", "api/images", token)).json()["items"]
                         if model.name_of(o) in created]
            most_in_work = max(most_in_work, sum(model.phase_of(o) in IN_WORK for o in mine))
            if all(model.phase_of(o) in model.TERMINAL_PHASES for o in mine):
                break
            assert time.monotonic() < deadline, {model.name_of(o): model.phase_of(o) for o in mine}
            await asyncio.sleep(0.2)
        # none lost, none doubled: each user lists exactly the four accepted
        assert sorted(model.name_of(o) for o in mine) == sorted(created)
        assert 1 <= most_in_work <= SLOTS, most_in_work  # seen working, never beyond its slots
        failed = {model.name_of(o): (o["status"].get("conditions") or []) for o in mine
                  if model.phase_of(o) != model.PHASE_READY}
        assert not failed, failed  # two local images, each validated once: every import is Ready
        assert {o["status"]["image"].rpartition("@")[2] for o in mine} == {
            (await hub.api("GET", f"api/check-image?image={source}", tokens[0])).json()["digest"] for source in sources}
    finally:
        for token in tokens:
            for obj in (await hub.api("GET", "api/images", token)).json()["items"]:
                await hub.api("DELETE", f"api/images/{model.name_of(obj)}", token)
