"""Running a helper program (git, uv) from the event loop, bounded in time.

One place for the rule every caller needs: on a timeout, and on cancellation (an image deleted
while it resolves), the child is killed and reaped, never left running for nobody.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass
class Completed:
    returncode: int
    stdout: str
    stderr: str


async def run_process(argv: list[str], *, timeout: float, env: dict | None = None, cwd=None) -> Completed:
    """Run `argv` (never a shell line) with no stdin; raises asyncio.TimeoutError after `timeout`."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:  # timeout or cancellation
        if proc.returncode is None:
            proc.kill()
        await asyncio.shield(proc.wait())
        raise
    return Completed(proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))
