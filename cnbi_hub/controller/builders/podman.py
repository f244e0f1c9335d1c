"""The embedded builder: runs build plans, inspections and checks with podman on this machine.

Every podman call uses the project's own containers.conf (runc, cgroupfs, no default ulimits,
host network, overlay storage) through `podman_environ()`, and an argv list: image references
reaching here were parsed by `imageref`, and no user string is ever part of a shell line.
Podman keeps its layer cache and the uv cache mount between builds, which is what makes
rebuilds fast.

Everything that runs a user's code (a build, an inspection of an imported image, an acceptance
check) runs in a sandbox (`sandbox.py`): its own network namespace with no way to this
machine's loopback, and one cgroup holding the memory, CPU and process limits for all its steps.
The image's size and the disk's free space are watched while it builds.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import uv
from jupyterhub.traitlets import ByteSpecification
from traitlets import Bool, Enum, Float, Int, Unicode

from ...containers import broken_image_ids, podman_environ, repair_broken_images
from ..buildplan import BuildPlan
from ..checks import Check
from .base import BaseImageInfo, BuildError, Builder, ImageMissing, LogFn, PullAccess, PullFailed, StorageFull, StoredImage
from .sandbox import (BuildCgroup, IsolatedNetwork, Limits, SandboxError, Usage, die_with_parent, format_bytes,
                      sweep_stale_cgroups)

__all__ = ["BuildError", "ImageMissing", "PodmanBuilder"]

# Runs inside the base image (as its own user): find the notebook python and report on it.
# Fixed text: nothing from the request is in it.
_FIND_PYTHON = 'for p in python3 python; do if command -v "$p" >/dev/null 2>&1; then exec "$p" -c "$0"; fi; done; echo "no python in image" >&2; exit 3'
_INSPECT_PROGRAM = r"""
import json, os, shutil, sys, sysconfig
from importlib import metadata
purelib = sysconfig.get_paths()["purelib"]
packages, seen = [], set()
for dist in metadata.distributions():
    name = dist.metadata["Name"]
    if not name or name.lower() in seen:
        continue
    seen.add(name.lower())
    packages.append({"name": name, "version": dist.version})
