"""Resolving: turn requested packages into a hash-pinned lock with ``uv pip compile``.

The lock is resolved *against the base image*: every distribution the base image already
has becomes a ``name==version`` constraint, so resolving can add packages but never change
one the base image (and so the notebook server) depends on. Asking for ``jupyterlab<4`` on a
base with jupyterlab 4.x fails here, with uv's explanation, instead of breaking the image.

Package strings are data: they are validated as PEP 508 requirements and written to a file
that uv reads; they never reach a command line.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from .proc import run_process

__all__ = [
    "IndexSettings",
    "InvalidRequirementError",
    "LockResult",
    "ResolutionError",
    "constraints_from_pip_list",
    "packages_from_lock",
    "resolve_lock",
    "validate_requirement",
]

# x86_64-manylinux_2_28 (glibc 2.28, RHEL 8 / Debian 10 and later) is what our base images run
# on; it decides which markers hold and which wheels count as usable while resolving.
DEFAULT_PYTHON_PLATFORM = "x86_64-manylinux_2_28"

# uv reads these from the environment; the index comes from IndexSettings alone, so that the
# service's own environment cannot silently change what users' images are resolved against.
_UV_ENV_KEEP = {"UV_CACHE_DIR"}

_PYTHON_VERSION_RE = re.compile(r"^3\.\d{1,2}(\.\d{1,3})?$")
_LOCK_LINE_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")
_MAX_MESSAGE = 4000


class ResolutionError(Exception):
    """The requested packages cannot be resolved; ``str(err)`` is uv's explanation."""

    def __init__(self, message: str, *, requirement: str | None = None, index: int | None = None):
        super().__init__(message)
        self.message = message
        #: the offending input line and its position in the request, when one is at fault
        self.requirement = requirement
        self.index = index


class InvalidRequirementError(ResolutionError):
    """One requested line is not a PEP 508 requirement we accept (caught before uv runs)."""


@dataclass(frozen=True)
class IndexSettings:
    """Where packages come from. ``None``/empty means uv's defaults (PyPI)."""

    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    #: a PEM bundle used to verify the index's TLS certificate (corporate proxies, mirrors)
    ca_bundle: str | None = None
    #: seconds uv waits for one answer from the index (uv's UV_HTTP_TIMEOUT); None: uv's own
    http_timeout: float | None = None


@dataclass(frozen=True)
class LockResult:
    #: the lock file text: ``name==version \\ --hash=sha256:...`` lines, no comments
    text: str
    #: hex sha256 of ``text``; the object's ``status.lockHash`` is ``"sha256:" + sha256``
    sha256: str
    #: (name, version) of every pinned distribution, in lock order
    packages: list[tuple[str, str]] = field(default_factory=list)


def validate_requirement(line: str, *, allow_direct_urls: bool = False) -> Requirement:
    """Parse one requested package as a PEP 508 requirement, or raise InvalidRequirementError.

    Rejected even though a requirements file would accept them: options (``-r /etc/passwd``,
    ``--index-url ...``), more than one line, and by default direct URL references
    (``pkg @ file:///...``), which would let a user read the resolver's file system or make
    it fetch from any address.
    """
    if not isinstance(line, str):
        raise InvalidRequirementError(f"a package must be a string, got {type(line).__name__}")
    text = line.strip()
    if not text:
        raise InvalidRequirementError("empty package requirement")
    if any(ch in text for ch in "\r\n\0"):
        raise InvalidRequirementError(f"package requirement must be one line: {line!r}")
    if text.startswith("-"):
        raise InvalidRequirementError(
            f"options are not accepted as packages: {line!r}; give a requirement such as 'pandas>=2'"
        )
    try:
        req = Requirement(text)
    except InvalidRequirement as err:
        raise InvalidRequirementError(
            f"not a valid PEP 508 requirement: {line!r} ({err})", requirement=line
        ) from None
    if req.url and not allow_direct_urls:
        raise InvalidRequirementError(
            f"direct URL references are not accepted: {line!r}; name a package from the index",
            requirement=line,
        )
    return req


