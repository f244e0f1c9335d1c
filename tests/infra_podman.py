"""Pytest plugin: real podman with cnbi_hub's config, local notebook base images, a git server.

Load with ``-p tests.infra_podman`` (or ``pytest_plugins = ["tests.infra_podman"]``). Fixtures:

- ``podman_env`` (session): the environment dict for podman/buildah/skopeo
  (:func:`cnbi_hub.containers.podman_environ`); checks podman runs containers with it.
- ``notebook_base_images`` (session): ``{"debian": ref, "user": ref, "root": ref}``, built into
  local podman storage if missing (about 3 minutes once; cached by content key afterwards).
- ``git_server`` (session): ``git daemon`` on 127.0.0.1 (free port) serving bare repositories
  from a temp dir; ``git_server.make_repo(name, files, branch="main")`` creates one.
- ``make_git_repo`` (function): the same factory, for tests.
- ``sample_git_repos`` (session): ``{"requirements": repo with requirements.txt (tabulate),
  "containerfile": repo with a Containerfile FROM the user notebook base adding a file}``.

Repositories are :class:`GitRepo` values: ``url`` (``git://127.0.0.1:PORT/name.git``),
``commit`` (sha of the branch head), ``branch``, ``path`` (the bare repository on disk).
Nothing here needs a registry on the internet; everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from cnbi_hub.baseimage import ALL_VARIANTS, BaseImageBuilder, ensure_base_images
from cnbi_hub.containers import podman_environ, podman_state_mismatch
from tests.infra_registry import end_process

GIT_DAEMON_START_TIMEOUT = 15.0
REPO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# Fixed identity and dates: same files → same commit sha, whoever runs the tests.
GIT_ENV = {
    "GIT_AUTHOR_NAME": "cnbi tests",
    "GIT_AUTHOR_EMAIL": "tests@cnbi-hub.invalid",
    "GIT_COMMITTER_NAME": "cnbi tests",
    "GIT_COMMITTER_EMAIL": "tests@cnbi-hub.invalid",
    "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}


class InfraError(RuntimeError):
    """A piece of test infrastructure (podman, git daemon) could not be set up."""


def git_environ() -> dict[str, str]:
    return {**os.environ, **GIT_ENV}


def git(*args: str, cwd: Path | None = None) -> str:
    """Run git with argv (never a shell line); return stdout; raise with stderr on failure."""
    result = subprocess.run(["git", *args], cwd=cwd, env=git_environ(), capture_output=True, text=True)
    if result.returncode != 0:
        raise InfraError(f"git {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result.stdout.strip()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def podman(*args: str, env: Mapping[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run podman with cnbi_hub's config; returns the CompletedProcess (check it yourself)."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run(["podman", *args], env=dict(env or podman_environ()), **kwargs)


# -- podman -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def podman_env() -> dict[str, str]:
    if shutil.which("podman") is None:
        raise InfraError("podman is not installed: run scripts/install-system-deps")
    env = podman_environ()
    mismatch = podman_state_mismatch(env)
    if mismatch:
        raise InfraError(
            "podman's state database disagrees with cnbi_hub's storage.conf, so every "
            "`podman run` would hang 20 s on exit. With no containers you need, run "
            "`CONTAINERS_CONF=... CONTAINERS_STORAGE_CONF=... podman system reset` "
            f"(see cnbi_hub.containers).\n{mismatch}"
        )
    return env


@pytest.fixture(scope="session")
def notebook_base_images(podman_env) -> dict[str, str]:
    """{variant: reference} for "debian", "user" and "root"; built if missing."""
    return ensure_base_images(ALL_VARIANTS)


# -- git --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GitRepo:
    name: str
    url: str
    commit: str
    branch: str
    path: Path


class GitServer:
    """A running ``git daemon`` serving the bare repositories under ``root``."""

    def __init__(self, root: Path, port: int, process: subprocess.Popen):
        self.root = root
        self.port = port
        self.process = process

    def url(self, name: str) -> str:
        return f"git://127.0.0.1:{self.port}/{name}.git"

    def make_repo(self, name: str, files: Mapping[str, str | bytes], branch: str = "main") -> GitRepo:
        """Create bare repository ``name.git`` with one commit holding ``files`` on ``branch``.

        ``files`` maps relative paths (``"a/b.txt"``) to text or bytes. Names are unique per
        session: a second repository with the same name raises ValueError rather than changing
        what another test relies on.
        """
        if not REPO_NAME.match(name) or name.endswith(".git"):
            raise ValueError(f"repository name {name!r}: use letters, digits, '.', '_', '-'")
        bare = self.root / f"{name}.git"
        if bare.exists():
            raise ValueError(f"repository {name!r} already exists on this git server")
        if not files:
            raise ValueError("a repository needs at least one file")
        with tempfile.TemporaryDirectory(prefix="cnbi-gitwork-") as work_dir:
            work = Path(work_dir)
            git("init", "--quiet", "--initial-branch", branch, str(work))
            for relative, content in files.items():
                target = (work / relative).resolve()
                if work.resolve() not in target.parents:
                    raise ValueError(f"file path {relative!r} leaves the repository")
                target.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, bytes):
                    target.write_bytes(content)
                else:
                    target.write_text(content)
            git("add", "--all", cwd=work)
            git("commit", "--quiet", "--message", f"{name}: initial content", cwd=work)
            commit = git("rev-parse", "HEAD", cwd=work)
            git("clone", "--quiet", "--bare", str(work), str(bare))
        return GitRepo(name=name, url=self.url(name), commit=commit, branch=branch, path=bare)


def push_commit(repo: GitRepo, files: Mapping[str, str], branch: str | None = None, message: str = "change") -> str:
    """Commit `files` (path -> text) on `branch` (default the repository's) of the served
    repository, as a developer's push would; the new commit."""
    branch = branch or repo.branch
    with tempfile.TemporaryDirectory(prefix="cnbi-gitpush-") as work_dir:
        work = Path(work_dir) / "work"
        git("clone", "--quiet", str(repo.path), str(work))
        if git("ls-remote", "--heads", "origin", branch, cwd=work):
            git("checkout", "--quiet", branch, cwd=work)
        else:
            git("checkout", "--quiet", "-b", branch, cwd=work)
        for relative, content in files.items():
            (work / relative).parent.mkdir(parents=True, exist_ok=True)
            (work / relative).write_text(content)
        git("add", "--all", cwd=work)
        git("commit", "--quiet", "--message", message, cwd=work)
        git("push", "--quiet", "origin", f"HEAD:refs/heads/{branch}", cwd=work)
        return git("rev-parse", "HEAD", cwd=work)


def _wait_for_port(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + GIT_DAEMON_START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise InfraError(f"git daemon exited ({process.returncode}): {log.read_text()}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise InfraError(f"git daemon did not listen on 127.0.0.1:{port}: {log.read_text()}")


@pytest.fixture(scope="session")
def git_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("git-server")
    repos = root / "repos"
    repos.mkdir()
    log = root / "git-daemon.log"
    port = free_port()
    argv = [
        "git", "daemon",
        "--listen=127.0.0.1", f"--port={port}", "--reuseaddr",
        "--export-all", "--informative-errors",
        f"--base-path={repos}", str(repos),
    ]
    with open(log, "wb") as log_file:
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=git_environ())
    try:
        _wait_for_port(port, process, log)
        yield GitServer(repos, port, process)
    finally:
        end_process(process)


@pytest.fixture
def make_git_repo(git_server):
    """make_git_repo(name, files, branch="main") -> GitRepo, served by the session git daemon."""
    return git_server.make_repo


SAMPLE_CONTAINERFILE_MARKER = "/opt/cnbi-sample/hello.txt"


@pytest.fixture(scope="session")
def sample_git_repos(git_server) -> dict[str, GitRepo]:
    # The reference is the plain tag of the user variant; building it is left to tests that run it.
    user_base = BaseImageBuilder().plan("user").reference
    return {
        "requirements": git_server.make_repo(
            "sample-requirements",
            {"requirements.txt": "tabulate==0.9.0\n", "README.md": "pip requirements sample\n"},
        ),
        "containerfile": git_server.make_repo(
            "sample-containerfile",
            {
                "Containerfile": (
                    f"FROM {user_base}\n"
                    "USER root\n"
                    f"COPY hello.txt {SAMPLE_CONTAINERFILE_MARKER}\n"
                    "USER jovyan\n"
                ),
                "hello.txt": "hello from a git repository\n",
            },
        ),
    }