print(json.dumps({
    "python_path": sys.executable,
    "python_version": "%d.%d" % sys.version_info[:2],
    "python_full_version": "%d.%d.%d" % sys.version_info[:3],
    "uid": os.getuid(),
    "env_owned_by_user": os.access(purelib, os.W_OK),
    "has_conda": bool(shutil.which("mamba") or shutil.which("conda")),
    "packages": sorted(packages, key=lambda p: p["name"].lower()),
}))
"""


class PodmanBuilder(Builder):
    """Embedded mode's builder: podman on this machine; built images stay in its storage."""

    keeps_images_locally = True

    podman = Unicode("podman", help="The podman executable.").tag(config=True)

    context_root = Unicode(
        help="""Directory build contexts are laid out in while a build runs (removed after it).
        Default: the system's temporary directory.""",
    ).tag(config=True)

    keep_failed_contexts = Bool(
        False, help="Keep the build context of a failed build (its path is logged) for debugging."
    ).tag(config=True)

    build_timeout = Float(
        1800.0, help="Seconds one image build may take before it is stopped and the image Failed."
    ).tag(config=True)

    check_timeout = Float(120.0, help="Seconds one acceptance check inside an image may take.").tag(config=True)

    build_network = Enum(
        ["isolated", "host"], "isolated",
        help="""The network a build, an inspection or a check runs on.
        "isolated": a network namespace of its own (slirp4netns) that reaches the internet —
        package indexes, git hosts — but nothing listening on this machine's 127.0.0.1: not the
        hub, this service, the registry or another build.
        "host": this machine's network, loopback included. Only for a package index that
        listens on this machine itself; any build can then reach every local service.""",
    ).tag(config=True)

    build_memory_limit = ByteSpecification(
        "4G", help="""Memory one build may use, all its steps together (and one inspection or check).
        A build that needs more ends Failed naming this limit. Suffixes K, M, G, T; 0: no limit.""",
    ).tag(config=True)

    build_cpu_limit = Float(
        2.0, help="CPUs one build may keep busy (1.5 = one and a half); it is slowed, not stopped. 0: no limit.",
    ).tag(config=True)

    build_pids_limit = Int(
        4096, help="""Processes one build may have at once (a fork bomb stops there). 0: no limit.
        Needs cgroup v1 controllers (what podman's cgroupfs manager uses); without them only
        the memory and CPU limits hold, per step.""",
    ).tag(config=True)

    max_image_size = ByteSpecification(
        "20G", help="""Largest image a build may make, its base included. Checked as each step
        finishes: the build stops at the first step that goes over, and ends Failed naming it. 0: no limit.""",
    ).tag(config=True)

    min_free_disk = ByteSpecification(
        "2G", help="""Free space to leave on the disk holding podman's storage. A build is not
        started below it, and a running build is stopped when the disk falls below it (checked
        every `disk_check_interval` seconds). 0: not checked.""",
    ).tag(config=True)

    disk_check_interval = Float(2.0, help="Seconds between two looks at the disk's free space while a build runs.").tag(config=True)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._inspections: dict[str, BaseImageInfo] = {}
        self._graph_root: str | None = None
        self._swept = False  # the build cgroups a killed service left: removed once, at the first build

    @property
    def env(self) -> dict:
        return podman_environ()

    @property
    def limits(self) -> Limits:
        return Limits(memory_bytes=self.build_memory_limit or None, cpus=self.build_cpu_limit or None,
                      pids=self.build_pids_limit or None)

    @contextlib.asynccontextmanager
    async def sandbox(self):
        """The network and cgroup for one podman call running user code; yields its podman args."""
        sandbox = _Sandbox()
        async with contextlib.AsyncExitStack() as stack:
            try:
                if self.build_network == "isolated":
                    network = await stack.enter_async_context(IsolatedNetwork())
                    sandbox.network = network
                    sandbox.args.append(network.podman_arg)
                else:
                    sandbox.args.append("--network=host")
                limits = self.limits
                if BuildCgroup.available():
                    if not self._swept:
                        self._swept = True
                        try:
                            await asyncio.to_thread(sweep_stale_cgroups)
                        except OSError as e:  # housekeeping: never a reason to refuse a build
                            self.log.warning("could not sweep stale build cgroups: %s", e)
                    cgroup = BuildCgroup(limits)
                    stack.callback(cgroup.remove)
                    stack.push_async_callback(self._stop_leftovers, cgroup)
                    cgroup.create()
                    sandbox.cgroup = cgroup
                    sandbox.args.append(f"--cgroup-parent={cgroup.podman_parent}")
                else:
                    # no cgroup of our own: podman's per-step limits (nothing bounds processes)
                    if limits.memory_bytes:
                        sandbox.args += [f"--memory={limits.memory_bytes}", f"--memory-swap={limits.memory_bytes}"]
                    if limits.cpus:
                        sandbox.args += ["--cpu-period=100000", f"--cpu-quota={int(limits.cpus * 100000)}"]
            except (SandboxError, OSError) as e:
                raise BuildError(f"could not set up the sandbox a build runs in: {e}") from e
            yield sandbox

    async def _stop_leftovers(self, cgroup: BuildCgroup) -> None:
        stopped = await cgroup.stop_remaining()
        if stopped:
            self.log.warning("stopped %d processes left running in %s after it ended", stopped, cgroup.relative)

    async def _run(self, *args: str, timeout: float = 120, log: LogFn | None = None) -> tuple[int, str, str]:
        """Run podman; with `log`, stream its combined output line by line. When it fails with
        podman's words for a broken image, the images podman's own listing names broken go (see
        cnbi_hub.containers: never what a build or a container printed) and it runs once more."""
        code, out, err = await self._run_once(*args, timeout=timeout, log=log)
        if code == 0 or not broken_image_ids(out if log else err):
            return code, out, err
        removed = await asyncio.to_thread(repair_broken_images, self.env)
        if not removed:
            return code, out, err  # a build's or a container's own words: nothing was broken
        if log:
            await _call(log, f"podman had left {len(removed)} broken image(s) behind; removed, trying again")
        return await self._run_once(*args, timeout=timeout, log=log)

    async def _run_once(self, *args: str, timeout: float = 120, log: LogFn | None = None) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            self.podman,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT if log else asyncio.subprocess.PIPE,
            env=self.env,
            start_new_session=True,  # so a cancel can stop podman and everything it started
            # in its own session podman would outlive a killed service and build on for nobody
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        try:
            if log:
                lines = []
                async def pump():
                    async for raw in proc.stdout:
                        line = raw.decode(errors="replace").rstrip("\n")
                        lines.append(line)
                        del lines[:-200]  # keep the tail for error messages
                        await _call(log, line)
                await asyncio.wait_for(pump(), timeout)
                await proc.wait()
                return proc.returncode, "\n".join(lines), ""
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
            return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
        except BaseException:
            # timeout or cancellation (DELETE during a build): stop podman's whole process group,
            # politely first so podman removes its intermediate build containers itself
            await _stop_group(proc)
            raise

    # --- images in local storage ------------------------------------------------------------

    async def stored_image(self, reference: str) -> StoredImage | None:
        """Digest and platform of an image in local storage, or None."""
        code, out, _ = await self._run("image", "inspect", "--format", "{{.Digest}} {{.Os}}/{{.Architecture}}", reference)
        parts = out.split()
        if code != 0 or len(parts) != 2:
            return None
        return StoredImage(digest=parts[0], platform=parts[1])

    async def local_digest(self, reference: str) -> str | None:
        stored = await self.stored_image(reference)
        return stored.digest if stored else None

    async def image_size(self, reference: str) -> int | None:
        """Bytes the image takes (all its layers), or None when it is not in local storage."""
        code, out, _ = await self._run("image", "inspect", "--format", "{{.Size}}", reference)
        try:
            return int(out.strip()) if code == 0 else None
        except ValueError:
            return None

    async def pull(self, reference: str, *, tls_verify: bool = True, authfile: str | None = None) -> None:
        args = ["pull", "--quiet", f"--tls-verify={'true' if tls_verify else 'false'}"]
        if authfile:
            args.append(f"--authfile={authfile}")
        code, out, err = await self._run(*args, "--", reference, timeout=900)
        if code != 0:
            raise PullFailed(f"could not pull {reference}: {_last_lines(err or out)}")

    async def _pull_with(self, reference: str, access: PullAccess) -> None:
        """Pull with credentials in a private auth file: never on podman's command line."""
        authfile = None
        if access.username is not None:
            registry = reference.split("/", 1)[0]
            token = base64.b64encode(f"{access.username}:{access.password or ''}".encode()).decode()
            fd, authfile = tempfile.mkstemp(prefix="cnbi-auth-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump({"auths": {registry: {"auth": token}}}, f)
        try:
            await self.pull(reference, tls_verify=access.tls_verify, authfile=authfile)
        finally:
            if authfile:
                os.unlink(authfile)

    async def image_user(self, reference: str) -> str:
        code, out, err = await self._run("image", "inspect", "--format", "{{.Config.User}}", reference)
        if code != 0:
            raise ImageMissing(f"image {reference} is not in local storage: {_last_lines(err)}")
        return out.strip()

    async def inspect_base(self, reference: str, access: PullAccess | None = None) -> BaseImageInfo:
        """Python, packages and user of an image, by running it once (pulled first when it is
        not in local storage); cached per reference (pinned by digest: never stale)."""
        if reference in self._inspections:
            return self._inspections[reference]
        if access is not None and not await self.stored_image(reference):
            await self._pull_with(reference, access)
        user = await self.image_user(reference)
        try:
            code, out, err = await self._run_container(
                "--entrypoint=sh", reference, "-c", _FIND_PYTHON, _INSPECT_PROGRAM, timeout=self.check_timeout
            )
        except asyncio.TimeoutError:
            raise BuildError(f"inspecting {reference} took longer than {self.check_timeout:.0f} s")
        if code != 0:
            raise BuildError(f"could not inspect {reference}: {_last_lines(err or out)}")
        try:
            data = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise BuildError(f"could not inspect {reference}: unexpected output {_last_lines(out)!r}")
        info = BaseImageInfo(user=user, **data)
        self._inspections[reference] = info
        return info

    async def remove_image(self, reference: str) -> None:
        await self._run("rmi", "--ignore", "--", reference)

    async def delete_stored_image(self, reference: str, own_prefix: str) -> str | None:
        # podman removes an untagged image only by its ID (by `name@digest` it answers "tag not
        # known"), and by ID only while one name at most has it and no container uses it: the
        # last is the guard we want, so no --force ever
        code, out, err = await self._run("image", "inspect", "--format", "{{.Id}} {{join .RepoTags \" \"}}",
                                         reference)
        if code != 0:
            if "image not known" in (err or out):
                return None  # gone already (or never here)
            return f"podman could not inspect it: {_last_lines(err or out, 2)}"
        image_id, *names = out.split()
        foreign = [name for name in names if not name.startswith(own_prefix)]
        if foreign:
            return f"it has names this service did not give it ({', '.join(foreign)})"
        # our names but one go first (podman refuses an ID with several); put back if podman keeps it
        for name in names[1:]:
            await self._run("untag", image_id, name)
        code, out, err = await self._run("rmi", "--", image_id)
        if code != 0 and await self.stored_image(image_id) is not None:
            for name in names[1:]:
                await self._run("tag", image_id, name)
            return f"podman keeps it: {_last_lines(err or out, 2)}"
        return None

    async def tag(self, source: str, target: str) -> None:
        code, out, err = await self._run("tag", source, target)
        if code != 0:
            raise BuildError(f"could not tag {source} as {target}: {_last_lines(err or out)}")

    async def push(self, reference: str, *, tls_verify: bool = True, authfile: str | None = None) -> str:
        """Push and return the digest the registry stores."""
        with _TempFile() as digest_file:
            args = ["push", "--quiet", f"--tls-verify={'true' if tls_verify else 'false'}",
                    f"--digestfile={digest_file}"]
            if authfile:
                args.append(f"--authfile={authfile}")
            code, out, err = await self._run(*args, reference, timeout=900)
            if code != 0:
                raise BuildError(f"could not push {reference}: {_last_lines(err or out)}")
            return Path(digest_file).read_text().strip()

    # --- building ---------------------------------------------------------------------------

    def write_context(self, plan: BuildPlan, context_dir: Path, repo_checkout: Path | None, secrets: dict) -> dict:
        """Lay out the build context for `plan`; returns the secret files by id."""
        if context_dir.exists():
            shutil.rmtree(context_dir)
        if plan.repo_dir == "" and repo_checkout is not None:
            # the repository's own Containerfile: the checkout is the whole context
            shutil.copytree(repo_checkout, context_dir, ignore=shutil.ignore_patterns(".git"))
        else:
            context_dir.mkdir(parents=True)
            if plan.repo_dir and repo_checkout is not None:
                shutil.copytree(repo_checkout, context_dir / plan.repo_dir)
        for rel, data in plan.context_files.items():
            path = context_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        for rel, what in plan.builder_files.items():
            if what != "uv":
                raise BuildError(f"unknown builder file {what!r}")
            path = context_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(uv.find_uv_bin(), path)
        if plan.containerfile is not None:
            (context_dir / plan.containerfile_path).write_text(plan.containerfile)
        secret_dir = context_dir.parent / (context_dir.name + ".secrets")
        secret_dir.mkdir(exist_ok=True)
        files = {}
        for secret_id in plan.secrets:
            path = secret_dir / secret_id
            path.write_text(secrets.get(secret_id, ""))  # empty means "not set" to the plan
            files[secret_id] = str(path)
        return files

    async def build(self, plan: BuildPlan, checkout: Path | None, secrets: dict[str, str], log: LogFn, *,
                    obj: dict | None = None, checks=None, git_credential=None) -> str:
        """Lay out the context in a fresh directory, build, remove the directory (the checks run
        afterwards, one `podman run` each, in `validate`)."""
        context_root = Path(tempfile.mkdtemp(prefix="cnbi-build-", dir=self.context_root or None))
        failed = True
        try:
            context = context_root / "context"
            secret_files = await asyncio.to_thread(self.write_context, plan, context, checkout, secrets)
            digest = await self.build_context(plan, context, secret_files, log)
            failed = False
            return digest
        finally:
            if failed and self.keep_failed_contexts:
                self.log.info("kept the context of the failed build of %s in %s", plan.target, context_root)
            else:
                await asyncio.to_thread(shutil.rmtree, context_root, True)

    async def build_context(self, plan: BuildPlan, context_dir: Path, secret_files: dict, log: LogFn) -> str:
        """Build `plan` in `context_dir`, tag it `plan.target`; returns the image's digest."""
        await self._check_free_disk("before the build started")
        async with self.sandbox() as sandbox:
            args = ["build", *sandbox.args, "--layers", "--pull=never", "-f",
                    str(context_dir / plan.containerfile_path), "-t", plan.target]
            for secret_id, path in secret_files.items():
                args.append(f"--secret=id={secret_id},src={path}")
            for key, value in plan.build_args.items():
                args.append(f"--build-arg={key}={value}")
            if plan.containerfile is None:
                for key, value in plan.labels.items():
                    args.append(f"--label={key}={value}")
            args.append(str(context_dir))
            # what the build's output may name that is not its own was made before this; the
            # clock, not `podman images --all`, which takes seconds per thousand images in podman 4
            started_ns = time.time_ns()
            try:
                code, tail = await self._watched_build(args, log, sandbox, started_ns)
            except asyncio.TimeoutError:
                raise BuildError(f"the build took longer than {self.build_timeout:.0f} s (its time limit) and was stopped")
            if sandbox.network is not None and not sandbox.network.alive:
                # its namespace is named by the holder's pid: gone, that pid could name another
                await self.remove_image(plan.target)
                raise BuildError("the build's network namespace went away while it ran; build it again")
            usage = sandbox.usage()
            if code != 0 and ran_out_of_space(tail):
                await self._remove_step_images(tail, started_ns)  # nothing of this image stays on the full disk
                raise StorageFull(f"podman build of {plan.target}: {_last_lines(_closing_error(tail), 15)}")
            if code != 0:
                raise BuildError(self._failure_message(code, tail, usage, in_cgroup=sandbox.cgroup is not None))
            await _call(log, _usage_line(usage))
        digest = await self.local_digest(plan.target)
        if not digest:
            raise BuildError(f"the build finished but {plan.target} is not in local storage")
        size = await self.image_size(plan.target)
        if self.max_image_size and size and size > self.max_image_size:
            await self.remove_image(plan.target)
            raise BuildError(self._size_message(size))
        return digest

    async def _watched_build(self, args: list[str], log: LogFn, sandbox: "_Sandbox", started_ns: int) -> tuple[int, str]:
        """Run `podman build`, stopping it at the first finished step whose image is over
        `max_image_size`, or when the disk falls below `min_free_disk`."""
        over_limit: list[str] = []

        async def log_and_measure(line: str) -> None:
            await _call(log, line)
            step = _STEP_DONE.search(line)  # anywhere: output without a newline runs into it
            if step and self.max_image_size:
                try:
                    size = await self._own_step_size(step.group(1), started_ns)
                except asyncio.TimeoutError:
                    size = None  # not the build's time limit: the final size check still holds
                if size and size > self.max_image_size:
                    over_limit.append(step.group(1))
                    raise _LimitReached(self._size_message(size, after_step=True))

        build = asyncio.ensure_future(self._run(*args, timeout=self.build_timeout, log=log_and_measure))
        watch = asyncio.ensure_future(self._watch_free_disk())
        try:
            await asyncio.wait({build, watch}, return_when=asyncio.FIRST_COMPLETED)
            if watch.done() and not build.done() and watch.exception() is not None:
                if sandbox.cgroup is not None:
                    await sandbox.cgroup.stop_remaining()  # the writer stops now, not after podman's grace
                build.cancel()  # stops podman's process group (see _run)
                await asyncio.gather(build, return_exceptions=True)
                watch.result()  # raises the limit reached
            code, tail, _ = build.result()
            return code, tail
        except _LimitReached:
            if sandbox.cgroup is not None:
                await sandbox.cgroup.stop_remaining()
            for image_id in over_limit:  # the step over the limit was committed: it goes
                await self._run("rmi", "--ignore", "--", image_id)
            raise
        finally:
            for task in (build, watch):
                if not task.done():
                    task.cancel()
            await asyncio.gather(build, watch, return_exceptions=True)

    async def _remove_step_images(self, output: str, started_ns: int) -> None:
        """Remove the images of the steps a failed build made (podman keeps them as its layer
        cache); one an image still builds on (a Ready image's, another build's) stays."""
        for image_id in dict.fromkeys(match.group(1) for match in map(_STEP_DONE.search, output.splitlines()) if match):
            if await self._own_step_size(image_id, started_ns) is not None:
                await self._run("rmi", "--ignore", "--", image_id)

    async def _own_step_size(self, image_id: str, started_ns: int) -> int | None:
        """The size of `image_id`, read from a build's output, when it is a step image the build
        made: created after the build started (`started_ns`, the host's clock, which podman's
        commit reads too) and untagged; else None. A RUN step can print podman's "--> <id>" line
        too, naming any image: a tagged one (a Ready build, a base) or one made before is never
        taken for a step of this build, so it is neither measured nor removed as one. (An
        untagged step image that another build makes meanwhile is only podman's cache, and one
        in use is not removed: `podman rmi` refuses.)"""
        code, out, _ = await self._run("image", "inspect", "--format",
                                       "{{len .RepoTags}} {{.Size}} {{.Created.UnixNano}}", "--", image_id)
        try:
            tags, size, created_ns = out.split()
            own = code == 0 and tags == "0" and int(created_ns) >= started_ns
            return int(size) if own else None
        except ValueError:
            return None

    async def _watch_free_disk(self) -> None:
        if not self.min_free_disk:
            await asyncio.Event().wait()  # nothing to watch: wait to be cancelled
        while True:
            await asyncio.sleep(self.disk_check_interval)
            await self._check_free_disk("while the build ran; it was stopped")

    async def _check_free_disk(self, when: str) -> None:
        if not self.min_free_disk:
            return
        root = await self.graph_root()
        free = await asyncio.to_thread(lambda: shutil.disk_usage(root).free)
        if free < self.min_free_disk:
            raise _LimitReached(
                f"the disk holding the image storage ({root}) had {format_bytes(free)} free {when}: "
                f"builds leave at least {format_bytes(self.min_free_disk)} free (the disk limit). "
                "An administrator can make room (old images, retention) or change PodmanBuilder.min_free_disk.")

    async def graph_root(self) -> str:
        """Where podman keeps images (storage.conf's graphroot)."""
        if self._graph_root is None:
            code, out, err = await self._run("info", "--format", "{{.Store.GraphRoot}}")
            if code != 0 or not out.strip():
                raise BuildError(f"podman info failed: {_last_lines(err or out)}")
            self._graph_root = out.strip()
        return self._graph_root

    def _size_message(self, size: int, after_step: bool = False) -> str:
        where = "after a step finished; the build was stopped there" if after_step else "when the build finished"
        return (f"the image was {format_bytes(size)} {where}: over the image size limit of "
                f"{format_bytes(self.max_image_size)} (its base included)")

    def _failure_message(self, code: int, tail: str, usage: Usage, in_cgroup: bool) -> str:
        output = _last_lines(tail, 15)
        killed = "exit status 137" in tail or "Killed" in tail
        # the page cache alone can take memory to its limit: blame the limit only for a kill
        if usage.memory_limit_hit and killed:
            return (f"the build reached its memory limit of {format_bytes(self.build_memory_limit)} and a step was "
                    f"stopped when it needed more (podman exit {code}):\n{output}")
        # where the kernel keeps no count of refused forks (the counters sit in podman's step
        # cgroup, gone by now), the shell's own words tell
        forks_refused = any("fork" in line.lower() and any(words in line.lower() for words in (
            "cannot", "can't", "resource temporarily unavailable", "retry")) for line in tail.splitlines())
        if usage.pids_limit_hit or (forks_refused and in_cgroup and self.build_pids_limit):
            return (f"the build reached its limit of {self.build_pids_limit} processes at once "
                    f"(podman exit {code}):\n{output}")
        if killed and self.build_memory_limit and not in_cgroup:
            # per-step limits only (no cgroup of ours to read): SIGKILL is the likely OOM kill
            return (f"a build step was killed (exit status 137), most likely over the memory limit of "
                    f"{format_bytes(self.build_memory_limit)}:\n{output}")
        if code < 0:  # podman itself was killed (not by us: a stop or a limit raised above)
            name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
            return f"the build process (podman build) was killed by {name} from outside:\n{output}"
        return f"podman build failed (exit {code}):\n{output}"

    async def run_check(self, image: str, check: Check) -> tuple[int, str, str]:
        """Run one acceptance check inside `image` as the image's own user."""
        entrypoint, *args = check.argv
        try:
            return await self._run_container(f"--entrypoint={entrypoint}", image, *args, timeout=self.check_timeout)
        except asyncio.TimeoutError:
            return 124, "", f"the check took longer than {self.check_timeout:.0f} s"

    async def _run_container(self, *args: str, timeout: float) -> tuple[int, str, str]:
        """`podman run --rm` in a sandbox, removing the container if we stop waiting: killing
        the podman client (timeout, DELETE) would leave the container itself behind."""
        name = f"cnbi-run-{secrets.token_hex(6)}"
        async with self.sandbox() as sandbox:
            try:
                return await self._run("run", "--rm", f"--name={name}", *sandbox.args, *args, timeout=timeout)
            except BaseException:
                await asyncio.shield(self.remove_container(name))
                raise

    async def remove_container(self, name: str) -> None:
        await self._run("rm", "--force", "--time=0", "--ignore", name)


def _closing_error(output: str) -> str | None:
    """Pure: podman's own closing error, the last "Error: " line to the end (after all a build
    printed), or None. When a build's last output has no newline at its end, podman's error
    runs on from it and the last "Error: " line is the build's: another "Error: " in it,
    outside the step podman quotes, says so, and then there is none to trust."""
    lines = output.splitlines()
    starts = [at for at, line in enumerate(lines) if line.startswith("Error: ")]
    if not starts:
        return None
    closing = "\n".join(lines[starts[-1]:])
    return None if "Error: " in _QUOTED_STEP.sub("STEP: ", closing)[len("Error: "):] else closing


def ran_out_of_space(output: str) -> bool:
    """Pure: whether podman's own closing error says its storage ran out of space (ENOSPC). The
    step podman quotes in it (an instruction the user wrote: `STEP "..."`, `for step {...}`) is
    left out: a user's words never make their failure the disk's (a full disk may go unnamed,
    never a disk named full by a build)."""
    closing = _closing_error(output)
    return closing is not None and "no space left on device" in _QUOTED_STEP.sub("STEP: ", closing).lower()


# greedy on one line: up to podman's last `": ` or `}: `, past anything the step's text holds
_QUOTED_STEP = re.compile(r'(?:STEP ".*"|for step \{.*\}): ')

# podman build's line for a finished step: "--> 1f18fd1ec6f" or "--> Using cache 1f18fd1ec6f..."
_STEP_DONE = re.compile(r"--> (?:Using cache )?([0-9a-f]{11,64})\s*$")


class _LimitReached(BuildError):
    """A build went over a limit watched from outside (image size, free disk)."""


@dataclass
class _Sandbox:
    args: list[str] = field(default_factory=list)
    cgroup: BuildCgroup | None = None
    network: IsolatedNetwork | None = None

    def usage(self) -> Usage:
        return self.cgroup.usage() if self.cgroup else Usage()


def _usage_line(usage: Usage) -> str:
    parts = []
    if usage.cpu_seconds is not None:
        # steps podman took from its layer cache run nothing: "0.0 s" would read as broken
        parts.append(f"{usage.cpu_seconds:.1f} s of CPU" if usage.cpu_seconds >= 0.05 else "next to no CPU")
    if usage.memory_peak_bytes:
        parts.append(f"at most {format_bytes(usage.memory_peak_bytes)} of memory")
    return f"the build used {', '.join(parts)}" if parts else "the build finished"


async def _call(log: LogFn, line: str) -> None:
    result = log(line)
    if asyncio.iscoroutine(result):
        await result


async def _stop_group(proc, grace: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.returncode is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            await asyncio.shield(asyncio.wait_for(proc.wait(), grace))
            return
        except (asyncio.TimeoutError, asyncio.CancelledError):
            continue


def _last_lines(text: str, n: int = 5) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return "\n".join(lines[-n:])


class _TempFile:
    def __enter__(self) -> str:
        import tempfile

        fd, self.path = tempfile.mkstemp(prefix="cnbi-")
        os.close(fd)
        return self.path

    def __exit__(self, *exc):
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
