"""The Builder interface: what the phase work needs of whatever builds and runs images.

Two implementations, chosen by a `builder_class` Type trait as BinderHub chooses its
`build_class`: `PodmanBuilder` (embedded mode: podman on this machine) and the Tekton builder
(cluster mode: a PipelineRun per generation). The phase work (controller/phases.py) calls only
these methods, so it never knows which mode it runs in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

from traitlets.config import LoggingConfigurable

from ..buildplan import BuildPlan
from ..checks import Check

LogFn = Callable[[str], Awaitable[None] | None]


class BuildError(Exception):
    """The build or a step of it failed; the message ends with the tool's own words."""


class ImageMissing(BuildError):
    """The image is not where the builder keeps images."""


class PullFailed(BuildError):
    """The image could not be fetched (registry, credentials)."""


class StorageFull(BuildError):
    """The disk holding the builder's image storage ran out of space while a build wrote there:
    the machine's trouble, not the user's; the message is the tool's own words (with the
    server's paths: for the admin's log). (A pull that fails so stays a pull failure: its error
    quotes the registry's own words, which whoever runs that registry writes.)"""


@dataclass
class StoredImage:
    """An image the builder has: its digest and platform."""

    digest: str
    platform: str  # "linux/amd64"


@dataclass
class PullAccess:
    """How to fetch an image the builder does not have yet."""

    username: str | None = None
    password: str | None = None
    tls_verify: bool = True


@dataclass
class BaseImageInfo:
    """What Prepare learns from running a base image once; kept in `status.baseImageInfo` so
    later phases (and another process) read it from the object, never from the engine again."""

    python_path: str
    python_version: str  # "3.11"
    python_full_version: str
    user: str  # the image's configured user ("" = root)
    uid: int
    env_owned_by_user: bool  # the image's user may write the python environment
    packages: list[dict] = field(default_factory=list)  # [{name, version}]
    has_conda: bool = False

    def to_status(self, with_packages: bool = True) -> dict:
        """The status form; without the package list where nothing reads it later (an import's
        packages are its manifest, `status.packages`: kept twice they were a third of its size)."""
        info = {
            "pythonPath": self.python_path, "pythonVersion": self.python_full_version, "user": self.user,
            "uid": self.uid, "environmentOwnedByUser": self.env_owned_by_user, "hasConda": self.has_conda,
        }
        if with_packages:
            info["packages"] = [{"name": p["name"], "version": p["version"]} for p in self.packages]
        return info

    @classmethod
    def from_status(cls, info: dict) -> "BaseImageInfo":
        full = info["pythonVersion"]
        return cls(
            python_path=info["pythonPath"], python_version=".".join(full.split(".")[:2]), python_full_version=full,
            user=info.get("user") or "", uid=int(info.get("uid") or 0),
            env_owned_by_user=bool(info.get("environmentOwnedByUser")), packages=list(info.get("packages") or []),
            has_conda=bool(info.get("hasConda")),
        )


class Builder(LoggingConfigurable):
    """Builds plans into images and runs checks in them. Every method may raise BuildError with
    a message for the user; none gets a user string on a command line (argv lists, files)."""

    #: whether built images live in the builder's own storage (podman) rather than only in a
    #: registry: then an image is reusable only while that storage still has it
    keeps_images_locally: bool = False

    #: whether the builder fetches a GitRepository's commit again where it builds (Tekton's
    #: fetch step) instead of building the engine's checkout: then it needs the git credential
    fetches_repository: bool = False

    async def stored_image(self, reference: str) -> StoredImage | None:
        """The image if the builder has it (local storage), else None."""
        raise NotImplementedError

    async def inspect_base(self, reference: str, access: PullAccess | None = None) -> BaseImageInfo:
        """Python, user and packages of an image pinned by digest (fetched first if needed)."""
        raise NotImplementedError

    async def build(self, plan: BuildPlan, checkout: Path | None, secrets: dict[str, str], log: LogFn, *,
                    obj: dict, checks: list[Check], git_credential=None) -> str:
        """Build `plan` (the context files, plus the repository `checkout` for git builds) for
        the object `obj` and return the digest of `plan.target`. `secrets` (CA bundle, index
        config) reach the build as build secrets, never as a layer. A builder that validates as
        part of its build (Tekton) runs `checks` there; see `validate`. One that
        `fetches_repository` is given the image's `git_credential` for that fetch, and only for
        it: never in the step that runs the repository's own recipe."""
        raise NotImplementedError

    async def validate(self, image: str, checks: list[Check], *, obj: dict) -> list[tuple[int, str, str]]:
        """Run the acceptance checks inside `image` as the image's user: (exit code, stdout,
        stderr) for each, in order."""
        return [await self.run_check(image, check) for check in checks]

    async def run_check(self, image: str, check: Check) -> tuple[int, str, str]:
        """Run one acceptance check inside `image` as the image's user."""
        raise NotImplementedError

    async def push(self, reference: str, *, tls_verify: bool = True) -> str:
        """Push a built image; returns its digest in the registry."""
        raise NotImplementedError

    async def image_size(self, reference: str) -> int | None:
        """Bytes the image takes, when the builder can tell."""
        return None

    async def remove_image(self, reference: str) -> None:
        """Drop a half-made or unwanted image (cancelled builds)."""

    async def delete_stored_image(self, reference: str, own_prefix: str) -> str | None:
        """Delete a finished image from the builder's own storage (retention): None when it is
        gone (or was never here), else why it stays (a container uses it, another name has it).
        Names under `own_prefix` (this service's repositories) are dropped with it; any other
        name keeps it. Only a builder that `keeps_images_locally` has anything to delete."""
        return None

    async def cancel_build(self, obj: dict) -> None:
        """Stop the build of `obj` that runs outside this process (a PipelineRun), if any; a
        build inside this process stops with the task that awaits it."""

    async def cleanup(self, uid: str) -> None:
        """Release whatever the builder keeps for one object's builds."""
