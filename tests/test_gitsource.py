"""gitsource against real git repositories served over file:// and git daemon on 127.0.0.1."""

import asyncio
import os
import socket
import subprocess
import time

import pytest

from cnbi_hub.controller.gitsource import (
    GitAuthenticationFailed,
    GitError,
    GitRefNotFound,
    allowed_scheme,
    containerfile_name,
    detect_extras,
    detect_recipe,
    ls_remote,
    repo_files,
    shallow_clone,
    validate_ref,
)

GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.org",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.org",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}


def git(*args, cwd=None):
    return subprocess.run(
        ["git", *args], cwd=cwd, env=GIT_ENV, check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture
def remote(tmp_path):
    """A bare repository with two commits on main, a branch `dev`, tags `v1` (annotated) and `light`."""
    bare = tmp_path / "srv" / "repo.git"
    bare.parent.mkdir()
    git("init", "-q", "--bare", "-b", "main", str(bare))
    work = tmp_path / "work"
    git("init", "-q", "-b", "main", str(work))
    (work / "requirements.txt").write_text("six\n")
    git("add", ".", cwd=work)
    git("commit", "-q", "-m", "first", cwd=work)
    first = git("rev-parse", "HEAD", cwd=work)
    git("tag", "-a", "v1", "-m", "release 1", cwd=work)
    git("tag", "light", cwd=work)
    (work / "Containerfile").write_text("FROM scratch\n")
    (work / "apt.txt").write_text("curl\n")
    git("add", ".", cwd=work)
    git("commit", "-q", "-m", "second", cwd=work)
    second = git("rev-parse", "HEAD", cwd=work)
    git("branch", "dev", first, cwd=work)
    git("push", "-q", str(bare), "main", "dev", "v1", "light", cwd=work)
    return {"url": bare.as_uri(), "bare": bare, "first": first, "second": second}


@pytest.mark.asyncio
async def test_ls_remote_default_branch_branch_and_tags(remote):
    url = remote["url"]
    assert await ls_remote(url) == remote["second"]
    assert await ls_remote(url, "main") == remote["second"]
    assert await ls_remote(url, "dev") == remote["first"]
    assert await ls_remote(url, "refs/heads/dev") == remote["first"]
    # an annotated tag names the commit it points to, not the tag object
    assert await ls_remote(url, "v1") == remote["first"]
    assert await ls_remote(url, "light") == remote["first"]


@pytest.mark.asyncio
async def test_ls_remote_missing_ref(remote):
    with pytest.raises(GitRefNotFound, match="nope"):
        await ls_remote(remote["url"], "nope")
    # "in" is a suffix of nothing here, but "ain" must not match "main" either
    with pytest.raises(GitRefNotFound):
        await ls_remote(remote["url"], "ain")


@pytest.mark.asyncio
async def test_ls_remote_unreachable(tmp_path):
    with pytest.raises(GitError) as info:
        await ls_remote((tmp_path / "does-not-exist.git").as_uri())
    assert not isinstance(info.value, GitRefNotFound)
    assert "does-not-exist" in str(info.value)


@pytest.mark.asyncio
async def test_ls_remote_empty_repository(tmp_path):
    bare = tmp_path / "empty.git"
    git("init", "-q", "--bare", str(bare))
    with pytest.raises(GitRefNotFound, match="default branch"):
        await ls_remote(bare.as_uri())


@pytest.mark.asyncio
async def test_shallow_clone_fetches_exactly_the_commit(remote, tmp_path):
    dest = tmp_path / "checkout"
    await shallow_clone(remote["url"], remote["first"], dest)
    assert git("rev-parse", "HEAD", cwd=dest) == remote["first"]
    assert git("rev-list", "--count", "HEAD", cwd=dest) == "1"  # depth 1
    assert repo_files(dest) == {"requirements.txt"}
    assert detect_recipe(repo_files(dest)) == "requirements"

    dest2 = tmp_path / "checkout2"
    await shallow_clone(remote["url"], remote["second"], dest2)
    assert repo_files(dest2) == {"requirements.txt", "Containerfile", "apt.txt"}
    assert detect_recipe(repo_files(dest2)) == "containerfile"


@pytest.mark.asyncio
async def test_shallow_clone_missing_commit(remote, tmp_path):
    with pytest.raises(GitRefNotFound):
        await shallow_clone(remote["url"], "0" * 40, tmp_path / "c")


@pytest.mark.asyncio
async def test_shallow_clone_refuses_nonempty_dest_and_bad_sha(remote, tmp_path):
    dest = tmp_path / "full"
    dest.mkdir()
    (dest / "x").write_text("x")
    with pytest.raises(GitError, match="not empty"):
        await shallow_clone(remote["url"], remote["first"], dest)
    with pytest.raises(ValueError):
        await shallow_clone(remote["url"], "main", tmp_path / "other")


@pytest.mark.asyncio
async def test_hostile_urls_and_refs_never_run_anything(remote, tmp_path):
    canary = tmp_path / "pwned"
    with pytest.raises(ValueError):
        await ls_remote(f"ext::sh -c touch% {canary}")
    with pytest.raises(ValueError):
        await ls_remote(f"--upload-pack=touch {canary}")
    with pytest.raises(ValueError):
        await ls_remote(remote["url"], f"--upload-pack=touch {canary}")
    # an option-looking ref that slips past nothing still is only a pattern after `--`
    with pytest.raises(GitRefNotFound):
        await ls_remote(remote["url"], "upload-pack=touch")
    for url, ref in ((f"-c core.sshCommand=touch {canary}", None), (remote["url"], f"-c core.sshCommand=touch {canary}")):
        with pytest.raises(ValueError):
            await ls_remote(url, ref)
    # an admin who allows ssh: a host that is an option is git's own refusal, nothing runs
    with pytest.raises(GitError):
        await ls_remote(f"ssh://-oProxyCommand=touch%20{canary}/repo.git")
    with pytest.raises(ValueError):
        await shallow_clone(f"ext::sh -c touch% {canary}", "a" * 40, tmp_path / "ext")
    assert not canary.exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.asyncio
async def test_git_daemon_on_loopback(remote, tmp_path):
    port = _free_port()
    base = remote["bare"].parent
    daemon = subprocess.Popen(
        ["git", "daemon", "--reuseaddr", "--export-all", f"--base-path={base}",
         "--listen=127.0.0.1", f"--port={port}", str(base)],
        env=GIT_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        url = f"git://127.0.0.1:{port}/repo.git"
        allowed_scheme(url, ("git",))
        commit = await ls_remote(url, "dev")
        assert commit == remote["first"]
        dest = tmp_path / "via-daemon"
        await shallow_clone(url, commit, dest)
        assert git("rev-parse", "HEAD", cwd=dest) == remote["first"]
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)


def test_allowed_scheme():
    allowed_scheme("https://github.com/org/repo")
    allowed_scheme("file:///srv/repo.git", ("https", "file"))
    for bad in [
        "http://github.com/org/repo",  # not in the default allowed set
        "git@github.com:org/repo.git",  # scp-like ssh
        "/srv/repo.git",
        "ext::sh -c id",
        "https://",
        "https://github.com/org/repo with space",
        "file:///srv/repo.git",  # file not allowed unless asked for
        "",
    ]:
        with pytest.raises(ValueError):
            allowed_scheme(bad)
    with pytest.raises(ValueError, match="'ftp'"):
        allowed_scheme("ftp://example.org/repo", ("https", "ftp"))


def test_validate_ref():
    for good in ["main", "feature/x", "v1.2.3", "refs/heads/main", "a" * 40]:
        validate_ref(good)
    for bad in [
        "-x",
        "a..b",
        "a b",
        "a~1",
        "HEAD^",
        "x.lock",
        ".hidden",
        "a//b",
        "a@{1}",
        "",
        "x/",
    ]:
        with pytest.raises(ValueError):
            validate_ref(bad)


def test_detect_recipe_priority():
    assert detect_recipe({"Containerfile", "Dockerfile", "requirements.txt"}) == "containerfile"
    assert containerfile_name({"Containerfile", "Dockerfile"}) == "Containerfile"
    assert containerfile_name({"Dockerfile", "environment.yml"}) == "Dockerfile"
    assert detect_recipe({"Dockerfile", "environment.yml"}) == "containerfile"
    assert detect_recipe({"environment.yml", "requirements.txt"}) == "environment"
    assert detect_recipe({"requirements.txt", "apt.txt"}) == "requirements"
    assert detect_recipe({"apt.txt", "postBuild", "README.md"}) is None
    assert detect_extras({"apt.txt", "postBuild"}) == {"apt": True, "postbuild": True}
    assert detect_extras({"requirements.txt"}) == {"apt": False, "postbuild": False}


# -- private repositories: a token through the credential helper --------------------------------


def _files_under(path):
    for root, _dirs, names in os.walk(path):
        for name in names:
            yield os.path.join(root, name)


async def test_a_private_repository_is_read_with_the_token_and_the_token_stays_out(private_git_server, tmp_path):
    from cnbi_hub.credentials import GitCredential

    repo = private_git_server.make_repo("gitsource-private", {"requirements.txt": "tabulate==0.9.0\n"})
    host = f"127.0.0.1:{private_git_server.port}"
    credential = GitCredential(host=host, username="alice", token=private_git_server.token)

    with pytest.raises(GitAuthenticationFailed) as refused:
        await ls_remote(repo.url, "main")
    assert "asks for a login" in str(refused.value) and "spec.gitCredential" in str(refused.value)
    wrong = GitCredential(host=host, username="alice", token="github_pat_wrong")
    with pytest.raises(GitAuthenticationFailed) as refused:
        await ls_remote(repo.url, "main", credential=wrong)
    assert f"{host} refused the credential" in str(refused.value)
    assert "github_pat_wrong" not in str(refused.value)

    commit = await ls_remote(repo.url, "main", credential=credential)
    assert commit == repo.commit
    dest = tmp_path / "checkout"
    await shallow_clone(repo.url, commit, dest, credential=credential)
    assert (dest / "requirements.txt").read_text() == "tabulate==0.9.0\n"
    # nothing of the checkout (.git/config, FETCH_HEAD, logs) holds the token: it is the build context
    for path in _files_under(dest):
        with open(path, "rb") as f:
            assert private_git_server.token.encode() not in f.read(), path
    assert repr(credential).count(private_git_server.token) == 0


async def test_a_credential_is_sent_only_to_its_own_host(private_git_server, tmp_path):
    from cnbi_hub.credentials import GitCredential

    repo = private_git_server.make_repo("gitsource-private-host", {"README.md": "x\n"})
    sent_before = len(private_git_server.authorization_headers)
    elsewhere = GitCredential(host="github.com", username="alice", token=private_git_server.token)
    with pytest.raises(GitError):
        await ls_remote(repo.url, "main", credential=elsewhere)
    # the helper answered nothing for 127.0.0.1:<port>, so git sent no token there
    assert len(private_git_server.authorization_headers) == sent_before


async def test_a_moving_repository_has_a_new_commit_after_each_fetch(private_git_server, tmp_path):
    """The test server's "moving" repositories (the UI's newer-build flow builds them twice)."""
    from cnbi_hub.credentials import GitCredential

    repo = private_git_server.make_repo("gitsource-moving", {"README.md": "first\n"})
    private_git_server.moving[repo.name] = repo
    credential = GitCredential(host=f"127.0.0.1:{private_git_server.port}", username="u",
                               token=private_git_server.token)
    first = await ls_remote(repo.url, "main", credential=credential)
    assert first == repo.commit
    await shallow_clone(repo.url, first, tmp_path / "one", credential=credential)
    second = await ls_remote(repo.url, "main", credential=credential)
    assert second != first
    await shallow_clone(repo.url, second, tmp_path / "two", credential=credential)
    assert (tmp_path / "two" / "README.md").read_text().startswith("moved on after fetch")
