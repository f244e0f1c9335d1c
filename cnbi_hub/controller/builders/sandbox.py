"""What a build (or anything else that runs a user's image: inspections, acceptance checks) runs in.

A user controls what their build runs: a repository's Containerfile, postBuild, setup scripts,
and in an imported image whatever its Python runs at start-up. Two edges keep that code in:

- `IsolatedNetwork`: a network namespace of its own, connected to the outside through
  slirp4netns with `--disable-host-loopback`. The build reaches the internet (the package
  index, git hosts) as this machine does, but nothing listening on this machine's 127.0.0.1 —
  not the hub, the cnbi service, the registry or another build — and no abstract Unix socket
  of the host (those are per network namespace). Addresses inside are TEST-NET-2
  (198.51.100.0/24), never a private range.
- `BuildCgroup`: one cgroup (v1, cgroupfs: what podman uses here) per build, above the ones
  podman makes for each step (`--cgroup-parent=<ours>/build`: podman removes the cgroup it is
  given when a step ends, so the limits sit one level up). Memory, CPU and process limits hold
  for the whole build, every step together; afterwards it tells what the build used, whether
  it hit a limit, and stops anything still running in it.

Both are set up by the builder for each podman call that runs user code, and taken down after
it. They fail closed: a build is never run on the host network because isolation failed.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import secrets
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# TEST-NET-2 (RFC 5737): inside the namespace only; slirp4netns puts its gateway on .2 and its
# DNS forwarder on .3, the build on .100
SANDBOX_CIDR = "198.51.100.0/24"
SLIRP_MTU = 65520
SETUP_TIMEOUT = 10.0
CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_PREFIX = "cnbi"
CPU_PERIOD_US = 100_000


class SandboxError(RuntimeError):
    """The isolation a build needs could not be set up (the build does not run)."""


def die_with_parent(sig: int = signal.SIGKILL):
    """A `preexec_fn` asking the kernel (PR_SET_PDEATHSIG, 1) to send `sig` to the child when
    the service dies: a killed service leaves nothing it started running for nobody."""

    def ask_the_kernel() -> None:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, sig)
        except (OSError, AttributeError):
            pass

    return ask_the_kernel


class IsolatedNetwork:
    """A network namespace with a way out but no way back to this machine's loopback.

    Use as ``async with IsolatedNetwork() as network: podman build --network=network.podman_arg``.
    """

    def __init__(self, slirp4netns: str = "slirp4netns", unshare: str = "unshare"):
        self.slirp4netns = slirp4netns
        self.unshare = unshare
        self._holder: asyncio.subprocess.Process | None = None
        self._slirp: asyncio.subprocess.Process | None = None
        self._slirp_log = None

    @property
    def path(self) -> str:
        return f"/proc/{self._holder.pid}/ns/net"

    @property
    def podman_arg(self) -> str:
        return f"--network=ns:{self.path}"

    async def __aenter__(self) -> "IsolatedNetwork":
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _start(self) -> None:
        try:
            # the holder is `sleep` after unshare(CLONE_NEWNET) and exec: same pid, new namespace
            self._holder = await asyncio.create_subprocess_exec(
                self.unshare, "--net", "--", "sleep", "infinity",
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL, preexec_fn=die_with_parent())
        except OSError as e:
            raise SandboxError(f"could not start a network namespace ({self.unshare}): {e}") from e
        own = os.readlink("/proc/self/ns/net")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETUP_TIMEOUT
        # until unshare has run, /proc/<pid>/ns/net is still ours: never hand that out
        while True:
            if self._holder.returncode is not None:
                raise SandboxError(f"{self.unshare} --net exited with {self._holder.returncode}")
            try:
                if os.readlink(self.path) != own:
                    break
            except FileNotFoundError:
                pass
            if loop.time() > deadline:
                raise SandboxError("the build's network namespace was not created in time")
            await asyncio.sleep(0.01)
        ready_read, ready_write = os.pipe()
        # its messages go to a file: a pipe nobody reads would stall it once full
        self._slirp_log = tempfile.TemporaryFile()
        try:
            try:
                self._slirp = await asyncio.create_subprocess_exec(
                    # it parses every packet a build sends: its own mount namespace, no
                    # capabilities but binding, a seccomp filter
                    self.slirp4netns, "--configure", f"--mtu={SLIRP_MTU}", "--disable-host-loopback",
                    "--enable-sandbox", "--enable-seccomp",
                    f"--cidr={SANDBOX_CIDR}", f"--ready-fd={ready_write}", str(self._holder.pid), "tap0",
                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=self._slirp_log, pass_fds=(ready_write,), preexec_fn=die_with_parent())
            except OSError as e:
                raise SandboxError(f"could not start {self.slirp4netns}: {e}") from e
            os.close(ready_write)
            ready_write = -1
            # "1" once the namespace is configured; b"" if slirp4netns died first
            readable = loop.create_future()
            loop.add_reader(ready_read, lambda: readable.done() or readable.set_result(None))
            try:
                await asyncio.wait_for(readable, SETUP_TIMEOUT)
                ready = os.read(ready_read, 1)
            except asyncio.TimeoutError:
                ready = b""
            finally:
                loop.remove_reader(ready_read)
            if ready != b"1":
                self._slirp_log.seek(0)
                detail = self._slirp_log.read(2000).decode(errors="replace").strip()
                raise SandboxError(f"slirp4netns did not set up the build's network: {detail or 'no answer'}")
        finally:
            os.close(ready_read)
            if ready_write >= 0:
                os.close(ready_write)

    @property
    def alive(self) -> bool:
        """Whether the namespace's holder still runs (its pid still names this namespace)."""
        return self._holder is not None and self._holder.returncode is None

    async def close(self) -> None:
        running = [p for p in (self._slirp, self._holder) if p is not None and p.returncode is None]
        for proc in running:  # both first: a second cancel while waiting must not leave one behind
            try:
                proc.kill()
            except ProcessLookupError:
                pass
        if running:
            await asyncio.shield(asyncio.gather(*(p.wait() for p in running), return_exceptions=True))
        if self._slirp_log is not None:
            self._slirp_log.close()
            self._slirp_log = None