def constraints_from_pip_list(pip_list_json: list[dict]) -> list[str]:
    """Turn the base image's ``pip list --format json`` into ``name==version`` constraints.

    Everything installed becomes a constraint, including pip, setuptools and wheel: a
    notebook server stack still imports ``pkg_resources`` in places, and setuptools 81
    removed it, so letting a user's package upgrade setuptools can break the base image.
    (uv installs, so pinning pip costs nothing.)

    Skipped, because no index version can stand for them: editable installs (a local
    checkout; pip reports ``editable_project_location``) and versions that are not PEP 440
    (a constraint uv cannot parse would fail every resolution).
    """
    pins: dict[str, str] = {}
    for entry in pip_list_json:
        name = entry.get("name")
        version = entry.get("version")
        if not isinstance(name, str) or not isinstance(version, str):
            continue
        if entry.get("editable_project_location"):
            continue
        try:
            Requirement(name)
            Version(version)
        except (InvalidRequirement, InvalidVersion):
            continue
        # first one wins, as it does for imports when two entries share a name
        pins.setdefault(canonicalize_name(name), f"{name}=={version}")
    return [pins[key] for key in sorted(pins)]


def packages_from_lock(lock_text: str) -> list[tuple[str, str]]:
    """The (name, version) pins of a lock as written by ``uv pip compile``."""
    packages = []
    for line in lock_text.splitlines():
        match = _LOCK_LINE_RE.match(line)
        if match:
            packages.append((match.group(1), match.group(2)))
    return packages


def lock_entries(lock_text: str) -> dict[tuple[str, str], str]:
    """{(canonical name, version): the entry's text with its hash lines} of a uv lock."""
    entries: dict[tuple[str, str], str] = {}
    current: list[str] = []

    def close():
        if current:
            match = _LOCK_LINE_RE.match(current[0])
            if match:
                entries[(canonicalize_name(match.group(1)), match.group(2))] = "\n".join(current) + "\n"

    for line in lock_text.splitlines():
        if line[:1].isspace():
            current.append(line)  # a hash continuation of the entry above
            continue
        close()
        current = [line] if line.strip() and not line.lstrip().startswith("#") else []
    close()
    return entries


def lock_difference(new_lock: str, old_lock: str) -> str | None:
    """The entries of `new_lock` that `old_lock` lacks, when `old_lock` is a subset of it.

    An image built from `old_lock` plus these entries holds exactly the packages of a build
    from `new_lock`: that is what lets a rebuild install only what changed. None when the old
    lock pins anything the new one does not (a removal or another version).
    """
    new, old = lock_entries(new_lock), lock_entries(old_lock)
    if not old or not set(old) <= set(new):
        return None
    return "".join(text for key, text in new.items() if key not in old)


_UV_ITEM_STARTS = ("×", "╰─▶", "├─▶", "error:", "cause:", "hint:")


def explain_uv_error(stderr: str) -> str:
    """Keep the part of uv's stderr a user can act on: from ``error:`` on, minus decoration.

    One line per statement of uv's (its terminal wrapping undone), each ending like a sentence,
    so "...resolving dependencies:" and "Because ..." stay apart however a client shows them.
    """
    lines = stderr.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(("error:", "×")):
            lines = lines[i:]
            break
    items: list[str] = []
    for line in lines:
        raw = line.strip()
        if not raw or raw.startswith("warning:"):
            continue
        text = raw.lstrip("×╰├─▶│ ").strip()
        for prefix in ("error: ", "cause: "):
            text = text.removeprefix(prefix)
        if raw.startswith(_UV_ITEM_STARTS) or not items:
            items.append(text)
        else:
            items[-1] += " " + text  # uv wrapped a long sentence onto this line
    for i, item in enumerate(items):
        if item and item[-1] not in ".:!?)":
            items[i] = item + (":" if i + 1 < len(items) else ".")
    message = "\n".join(items).strip() or "uv failed without an explanation"
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 3] + "..."
    return message


