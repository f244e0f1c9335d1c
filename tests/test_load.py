"""Load on the real service and engine (bounded, 127.0.0.1 only): 100 image requests from 20 users
at once (each accepted or refused with a clear status, none lost, never more in work than the
build slots, every accepted image Ready or Failed); 200 clients on event streams while images
are built (each sees every phase change of its image; the service's memory measured)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from cnbi_hub import model
from tests.hubfixtures import ADMIN

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

    # the engine drives them all; at no moment are more than its slots in work. One listing (the
    # admin's: one read of the store) is one moment; twenty users' listings one after another
    # would add up phases seen at different moments
    admin = hub.token(ADMIN)
    most_in_work, deadline = 0, time.monotonic() + 900
    try:
        while True:
            everyone = (await hub.api("GET", "api/images", admin)).json()["items"]
            mine = [o for o in everyone if model.name_of(o) in created]
            most_in_work = max(most_in_work, sum(model.phase_of(o) in IN_WORK for o in mine))
            if all(model.phase_of(o) in model.TERMINAL_PHASES for o in mine):
                break
            assert time.monotonic() < deadline, {model.name_of(o): model.phase_of(o) for o in mine}
            await asyncio.sleep(0.2)
        # none lost, none doubled: each user lists exactly the four accepted
        assert sorted(model.name_of(o) for o in mine) == sorted(created)
        for u, token in enumerate(tokens):
            listed = [o for o in (await hub.api("GET", "api/images", token)).json()["items"]
                      if model.name_of(o) in created]
            assert len(listed) == PER_USER - 1 and {model.creator_of(o) for o in listed} == {f"load-{u}"}, listed
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


STREAM_CLIENTS = 200
STREAM_IMAGES = 10  # 2 users x 5 (the session hub's max_images_per_user)


def service_rss_kb(service_proc) -> int:
    for line in Path(f"/proc/{service_proc.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class PhaseWatcher:
    """One event-stream client: the phases its image goes through, as the stream tells them."""

    def __init__(self):
        self.phases: list[str] = []
        self.buffer = ""
        self.done = asyncio.Event()

    def received(self, chunk: bytes) -> None:
        self.buffer += chunk.decode()
        while "\n\n" in self.buffer:
            message, self.buffer = self.buffer.split("\n\n", 1)
            fields = dict(line.split(": ", 1) for line in message.splitlines() if ": " in line)
            if fields.get("event") != "object":
                continue
            phase = model.phase_of(json.loads(fields["data"]))
            if not self.phases or self.phases[-1] != phase:
                self.phases.append(phase)
            if phase in model.TERMINAL_PHASES:
                self.done.set()


@pytest.mark.podman
async def test_two_hundred_event_streams_each_see_every_phase_change_and_memory_stays_bounded(
        hub, notebook_base_images, service_proc):
    tokens = [hub.token(f"streams-{i}") for i in range(2)]
    client = AsyncHTTPClient(force_instance=True, max_clients=STREAM_CLIENTS + 10)
    sources = [notebook_base_images["user"], notebook_base_images["root"]]
    before = service_rss_kb(service_proc)
    names, fetches, watchers = [], [], []
    try:
        for i in range(STREAM_IMAGES):
            token = tokens[i % 2]
            r = await hub.api("POST", "api/images", token, import_of(sources[i % 2], i))
            assert r.code == 201, r.body
            names.append((token, r.json()["metadata"]["name"]))
        for k in range(STREAM_CLIENTS):
            token, name = names[k % STREAM_IMAGES]
            watcher = PhaseWatcher()
            watchers.append((name, watcher))
            request = HTTPRequest(hub.service_url + f"api/images/{name}/events",
                                  headers={"Authorization": f"token {token}"}, request_timeout=900,
                                  streaming_callback=watcher.received)
            fetches.append(asyncio.ensure_future(client.fetch(request, raise_error=False)))
        peak = before
        deadline = time.monotonic() + 900
        while not all(w.done.is_set() for _, w in watchers):
            peak = max(peak, service_rss_kb(service_proc))
            assert time.monotonic() < deadline, sum(w.done.is_set() for _, w in watchers)
            await asyncio.sleep(0.2)
        peak = max(peak, service_rss_kb(service_proc))
        # every client saw every phase change its image went through after it connected: the
        # same as the other 19 on that image (the longest sequence any of them saw, from where
        # it joined), and that sequence is the run's own (`phaseTimes` also names phases a
        # reused import passes within one write: it may name more)
        for token, name in names:
            seen = [w.phases for n, w in watchers if n == name]
            longest = max(seen, key=len)
            went = list((await hub.api("GET", f"api/images/{name}", token)).json()["status"]["phaseTimes"])
            assert longest[-1] == "Ready", (name, longest, went)
            assert [p for p in went if p in longest] == longest, (name, longest, went)
            for phases in seen:
                assert phases == longest[longest.index(phases[0]):], (name, phases, longest)
        connected_with_work = sum(len(w.phases) > 1 for _, w in watchers)
        print(f"service memory: {before / 1024:.0f} MB before, {peak / 1024:.0f} MB at most with "
              f"{STREAM_CLIENTS} streams ({connected_with_work} saw at least one change)")
        assert connected_with_work > 0
        assert peak - before < 150 * 1024, (before, peak)  # the streams hold no more than this
    finally:
        for fetch in fetches:
            fetch.cancel()
        client.close()
        for token, name in names:
            await hub.api("DELETE", f"api/images/{name}", token)