@dataclass(frozen=True)
class Limits:
    """What one build (all its steps together) may use; None means no limit."""

    memory_bytes: int | None = None
    cpus: float | None = None
    pids: int | None = None


@dataclass(frozen=True)
class Usage:
    """What a build used, read from its cgroup when it ended."""

    memory_peak_bytes: int | None = None
    memory_limit_hit: bool = False
    pids_limit_hit: bool = False
    cpu_seconds: float | None = None


def cgroup_v1_mounts(mounts_file: str = "/proc/self/mounts") -> dict[str, Path]:
    """Controller name → mount point, for the cgroup v1 hierarchies this machine has."""
    found: dict[str, Path] = {}
    try:
        lines = Path(mounts_file).read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        if len(fields) < 4 or fields[2] != "cgroup":
            continue
        for option in fields[3].split(","):
            if option in ("memory", "pids", "cpu", "cpuacct"):
                found[option] = Path(fields[1])
    return found


class BuildCgroup:
    """A cgroup v1 subtree for one build: `/cnbi/<id>` in every hierarchy, limits on it,
    podman's per-step cgroups below it (`podman_parent`)."""

    NEEDED = ("memory", "pids", "cpu", "cpuacct")

    def __init__(self, limits: Limits, mounts: dict[str, Path] | None = None):
        self.limits = limits
        self.mounts = cgroup_v1_mounts() if mounts is None else mounts
        self.relative = f"{CGROUP_PREFIX}/{secrets.token_hex(6)}"
        self.created = False

    @classmethod
    def available(cls, mounts: dict[str, Path] | None = None) -> bool:
        mounts = cgroup_v1_mounts() if mounts is None else mounts
        return all(name in mounts for name in cls.NEEDED) and os.access(mounts["memory"], os.W_OK)

    @property
    def podman_parent(self) -> str:
        return f"/{self.relative}/build"

    def _dir(self, controller: str) -> Path:
        return self.mounts[controller] / self.relative

    def create(self) -> None:
        self.created = True  # before the first mkdir: whatever was made is removed again
        for controller in self.NEEDED:
            self._dir(controller).mkdir(parents=True, exist_ok=True)
        limits = self.limits
        if limits.memory_bytes:
            # swap counted with memory where the kernel allows it, so a limit is a limit
            self._write("memory", "memory.limit_in_bytes", limits.memory_bytes)
            self._write("memory", "memory.memsw.limit_in_bytes", limits.memory_bytes, required=False)
        if limits.pids:
            self._write("pids", "pids.max", limits.pids)
        if limits.cpus:
            self._write("cpu", "cpu.cfs_period_us", CPU_PERIOD_US)
            self._write("cpu", "cpu.cfs_quota_us", max(1000, int(limits.cpus * CPU_PERIOD_US)))

    def _write(self, controller: str, name: str, value: int, required: bool = True) -> None:
        try:
            (self._dir(controller) / name).write_text(str(value))
        except OSError as e:
            if required:
                raise SandboxError(f"could not set {name} for the build: {e}") from e

    def _read(self, controller: str, name: str) -> str | None:
        try:
            return (self._dir(controller) / name).read_text()
        except OSError:
            return None

    def usage(self) -> Usage:
        def number(controller, name):
            text = self._read(controller, name)
            try:
                return int(text.split()[0]) if text else None
            except ValueError:
                return None

        # "hit the limit": the kernel's counters where it keeps them (failcnt, pids.events), and
        # the peak reaching the limit where it does not (gVisor keeps only the peaks)
        events = self._read("pids", "pids.events") or ""
        pids_hits = next((int(line.split()[1]) for line in events.splitlines()
                          if line.startswith("max ") and line.split()[1].isdigit()), 0)
        pids_peak = number("pids", "pids.peak") or 0
        memory_peak = number("memory", "memory.max_usage_in_bytes")
        memory_hits = (number("memory", "memory.failcnt") or 0) + (number("memory", "memory.memsw.failcnt") or 0)
        cpu_ns = number("cpuacct", "cpuacct.usage")
        limits = self.limits
        return Usage(
            memory_peak_bytes=memory_peak,
            memory_limit_hit=bool(limits.memory_bytes) and (memory_hits > 0 or (memory_peak or 0) >= limits.memory_bytes),
            pids_limit_hit=bool(limits.pids) and (pids_hits > 0 or pids_peak >= limits.pids),
            cpu_seconds=cpu_ns / 1e9 if cpu_ns is not None else None,
        )

    def remaining_pids(self) -> list[int]:
        pids = []
        top = self._dir("pids")
        for directory, _subdirs, files in os.walk(top):
            if "cgroup.procs" in files:
                try:
                    pids += [int(p) for p in (Path(directory) / "cgroup.procs").read_text().split()]
                except (OSError, ValueError):
                    pass
        return pids

    async def stop_remaining(self) -> int:
        """SIGKILL whatever still runs in the build's cgroup (nothing should); how many there were."""
        stopped = 0
        for _ in range(20):
            pids = self.remaining_pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    stopped += 1
                except ProcessLookupError:
                    pass
            await asyncio.sleep(0.1)
        return stopped

    def remove(self, cgroup_root: str = CGROUP_ROOT) -> None:
        """Remove the subtree in every hierarchy: podman's runtime made it in all of them."""
        if not self.created:
            return
        for hierarchy in Path(cgroup_root).iterdir():
            _remove_tree(hierarchy / self.relative)


