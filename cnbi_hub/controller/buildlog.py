"""A build log that keeps its head and its tail: the first lines say what was asked, the last
lines say what went wrong, and a build that prints a million lines must not fill the disk."""

from __future__ import annotations

from collections import deque


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
