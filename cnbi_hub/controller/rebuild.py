"""Starting a new run of a finished image, whoever asks: its owner (api/images/{name}/rebuild),
a push webhook (api/webhooks/...), or the engine, when a push arrived while the image built an
older commit and that run has ended. The finished run's log moves to the log history; status
starts a new run that records its trigger."""

from __future__ import annotations

from .. import model
from .statemachine import rebuilt

# the logs route keeps the newest part of many runs' logs (each run's own is capped by BuildLog)
MAX_LOG_HISTORY_CHARS = 4 * 1024 * 1024


async def full_log(store, name: str) -> str:
    """Every run's log: the earlier runs' (kept at each rebuild) and the current run's."""
    earlier = await store.get_artifact(name, "log-history") or ""
    current = await store.get_artifact(name, "log") or ""
    text = earlier + ("\n" if earlier and current and not earlier.endswith("\n") else "") + current
    if len(text) > MAX_LOG_HISTORY_CHARS:
        text = "[earlier runs cut]\n" + text[-MAX_LOG_HISTORY_CHARS:].split("\n", 1)[-1]
    return text


async def start_rebuild(store, obj: dict, by: str, trigger: dict | None = None) -> dict:
    """Send the finished `obj` through its phases again; Conflict if it changed since it was read."""
    name, uid = model.name_of(obj), obj["metadata"]["uid"]
    await store.put_artifact(name, "log-history", await full_log(store, name), uid=uid)
    await store.put_artifact(name, "log", "", uid=uid)
    return await store.update_status(name, rebuilt(obj, by, trigger=trigger), obj["metadata"]["resourceVersion"])