def _remove_tree(top: Path) -> bool:
    """rmdir a cgroup directory and those below it, deepest first (a cgroup's files go with its
    directory; the kernel refuses one that anything still runs in); whether `top` went."""
    if not top.is_dir():
        return False
    for directory, _subdirs, _files in sorted(os.walk(top), key=lambda entry: -len(entry[0])):
        try:
            os.rmdir(directory)
        except OSError:
            pass
    return not top.exists()


def sweep_stale_cgroups(older_than_s: float = 3600.0, cgroup_root: str = CGROUP_ROOT) -> int:
    """Remove build cgroups a killed service left behind (empty, and older than an hour, so a
    build another service is setting up right now is never touched); how many went."""
    removed = 0
    now = time.time()
    for hierarchy in Path(cgroup_root).iterdir():
        parent = hierarchy / CGROUP_PREFIX
        if not parent.is_dir():
            continue
        for build in parent.iterdir():
            try:
                stale = build.is_dir() and now - build.stat().st_mtime >= older_than_s
            except OSError:
                continue
            removed += stale and _remove_tree(build)
    return removed


def format_bytes(count: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            value = count / size
            return f"{value:.0f} {unit}" if value == int(value) or value >= 10 else f"{value:.1f} {unit}"
    return f"{count} bytes"


__all__ = ["BuildCgroup", "IsolatedNetwork", "Limits", "SandboxError", "Usage", "cgroup_v1_mounts", "die_with_parent",
           "format_bytes", "sweep_stale_cgroups"]