def _uv_env(settings: IndexSettings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UV_") or k in _UV_ENV_KEEP}
    # never download interpreters or read uv.toml/pyproject files while resolving
    env["UV_PYTHON_DOWNLOADS"] = "never"
    env["UV_NO_CONFIG"] = "1"
    env["NO_COLOR"] = "1"
    if settings.ca_bundle:
        env["SSL_CERT_FILE"] = settings.ca_bundle
    if settings.http_timeout:
        env["UV_HTTP_TIMEOUT"] = str(max(1, int(settings.http_timeout)))
    return env


def _uv_compile_argv(
    uv_bin: str,
    *,
    python_version: str,
    python_platform: str,
    settings: IndexSettings,
    allow_build: bool,
) -> list[str]:
    argv = [
        uv_bin, "pip", "compile",
        "--quiet",
        "--generate-hashes",
        "--no-header",
        "--no-annotate",
        "--python-version", python_version,
        "--python-platform", python_platform,
        "--constraint", "constraints.txt",
        "--output-file", "requirements.lock",
    ]  # fmt: skip
    if not allow_build:
        # building an sdist for its metadata runs the package's own setup.py here, on the
        # resolving host; wheels carry their metadata, so refuse sources unless allowed
        argv.append("--no-build")
    if settings.index_url:
        argv.append(f"--index-url={settings.index_url}")
    for url in settings.extra_index_urls:
        argv.append(f"--extra-index-url={url}")
    argv.append("requirements.in")
    return argv


async def resolve_lock(
    requirements: list[str],
    *,
    python_version: str,
    constraints: list[str] = (),
    settings: IndexSettings = IndexSettings(),
    uv_bin: str | None = None,
    timeout: float = 300,
    python_platform: str = DEFAULT_PYTHON_PLATFORM,
    allow_build: bool = False,
    allow_direct_urls: bool = False,
) -> LockResult:
    """Resolve ``requirements`` for ``python_version`` without changing any ``constraints``.

    Runs ``uv pip compile --generate-hashes`` in a temporary directory, with the requests
    and constraints written to files there. Raises InvalidRequirementError for input that
    is not a requirement, ResolutionError (message: uv's explanation) when uv cannot
    resolve, times out, or cannot reach the index.
    """
    if not _PYTHON_VERSION_RE.match(python_version or ""):
        raise ResolutionError(f"python version must look like '3.11', got {python_version!r}")
    if not requirements:
        raise InvalidRequirementError("no packages requested")
    lines = []
    for index, line in enumerate(requirements):
        try:
            validate_requirement(line, allow_direct_urls=allow_direct_urls)
        except InvalidRequirementError as err:
            err.requirement, err.index = line, index
            raise
        lines.append(line.strip())
    constraint_lines = []
    for line in constraints:
        try:
            validate_requirement(line)
        except InvalidRequirementError as err:
            raise InvalidRequirementError(f"bad base image constraint: {err}") from None
        constraint_lines.append(line.strip())

    if uv_bin is None:
        import uv

        uv_bin = uv.find_uv_bin()
    argv = _uv_compile_argv(
        uv_bin,
        python_version=python_version,
        python_platform=python_platform,
        settings=settings,
        allow_build=allow_build,
    )

    with tempfile.TemporaryDirectory(prefix="cnbi-resolve-") as workdir:
        work = Path(workdir)
        (work / "requirements.in").write_text("\n".join(lines) + "\n")
        (work / "constraints.txt").write_text("\n".join(constraint_lines) + "\n")
        try:
            done = await run_process(argv, cwd=workdir, env=_uv_env(settings), timeout=timeout)
        except asyncio.TimeoutError:
            raise ResolutionError(
                f"resolving took longer than {timeout:g}s; try fewer or more tightly pinned packages"
            ) from None
        if done.returncode != 0:
            raise ResolutionError(explain_uv_error(done.stderr))
        text = (work / "requirements.lock").read_text()

    return LockResult(
        text=text,
        sha256=hashlib.sha256(text.encode()).hexdigest(),
        packages=packages_from_lock(text),
    )
