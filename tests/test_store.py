"""The embedded store: atomic writes, optimistic concurrency, durability, change feed."""

import asyncio
import threading

import pytest

from cnbi_hub import model
from cnbi_hub.store.base import AlreadyExists, Conflict, NotFound, modify_status
from cnbi_hub.store.sqlite import SQLImageStore


def new_object(name, owner="alice"):
    obj = model.validate_new_object(
        {"metadata": {"name": name}, "spec": {"buildType": "ImageImport", "fromImage": "quay.io/a/b:1"}},
        creator=owner,
    )
    return obj


@pytest.fixture
def db_url(tmp_path):
    return f"sqlite:///{tmp_path}/cnbi.sqlite"


async def test_create_get_list_delete(db_url):
    store = SQLImageStore(db_url)
    created = await store.create(new_object("one"))
    assert created["metadata"]["resourceVersion"] == "1"
    assert created["status"]["phase"] == "Pending"
    assert created["metadata"]["uid"]
    with pytest.raises(AlreadyExists):
        await store.create(new_object("one"))
    await store.create(new_object("two", owner="bob"))
    assert [model.name_of(o) for o in await store.list()] == ["one", "two"]
    assert [model.name_of(o) for o in await store.list(owner="bob")] == ["two"]
    two = await store.get("two")
    await store.update_status("two", {**two["status"], "phase": "Ready", "specHash": "sha256:" + "a" * 64})
    assert [model.name_of(o) for o in await store.list(phase="Ready", spec_hash="sha256:" + "a" * 64)] == ["two"]
    assert await store.list(spec_hash="sha256:" + "b" * 64) == []
    await store.delete("one")
    with pytest.raises(NotFound):
        await store.get("one")


async def test_stale_write_fails_and_modify_retries(db_url):
    store = SQLImageStore(db_url)
    obj = await store.create(new_object("race"))
    version = obj["metadata"]["resourceVersion"]
    await store.update_status("race", {**obj["status"], "phase": "Prepare"}, version)
    with pytest.raises(Conflict):
        await store.update_status("race", {**obj["status"], "phase": "Failed"}, version)
    assert (await store.get("race"))["status"]["phase"] == "Prepare"
    # a copy the caller already has (from the change feed) is tried first; stale, it is read again
    seen = []

    def to_building(current):
        seen.append(current["metadata"]["resourceVersion"])
        return {**current["status"], "phase": "Building"}

    written = await modify_status(store, "race", to_building, known=obj)
    assert written["status"]["phase"] == "Building"
    assert seen[0] == version and len(seen) == 2 and seen[1] != version


async def test_artifacts_are_written_only_for_the_image_the_writer_means(db_url):
    store = SQLImageStore(db_url)
    old = await store.create(new_object("twice"))
    await store.put_artifact("twice", "log", "old\n", uid=old["metadata"]["uid"])
    await store.delete("twice")
    await store.create(new_object("twice"))
    with pytest.raises(NotFound):
        await store.put_artifact("twice", "log", "stale\n", uid=old["metadata"]["uid"])
    assert await store.get_artifact("twice", "log") is None


