"""A build log that keeps its head and its tail: the first lines say what was asked, the last
lines say what went wrong, and a build that prints a million lines must not fill the disk."""

from __future__ import annotations

from collections import deque

from .. import model


class BuildLog:
    def __init__(self, head: int = 100, tail: int = 2000, initial_text: str = ""):
        self.head_size = head
        self.head: list[str] = []
        self.tail: deque[str] = deque(maxlen=tail)
        self.total = 0
        for line in initial_text.splitlines():
            self.append(line)

    def append(self, line: str) -> None:
        self.total += 1
        if len(self.head) < self.head_size:
            self.head.append(line)
        else:
            self.tail.append(line)

    @property
    def dropped(self) -> int:
        return self.total - len(self.head) - len(self.tail)

    def text(self) -> str:
        lines = list(self.head)
        if self.dropped:
            lines.append(f"[... {self.dropped} lines not kept ...]")
        lines.extend(self.tail)
        return "\n".join(lines) + ("\n" if lines else "")


def appended_lines(before: str, after: str) -> list[str]:
    """The lines `after` has that `before` did not: what was written between two reads of a
    log kept elsewhere (cluster mode: the operator's copy in the store). A log that dropped
    lines from its middle (BuildLog's head and tail) is matched on `before`'s last lines."""
    old, new = before.splitlines(), after.splitlines()
    if new[:len(old)] == old:
        return new[len(old):]
    for k in range(min(len(old), 20), 0, -1):  # the longest recent stretch of `before` in `after`
        tail = old[-k:]
        for start in range(len(new) - k, -1, -1):
            if new[start:start + k] == tail:
                return new[start + k:]
    return new  # nothing in common (a new run's log): all of it is new


def transition_line(before: str, after: str, reason: str, message: str = "") -> str:
    """The log line that says a run moved from phase `before` to `after`, and why."""
    return f"==> {before} -> {after} ({reason})" + (f": {message}" if message else "")


def reuse_log(status: dict) -> str:
    """The log of a run that reused an identical image before any work of its own (an import
    finished at once, `EmbeddedRunner._reuse`): no log is stored for it, because its status
    holds what its lines said (the pinned image, and Prepare's condition). "" for any other run."""
    reused = next((c for c in status.get("conditions", []) if c.get("type") == model.CONDITION_PREPARED), {})
    if status.get("phase") != model.PHASE_READY or reused.get("reason") != "Reused":
        return ""
    lines = [f"pinned {status['resolvedBaseImage']}"] if status.get("resolvedBaseImage") else []
    lines.append(transition_line(model.PHASE_PENDING, model.PHASE_READY, "Reused", reused.get("message", "")))
    return "\n".join(lines) + "\n"
