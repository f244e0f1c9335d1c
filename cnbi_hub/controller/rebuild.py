"""Starting a new run of a finished image, whoever asks: its owner (api/images/{name}/rebuild),
a push webhook (api/webhooks/...), or the engine, when a push arrived while the image built an
older commit and that run has ended. The finished run's log moves to the log history; status
starts a new run that records its trigger."""

from __future__ import annotations

from .. import generations, model, webhooks
from ..store.base import Conflict, NotFound, modify_status
from .buildlog import reuse_log
from .statemachine import rebuild_after_this_run, rebuilt

#: how many earlier Ready builds an image keeps to go back to (EmbeddedRunner.keep_generations)
KEEP_GENERATIONS = 5

# the logs route keeps the newest part of many runs' logs (each run's own is capped by BuildLog)
MAX_LOG_HISTORY_CHARS = 4 * 1024 * 1024


async def full_log(store, obj: dict) -> str:
    """Every run's log: the earlier runs' (kept at each rebuild) and the current run's (for a
    run that reused an image at once, said from its status: none is stored)."""
    name = model.name_of(obj)
    earlier = await store.get_artifact(name, "log-history") or ""
    current = await store.get_artifact(name, "log") or reuse_log(obj.get("status") or {})
    text = earlier + ("\n" if earlier and current and not earlier.endswith("\n") else "") + current
    if len(text) > MAX_LOG_HISTORY_CHARS:
        text = "[earlier runs cut]\n" + text[-MAX_LOG_HISTORY_CHARS:].split("\n", 1)[-1]
    return text


async def start_rebuild(store, obj: dict, by: str, trigger: dict | None = None, restore: dict | None = None) -> dict:
    """Send the finished `obj` through its phases again; Conflict if it changed since it was read.
    A Ready build is kept as a generation to go back to (retention deletes the images of those
    beyond `keep_generations`). With `restore` (a kept build's record), the run builds that
    build again: its commit, its base by digest and its lock, not what the spec names now."""
    name, uid = model.name_of(obj), obj["metadata"]["uid"]
    # read before: once the status is written, a new run may log and resolve a new lock
    history = await full_log(store, obj)
    kept = await _generations_with_current(store, obj)
    status = rebuilt(obj, by, trigger=trigger)
    if restore is not None:
        status["restoring"] = generations.restoring(restore)
    written = await store.update_status(name, status, obj["metadata"]["resourceVersion"])
    # only a rebuild that happened moves the log (a lost write moved nothing); the new run's
    # engine keeps its log in memory and writes all of it at each flush
    if kept is not None:
        await store.put_artifact(name, "generations", generations.dump_saved(kept), uid=uid)
    if restore is not None:
        await store.put_artifact(name, "lock", restore.get("lock", ""), uid=uid)  # Resolving installs it as it is
    await store.put_artifact(name, "log-history", history, uid=uid)
    await store.put_artifact(name, "log", "", uid=uid)
    return written


async def build_again(store, obj: dict, run: int, by: str) -> dict:
    """Build run `run`'s kept build of the finished `obj` again (retention removed its image;
    its record keeps the commit, base digest and lock): a new run that ends Ready on an image
    with the same packages. KeyError when no such generation is saved."""
    record = (await saved_generations(store, model.name_of(obj)))[run]
    trigger = {"kind": "restore", "by": by, "at": model.now_iso(), "toRun": run}
    return await start_rebuild(store, obj, by, trigger, restore=record)


async def _generations_with_current(store, obj: dict, without: int | None = None) -> dict | None:
    """The saved generations plus the current Ready build of `obj` (None: nothing to save)."""
    name = model.name_of(obj)
    record = generations.saved_generation(obj.get("status") or {}, await store.get_artifact(name, "lock"))
    saved = generations.parse_saved(await store.get_artifact(name, "generations"))
    if without is not None:
        saved.pop(without, None)
    elif record is None:
        return None
    return generations.with_saved(saved, record)


async def saved_generations(store, name: str) -> dict[int, dict]:
    return generations.parse_saved(await store.get_artifact(name, "generations"))


async def roll_back(store, obj: dict, run: int, by: str) -> dict:
    """Make run `run`'s saved build of the finished `obj` current again, without a build: its
    image, packages and lock; the build it replaces is saved in its turn. KeyError when no
    such generation is saved or retention removed its image; Conflict if `obj` changed since
    it was read."""
    name, uid = model.name_of(obj), obj["metadata"]["uid"]
    record = generations.stored(await saved_generations(store, name))[run]
    history = await full_log(store, obj)
    kept = await _generations_with_current(store, obj, without=run)  # it is the current one now
    written = await store.update_status(name, generations.rolled_back(obj, record, by),
                                        obj["metadata"]["resourceVersion"])
    await store.put_artifact(name, "generations", generations.dump_saved(kept), uid=uid)
    await store.put_artifact(name, "lock", record.get("lock", ""), uid=uid)
    await store.put_artifact(name, "log-history", history, uid=uid)
    status = written.get("status") or {}
    await store.put_artifact(name, "log", f"=== Run {status.get('run')} · run {run}'s build made current again by "
                                          f"{by}, without a build · {status.get('completionTime')} ===\n", uid=uid)
    return written


async def rebuild_now_or_after_run(store, obj: dict, by: str, trigger: dict) -> str | None:
    """A finished `obj` is rebuilt now ("rebuilding"); one in work keeps `trigger` for when its
    run ends ("afterCurrentRun"); None when it finished between the read and this write (read
    it again and call once more). Conflict when it changed since it was read."""
    if model.phase_of(obj) in model.TERMINAL_PHASES:
        await start_rebuild(store, obj, by, trigger)
        return "rebuilding"
    written = await modify_status(store, model.name_of(obj), lambda current: rebuild_after_this_run(current, trigger))
    return None if model.phase_of(written) in model.TERMINAL_PHASES else "afterCurrentRun"


async def rebuild_for_push(store, obj: dict, push: webhooks.Push) -> str:
    """What a push does to an image that tracks its branch: "rebuilding" (finished: rebuilt
    now), "afterCurrentRun" (in work: the engine rebuilds it when this run ends) or "unchanged"
    (already built at the pushed commit, or deleted meanwhile). Conflict if it keeps changing."""
    name = model.name_of(obj)
    for _ in range(10):
        trigger = webhooks.trigger_record(push, obj)
        recorded = [*(obj.get("status") or {}).get("triggers", []), (obj.get("status") or {}).get("rebuildAfter") or {}]
        if any(t.get("kind") == "webhook" and t.get("to") == push.after for t in recorded):
            return "unchanged"  # this push was acted on before (a redelivery, or a replay with a new id)
        try:
            if (model.phase_of(obj) in model.TERMINAL_PHASES
                    and (obj.get("status") or {}).get("gitCommit") == push.after):
                return "unchanged"
            try:
                done = await rebuild_now_or_after_run(store, obj, f"{push.provider} webhook", trigger)
                if done:
                    return done
            except Conflict:
                pass  # it changed since it was read: read it again
            obj = await store.get(name)  # changed, or finished meanwhile: look again
        except NotFound:
            return "unchanged"
    raise Conflict(f"image {name} kept changing; deliver the push again")