def test_no_lost_update_between_two_processes_sharing_the_database(db_url):
    """Two stores (as two processes would) each add 50 marks to the same object concurrently."""
    setup = SQLImageStore(db_url)
    asyncio.run(setup.create(new_object("counter")))

    def writer(tag):
        store = SQLImageStore(db_url)

        async def run():
            for i in range(50):
                def add_mark(obj):
                    status = obj["status"]
                    status.setdefault("marks", []).append(f"{tag}{i}")
                    return status
                await modify_status(store, "counter", add_mark, attempts=200)

        asyncio.run(run())

    threads = [threading.Thread(target=writer, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    marks = asyncio.run(setup.get("counter"))["status"]["marks"]
    assert sorted(marks) == sorted([f"a{i}" for i in range(50)] + [f"b{i}" for i in range(50)])


async def test_objects_survive_reopening(db_url):
    store = SQLImageStore(db_url)
    await store.create(new_object("durable"))
    await store.put_artifact("durable", "lock", "six==1.16.0 --hash=sha256:abc\n")
    store.close()
    reopened = SQLImageStore(db_url)
    assert model.name_of(await reopened.get("durable")) == "durable"
    assert (await reopened.get_artifact("durable", "lock")).startswith("six==")


async def test_watch_sees_every_change_in_order(db_url):
    store = SQLImageStore(db_url)
    with store.watch() as changes:
        obj = await store.create(new_object("watched"))
        await store.update_status("watched", {**obj["status"], "phase": "Prepare"})
        await store.delete("watched")
        events = [await changes.get(timeout=1) for _ in range(3)]
    assert [e.type for e in events] == ["ADDED", "MODIFIED", "DELETED"]
    assert events[1].object["status"]["phase"] == "Prepare"


async def test_replace_keeps_status_and_bumps_generation_on_spec_change(db_url):
    store = SQLImageStore(db_url)
    obj = await store.create(new_object("gen"))
    await store.update_status("gen", {**obj["status"], "phase": "Ready"})
    current = await store.get("gen")
    current["spec"]["fromImage"] = "quay.io/a/b:2"
    current["status"] = {"phase": "Pending"}  # ignored: status has its own subresource
    written = await store.replace(current)
    assert written["status"]["phase"] == "Ready"
    assert written["metadata"]["generation"] == 2
    with pytest.raises(Conflict):
        await store.replace(current)  # current carries the old resourceVersion


async def test_a_users_list_is_theirs_and_what_is_shared_with_them_in_this_namespace_only(db_url):
    """Listing looks images up by owner, shared flag and group (indexed: benchmarks/load.py);
    another namespace's images never show, whatever they are shared with."""
    here, there = SQLImageStore(db_url, namespace="here"), SQLImageStore(db_url, namespace="there")
    await here.create(new_object("mine"))
    await here.create(new_object("bobs", owner="bob"))
    everyone = new_object("for-all", owner="bob")
    everyone["metadata"]["annotations"][model.ANNOTATION_SHARED] = "true"
    await here.create(everyone)
    team = new_object("for-team", owner="carol")
    team["metadata"]["annotations"] = model.with_shared_groups(team["metadata"]["annotations"], ["team"])
    await here.create(team)
    for store in (there,):  # the same in another namespace: never listed here
        await store.create(new_object("mine-there"))
        shared_there = new_object("team-there", owner="carol")
        shared_there["metadata"]["annotations"] = model.with_shared_groups(
            shared_there["metadata"]["annotations"], ["team"])
        await store.create(shared_there)

    def names(objs):
        return [model.name_of(o) for o in objs]

    assert names(await here.list(owner="alice")) == ["mine"]
    assert names(await here.list(owner="alice", include_shared=True)) == ["mine", "for-all"]
    assert names(await here.list(owner="alice", include_shared=True, groups=["team"])) == ["mine", "for-all", "for-team"]
    assert names(await here.list(owner="alice", include_shared=True, groups=["team"], phase="Ready")) == []
    assert names(await there.list(owner="alice", include_shared=True, groups=["team"])) == ["mine-there", "team-there"]
    assert names(await here.list()) == ["mine", "bobs", "for-all", "for-team"]


def _hold_the_write_lock(db_url):
    """Another process's transaction holding SQLite's write lock (BEGIN IMMEDIATE)."""
    import sqlite3

    other = sqlite3.connect(db_url.removeprefix("sqlite:///"), timeout=0, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    return other


async def test_a_write_waits_out_another_writers_lock_and_the_event_loop_runs_on(db_url):
    store = SQLImageStore(db_url)
    await store.create(new_object("before"))
    other = _hold_the_write_lock(db_url)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    try:
        write = asyncio.create_task(store.create(new_object("during")))
        await asyncio.sleep(1.0)
        assert not write.done()  # it waits for the lock...
        assert ticks >= 5, ticks  # ...between tries, not inside the event loop (a 10 s busy wait gave 0)
        assert model.name_of(await store.get("before")) == "before"  # reads go on (WAL)
        other.execute("ROLLBACK")
        created = await asyncio.wait_for(write, 10)
    finally:
        ticking.cancel()
        other.close()
    assert model.name_of(await store.get("during")) == model.name_of(created) == "during"


async def test_a_lock_held_too_long_is_a_503_store_busy_and_nothing_is_half_written(db_url):
    from cnbi_hub.store.base import StoreBusy

    store = SQLImageStore(db_url, lock_timeout=0.5)
    obj = await store.create(new_object("kept"))
    other = _hold_the_write_lock(db_url)
    try:
        with pytest.raises(StoreBusy) as refused:
            await store.create(new_object("refused"))
        assert refused.value.status_code == 503 and "locked by another process" in refused.value.message
        with pytest.raises(StoreBusy):
            await store.update_status("kept", {"phase": "Failed"}, obj["metadata"]["resourceVersion"])
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert [model.name_of(o) for o in await store.list()] == ["kept"]
    assert (await store.get("kept"))["status"] == obj["status"]
    await store.create(new_object("refused"))  # the lock gone, the same write goes through


@pytest.fixture
def full_disk(tmp_path):
    from tests.infra_disk import fill_up, small_disk

    with small_disk(tmp_path / "small-disk", 4) as mount:
        yield mount, lambda: fill_up(mount)


async def test_a_full_disk_is_a_507_store_full_and_nothing_is_half_written(full_disk):
    """The database's disk really full (ENOSPC): the write is refused whole, reads go on, and
    once there is space again writes do too."""
    from cnbi_hub.store.base import StoreFull

    mount, fill = full_disk
    store = SQLImageStore(f"sqlite:///{mount}/cnbi.sqlite")
    await store.create(new_object("before"))
    await store.put_artifact("before", "log", "the log so far\n")
    filler = fill()
    created, logged = ["before"], {"before": "the log so far\n"}
    with pytest.raises(StoreFull) as refused:
        for i in range(50):  # SQLite may find room in pages it already has: the disk fills up
            await store.create(new_object(f"while-full-{i}"))
            created.append(f"while-full-{i}")
            await store.put_artifact(f"while-full-{i}", "log", "x" * 65536)
            logged[f"while-full-{i}"] = "x" * 65536
    assert refused.value.status_code == 507 and "is full" in refused.value.message
    assert str(mount) not in refused.value.message  # the server's paths are the admin's, in the log
    # what answered is there whole, what was refused left no trace
    assert [model.name_of(o) for o in await store.list()] == created
    for name in created:
        assert await store.get_artifact(name, "log") == logged.get(name)
    made = created
    filler.unlink()
    await store.create(new_object("after"))
    store.close()
    reopened = SQLImageStore(f"sqlite:///{mount}/cnbi.sqlite")
    assert [model.name_of(o) for o in await reopened.list()] == made + ["after"]
    reopened.close()
