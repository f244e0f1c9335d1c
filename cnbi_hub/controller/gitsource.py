"""Git sources for GitRepository builds: pin a ref to a commit, fetch exactly that commit.

Repository URLs and refs come from users. They are passed to git as argv items after ``--``
(never through a shell), only the URL's own transport is enabled for the call (``ext::``,
which runs commands, never), and git runs without the host's git configuration and without
prompting for credentials.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from ..credentials import GitCredential
from .proc import run_process

__all__ = [
    "GitAuthenticationFailed",
    "GitError",
    "GitRefNotFound",
    "allowed_scheme",
    "containerfile_name",
    "detect_extras",
    "detect_recipe",
    "ls_remote",
    "repo_files",
    "shallow_clone",
    "validate_ref",
]

#: transports git may use at all; a URL's scheme must also be in the caller's allowed set
KNOWN_TRANSPORTS = ("https", "http", "git", "ssh", "file")

_COMMIT_RE = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_REF_FORBIDDEN_RE = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
DEFAULT_TIMEOUT = 120


class GitError(Exception):
    """git failed: the repository is unreachable, not a repository, or access was refused."""


class GitAuthenticationFailed(GitError):
    """The git host asked for a login: the repository is private (or hidden), and no credential
    was given or the one given was refused."""


class GitRefNotFound(GitError):
    """The repository has no branch, tag or commit by that name."""


class GitDiskFull(GitError):
    """This machine's disk filled while git wrote the checkout (not the remote's: its lines
    start with "remote:")."""


def allowed_scheme(url: str, allowed: tuple[str, ...] = ("https",)) -> None:
    """Raise ValueError unless ``url`` is a ``scheme://`` URL whose scheme is allowed.

    scp-like ``host:path`` and bare paths are refused: they are ssh or local access in
    disguise, and their meaning depends on the host that runs git.
    """
    if not isinstance(url, str) or not url:
        raise ValueError("repository URL is empty")
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in url):
        raise ValueError(f"repository URL must not contain spaces or control characters: {url!r}")
    if url.startswith("-"):
        raise ValueError(f"repository URL must not start with '-': {url!r}")
    if "::" in url.split("/", 1)[0]:
        raise ValueError(f"git remote helpers ('transport::address') are not allowed: {url!r}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if "://" not in url or not scheme:
        raise ValueError(
            f"repository must be a URL such as https://github.com/org/repo, got {url!r}"
        )
    if scheme not in allowed or scheme not in KNOWN_TRANSPORTS:
        raise ValueError(
            f"repository URL scheme {scheme!r} is not allowed; use one of: {', '.join(allowed)}"
        )
    if scheme != "file" and not parts.hostname:
        raise ValueError(f"repository URL has no host: {url!r}")


def validate_ref(ref: str) -> None:
    """Raise ValueError unless ``ref`` is a branch, tag, full ref name or commit sha git accepts.

    The rules of ``git check-ref-format --allow-onelevel``, plus: no leading '-'.
    """
    if not isinstance(ref, str) or not ref:
        raise ValueError("git ref is empty")
    if (
        ref.startswith(("-", "/"))
        or ref.endswith(("/", ".", ".lock"))
        or ".." in ref
        or "//" in ref
        or "@{" in ref
        or ref == "@"
        or _REF_FORBIDDEN_RE.search(ref)
        or any(part.startswith(".") for part in ref.split("/"))
    ):
        raise ValueError(f"not a valid git branch, tag or commit: {ref!r}")


# git's credential helper for a stored credential (cnbi_hub.credentials): a fixed program that
# reads the token from the environment and answers only for the credential's own host (a
# redirect elsewhere gets nothing); no user string is part of it, the values stay data
CREDENTIAL_HELPER = (
    '!f() { test "$1" = get || exit 0; h=; while IFS= read -r line && test -n "$line"; do '
    'case "$line" in host=*) h="${line#host=}";; esac; done; '
    'test "$h" = "$CNBI_GIT_HOST" || exit 0; '
    "printf 'username=%s\\npassword=%s\\n' \"$CNBI_GIT_USERNAME\" \"$CNBI_GIT_PASSWORD\"; }; f"
)


def _git_env(credential: GitCredential | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    # CA settings are how this host reaches HTTPS remotes through its proxy; keep them
    for key in ("GIT_SSL_CAINFO", "GIT_SSL_CAPATH"):
        if key in os.environ:
            env[key] = os.environ[key]
    env.update(
        GIT_TERMINAL_PROMPT="0",
        GIT_ASKPASS="/bin/false",
        SSH_ASKPASS="/bin/false",
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL=os.devnull,
        # BatchMode: never ask for a password or to accept an unknown host key
        GIT_SSH_COMMAND="ssh -o BatchMode=yes",
        LC_ALL="C",
    )
    if credential is not None:
        env.update(CNBI_GIT_HOST=credential.host, CNBI_GIT_USERNAME=credential.username,
                   CNBI_GIT_PASSWORD=credential.token)
    return env


def _git_argv(url: str | None, *args: str, credential: GitCredential | None = None) -> list[str]:
    argv = [
        "git",
        "-c", "protocol.allow=never",
        "-c", "core.fsmonitor=false",
        "-c", "core.hooksPath=" + os.devnull,
        "-c", "credential.helper=",
        "-c", "http.followRedirects=initial",
        "-c", "advice.detachedHead=false",
        "-c", "init.defaultBranch=main",
    ]  # fmt: skip
    if url is not None:
        scheme = urlsplit(url).scheme.lower()
        argv += ["-c", f"protocol.{scheme}.allow=always"]
    if credential is not None:
        argv += ["-c", "credential.helper=" + CREDENTIAL_HELPER]
    return argv + list(args)


async def _run_git(
    argv: list[str], *, cwd: str | None = None, timeout: float, credential: GitCredential | None = None
) -> tuple[int, str, str]:
    try:
        done = await run_process(argv, cwd=cwd, env=_git_env(credential), timeout=timeout)
    except asyncio.TimeoutError:
        raise GitError(f"git did not answer within {timeout:g}s") from None
    return done.returncode, done.stdout, done.stderr


def _git_message(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    lines = [line.removeprefix("fatal: ").removeprefix("error: ") for line in lines]
    return "; ".join(lines[-3:]) or "git failed without a message"


_LOGIN_ASKED = ("could not read username", "terminal prompts disabled", "authentication failed",
                "invalid username or password", "http basic: access denied")


def _refusal(url: str, message: str, credential: GitCredential | None, doing: str) -> GitError:
    """The error for a failed git call: a login the host asked for in plain words (git's own
    are about askpass and terminal prompts), anything else as git said it."""
    if any(s in message.lower() for s in _LOGIN_ASKED):
        if credential is None:
            return GitAuthenticationFailed(
                f"{url} asks for a login: the repository is private or does not exist. Store a token for "
                f"{urlsplit(url).netloc.rpartition('@')[2]} as a git credential and name it in spec.gitCredential")
        return GitAuthenticationFailed(
            f"{urlsplit(url).netloc.rpartition('@')[2]} refused the credential for {url}: the token is wrong, "
            "expired, or may not read this repository")
    if _local_disk_full(message):
        return GitDiskFull(f"{doing}: {message}")
    return GitError(f"{doing}: {message}")


def _local_disk_full(message: str) -> bool:
    return any("No space left on device" in line and "remote:" not in line.split("No space left on device")[0]
               for line in message.split("; "))


def _parse_ls_remote(output: str) -> tuple[dict[str, str], str | None]:
    refs: dict[str, str] = {}
    head_target = None
    for line in output.splitlines():
        if line.startswith("ref: ") and "\t" in line:
            target, name = line[5:].split("\t", 1)
            if name == "HEAD":
                head_target = target
            continue
        if "\t" in line:
            sha, name = line.split("\t", 1)
            refs[name] = sha
    return refs, head_target


def pick_commit(refs: dict[str, str], ref: str) -> str | None:
    """The commit ``ref`` names among ls-remote's ``refs``, as git would pick it.

    Branches before tags; an annotated tag means the commit it points to (``^{}``).
    """
    candidates = [ref] if ref.startswith("refs/") else [f"refs/heads/{ref}", f"refs/tags/{ref}"]
    for name in candidates:
        if name + "^{}" in refs:
            return refs[name + "^{}"]
        if name in refs:
            return refs[name]
    return None


async def ls_remote(
    url: str, ref: str | None = None, *, timeout: float = DEFAULT_TIMEOUT, credential: GitCredential | None = None
) -> str:
    """The commit sha that ``ref`` (branch, tag, full ref; None: the default branch) names now.

    A full commit sha is returned as given: git cannot check one without fetching it, so
    ``shallow_clone`` is where a missing commit shows up (as GitRefNotFound).
    """
    allowed_scheme(url, KNOWN_TRANSPORTS)
    if ref is not None:
        validate_ref(ref)
        if _COMMIT_RE.match(ref):
            return ref
    # ls-remote only lists a tag's peeled commit ("v1^{}") when asked for it by name
    patterns = ["HEAD"] if ref is None else [ref, ref + "^{}"]
    args = ["ls-remote", "--symref", "--", url, *patterns]
    code, out, err = await _run_git(_git_argv(url, *args, credential=credential), timeout=timeout,
                                    credential=credential)
    if code != 0:
        raise _refusal(url, _git_message(err), credential, f"cannot read repository {url}")
    refs, head_target = _parse_ls_remote(out)
    if ref is None:
        if "HEAD" not in refs:
            raise GitRefNotFound(
                f"repository {url} has no default branch (is it empty?)"
                + (f"; HEAD points to missing {head_target}" if head_target else "")
            )
        return refs["HEAD"]
    commit = pick_commit(refs, ref)
    if commit is None:
        raise GitRefNotFound(f"repository {url} has no branch or tag named {ref!r}")
    return commit


async def shallow_clone(
    url: str, commit: str, dest: str | os.PathLike, *, timeout: float = DEFAULT_TIMEOUT,
    credential: GitCredential | None = None,
) -> None:
    """Fetch exactly ``commit`` (depth 1) from ``url`` into the new or empty directory ``dest``.

    Checks out a detached HEAD and verifies it is ``commit``. No submodules, no LFS, no hooks.
    """
    allowed_scheme(url, KNOWN_TRANSPORTS)
    if not isinstance(commit, str) or not _COMMIT_RE.match(commit):
        raise ValueError(f"commit must be a full lowercase hex sha, got {commit!r}")
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise GitError(f"clone destination {dest} is not empty")
    dest.mkdir(parents=True, exist_ok=True)

    code, _, err = await _run_git(_git_argv(None, "init", "-q", "--", str(dest)), timeout=timeout)
    if code != 0:
        raise GitError(f"cannot create a repository in {dest}: {_git_message(err)}")
    code, _, err = await _run_git(
        _git_argv(url, "fetch", "-q", "--no-tags", "--depth", "1", "--", url, commit, credential=credential),
        cwd=str(dest),
        timeout=timeout,
        credential=credential,
    )
    if code != 0:
        message = _git_message(err)
        lowered = message.lower()
        if any(
            s in lowered
            for s in (
                "not our ref",
                "couldn't find remote ref",
                "no such remote ref",
                "unadvertised object",
            )
        ):
            raise GitRefNotFound(f"repository {url} has no commit {commit}")
        raise _refusal(url, message, credential, f"cannot fetch {commit} from {url}")
    code, _, err = await _run_git(
        _git_argv(None, "checkout", "-q", "--detach", commit), cwd=str(dest), timeout=timeout
    )
    if code != 0:
        raise _refusal(url, _git_message(err), None, f"cannot check out {commit}")
    code, out, err = await _run_git(
        _git_argv(None, "rev-parse", "--verify", "HEAD"), cwd=str(dest), timeout=timeout
    )
    if code != 0 or out.strip() != commit:
        raise GitError(f"checked out {out.strip() or '?'} instead of {commit}")


def containerfile_name(files: set[str]) -> str | None:
    """Which container recipe file a repository has at its top, ``Containerfile`` first."""
    for name in ("Containerfile", "Dockerfile"):
        if name in files:
            return name
    return None


def detect_recipe(files: set[str]) -> str | None:
    """How to build a repository from its top-level file names.

    ``"containerfile"`` (Containerfile or Dockerfile: the repository builds itself),
    ``"environment"`` (environment.yml/.yaml), ``"requirements"`` (requirements.txt), or
    None (nothing to install; apt.txt/postBuild may still apply, see detect_extras).
    """
    if containerfile_name(files):
        return "containerfile"
    if "environment.yml" in files or "environment.yaml" in files:
        return "environment"
    if "requirements.txt" in files:
        return "requirements"
    return None


def detect_extras(files: set[str]) -> dict[str, bool]:
    """repo2docker-style extras next to the recipe: ``apt`` (apt.txt), ``postbuild`` (postBuild)."""
    return {"apt": "apt.txt" in files, "postbuild": "postBuild" in files}


def repo_files(checkout: str | os.PathLike) -> set[str]:
    """Top-level names in a checkout (what detect_recipe looks at), without ``.git``."""
    return {entry.name for entry in os.scandir(checkout) if entry.name != ".git"}
