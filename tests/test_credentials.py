"""Git credentials for private repositories: stored sealed, never shown, used only by their owner.

The API part runs behind the session's real JupyterHub; the build part clones a private
repository from a smart-HTTP git server on 127.0.0.1 that wants a token (tests/infra_githttp.py)
and builds it with podman, then looks for the token everywhere it must not be.
"""

import asyncio
import io
import json
import os
import tarfile
import time

import pytest
from cryptography.fernet import Fernet

from cnbi_hub import credentials, model
from cnbi_hub.credentials import CredentialVault, CredentialUnreadable, check_credential_input
from cnbi_hub.store.sqlite import SQLImageStore
from tests.hubfixtures import ADMIN
from tests.infra_podman import podman

USER_BASE = "localhost/cnbi/notebook-base:py311-user"


# --- the pure part --------------------------------------------------------------------------


@pytest.mark.parametrize("name, body, field", [
    ("Bad_Name", {"host": "github.com", "token": "t"}, "name"),
    ("ok", {"host": "https://github.com", "token": "t"}, "host"),
    ("ok", {"host": "github.com/org", "token": "t"}, "host"),
    ("ok", {"host": "user@github.com", "token": "t"}, "host"),
    ("ok", {"host": "", "token": "t"}, "host"),
    ("ok", {"host": "github.com"}, "token"),
    ("ok", {"host": "github.com", "token": "two words"}, "token"),
    ("ok", {"host": "github.com", "token": "line\nbreak"}, "token"),
    ("ok", {"host": "github.com", "token": "x" * 4097}, "token"),
    ("ok", {"host": "github.com", "token": "t", "username": "a:b"}, "username"),
    ("ok", {"host": "github.com", "token": "t", "password": "p"}, "password"),
    ("ok", ["github.com"], None),
])
def test_bad_credential_input_names_the_field(name, body, field):
    with pytest.raises(model.InvalidObject) as refused:
        check_credential_input(name, body)
    assert refused.value.field == field, refused.value.message


def test_credential_input_is_cleaned():
    clean = check_credential_input("gh", {"host": " GitHub.com ", "token": "ghp_abc"})
    assert clean == {"host": "github.com", "token": "ghp_abc", "username": "oauth2"}
    assert check_credential_input("gl", {"host": "git.example.org:8443", "token": "t", "username": "me"})["host"] \
        == "git.example.org:8443"


@pytest.mark.parametrize("host, url, ok", [
    ("github.com", "https://github.com/org/repo", True),
    ("github.com", "https://gitlab.com/org/repo", False),
    ("github.com", "https://github.com:8443/org/repo", False),
    ("git.example.org:8443", "https://git.example.org:8443/r.git", True),
    ("github.com", "http://github.com/org/repo", False),       # plain http leaves this machine
    ("127.0.0.1:9000", "http://127.0.0.1:9000/r.git", True),  # but not to loopback
    ("github.com", "git://github.com/org/repo", False),
])
def test_a_credential_goes_only_to_its_host_over_https(host, url, ok):
    record = {"name": "c", "host": host}
    if ok:
        credentials.check_credential_for_repository(record, url)
    else:
        with pytest.raises(model.InvalidObject) as refused:
            credentials.check_credential_for_repository(record, url)
        assert refused.value.field == "spec.gitCredential"


def test_vault_seals_opens_rotates_and_refuses_a_lost_key(tmp_path):
    key_file = tmp_path / "credential.key"
    vault = CredentialVault(key_file=str(key_file))
    sealed = vault.seal("alice", "ghp_secret")
    assert "ghp_secret" not in sealed and oct(key_file.stat().st_mode & 0o777) == "0o600"
    record = {"name": "gh", "host": "github.com", "sealed": sealed}
    assert vault.open(record).token == "ghp_secret"
    assert "ghp_secret" not in repr(vault.open(record))
    # rotation: a new key first, the old one still opens what it sealed
    old_key = key_file.read_text().strip()
    rotated = CredentialVault(keys=[Fernet.generate_key().decode(), old_key])
    assert rotated.open(record).username == "alice"
    with pytest.raises(CredentialUnreadable, match="no longer has"):
        CredentialVault(keys=[Fernet.generate_key().decode()]).open(record)
    with pytest.raises(CredentialUnreadable, match="no credential key"):
        CredentialVault().open(record)


async def test_sql_store_keeps_credentials_per_owner(tmp_path):
    store = SQLImageStore(f"sqlite:///{tmp_path}/db.sqlite")
    record = credentials.new_record("alice", "gh", {"host": "github.com", "username": "oauth2"}, "sealed-bytes")
    await store.put_credential(record)
    assert await store.get_credential("alice", "gh") == record
    assert await store.get_credential("bob", "gh") is None
    assert [r["name"] for r in await store.list_credentials("alice")] == ["gh"]
    assert await store.list_credentials("bob") == []
    assert not await store.delete_credential("bob", "gh")
    assert await store.delete_credential("alice", "gh")
    assert await store.get_credential("alice", "gh") is None
    store.close()


# --- the API, behind the hub ----------------------------------------------------------------


def _files_holding(directory, needle: bytes) -> list[str]:
    found = []
    for root, _dirs, files in os.walk(directory):
        for file_name in files:
            path = os.path.join(root, file_name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    if needle in f.read():
                        found.append(path)
    return found


@pytest.fixture(scope="module")
def people(hub):
    return {name: hub.token(name) for name in ("cred-alice", "cred-bob", ADMIN)}


def _git_spec(url, credential=None):
    spec = {"buildType": "GitRepository", "repository": url, "baseImage": USER_BASE}
    if credential:
        spec["gitCredential"] = credential
    return {"spec": spec}


async def test_credentials_api_stores_lists_replaces_and_never_returns_the_token(hub, people):
    alice, bob, admin = people["cred-alice"], people["cred-bob"], people[ADMIN]
    token = "ghp_" + os.urandom(16).hex()
    r = await hub.api("PUT", "api/credentials/github", alice, {"host": "github.com", "token": token})
    assert r.code == 201, r.body
    assert r.json()["host"] == "github.com" and r.json()["username"] == "oauth2"
    r = await hub.api("PUT", "api/credentials/github", alice, {"host": "github.com", "token": token + "2",
                                                               "username": "alice"})
    assert r.code == 200 and r.json()["username"] == "alice"
    listed = await hub.api("GET", "api/credentials", alice)
    assert [c["name"] for c in listed.json()["items"]] == ["github"]
    for response in (r, listed):
        assert token not in response.body.decode()
    # nobody else sees it, admins included; bob cannot delete it
    assert (await hub.api("GET", "api/credentials", bob)).json()["items"] == []
    assert (await hub.api("GET", "api/credentials", admin)).json()["items"] == []
    assert (await hub.api("DELETE", "api/credentials/github", bob)).code == 404
    # sealed at rest: no file of the service (the database, its WAL) holds the token
    assert _files_holding(hub.data_dir, (token + "2").encode()) == []
    assert (await hub.api("DELETE", "api/credentials/github", alice)).code == 204
    assert (await hub.api("GET", "api/credentials", alice)).json()["items"] == []


async def test_bad_credentials_and_bad_uses_are_refused_with_the_field(hub, people):
    alice, bob = people["cred-alice"], people["cred-bob"]
    r = await hub.api("PUT", "api/credentials/gitlab", alice, {"host": "https://gitlab.com", "token": "x"})
    assert r.code == 422 and r.json()["field"] == "host"
    r = await hub.api("PUT", "api/credentials/gitlab", alice, raw=b"{not json")
    assert r.code == 400
    r = await hub.api("PUT", "api/credentials/gitlab", None, {"host": "gitlab.com", "token": "x"})
    assert r.code == 403
    assert (await hub.api("PUT", "api/credentials/gitlab", alice, {"host": "gitlab.com", "token": "glpat-x"})).code \
        == 201
    # an image may name only a credential of its creator, for its repository's host
    r = await hub.api("POST", "api/images?dryRun=true", bob, _git_spec("https://gitlab.com/a/b.git", "gitlab"))
    assert r.code == 422 and r.json()["field"] == "spec.gitCredential", r.body
    r = await hub.api("POST", "api/images?dryRun=true", alice, _git_spec("https://github.com/a/b.git", "gitlab"))
    assert r.code == 422 and r.json()["field"] == "spec.gitCredential"
    assert "gitlab.com" in r.json()["message"] and r.json()["relatedField"] == "spec.repository"
    r = await hub.api("POST", "api/images?dryRun=true", alice, _git_spec("https://gitlab.com/a/b.git", "gitlab"))
    assert r.code == 200, r.body
    r = await hub.api("POST", "api/images?dryRun=true", alice, {"spec": {
        "buildType": "PackageList", "baseImage": USER_BASE, "packageVersions": ["six"], "gitCredential": "gitlab"}})
    assert r.code == 422 and r.json()["field"] == "spec.gitCredential"
    # a token in the URL would be stored and shown as given
    r = await hub.api("POST", "api/images?dryRun=true", alice, _git_spec("https://oauth2:glpat-x@gitlab.com/a/b.git"))
    assert r.code == 422 and r.json()["field"] == "spec.repository" and "glpat-x" not in r.json()["message"]
    assert (await hub.api("DELETE", "api/credentials/gitlab", alice)).code == 204


# --- a build from a private repository ------------------------------------------------------


async def _wait_for(hub, token, name, timeout=600):
    deadline = time.monotonic() + timeout
    while True:
        obj = (await hub.api("GET", f"api/images/{name}", token)).json()
        if model.phase_of(obj) in model.TERMINAL_PHASES:
            return obj
        assert time.monotonic() < deadline, obj.get("status")
        await asyncio.sleep(1)


def _layers(image: str, podman_env) -> list[str]:
    inspected = podman("image", "inspect", "--format", "{{json .RootFS.Layers}}", image, env=podman_env)
    assert inspected.returncode == 0, inspected.stderr
    return [digest.split(":")[-1] for digest in json.loads(inspected.stdout)]


def _build_layers_holding(image: str, base: str, needle: bytes, podman_env, tmp_path) -> tuple[int, list[str]]:
    """(how many layers the build added to `base`, the files in them or in the image's config
    and manifest that hold `needle`), from `podman save` (docker-archive: <diff id>.tar each)."""
    added = set(_layers(image, podman_env)) - set(_layers(base, podman_env))
    archive = tmp_path / "image.tar"
    saved = podman("save", "--format", "docker-archive", "-o", str(archive), image, env=podman_env)
    assert saved.returncode == 0, saved.stderr
    found, seen = [], 0
    with tarfile.open(archive) as outer:
        for member in outer.getmembers():
            if not member.isfile():
                continue
            layer_id = os.path.basename(member.name).removesuffix(".tar") if member.name.endswith(".tar") else None
            if layer_id is None or layer_id in added or os.path.dirname(member.name) in added:
                data = outer.extractfile(member).read()
                if layer_id is None:
                    if needle in data:
                        found.append(member.name)
                    continue
                seen += 1
                with tarfile.open(fileobj=io.BytesIO(data)) as layer:
                    for inner in layer.getmembers():
                        if inner.isfile() and needle in layer.extractfile(inner).read():
                            found.append(f"{member.name}:{inner.name}")
    return seen, found


@pytest.mark.podman
async def test_a_private_repository_builds_with_its_owners_token_which_leaks_nowhere(
        hub, people, private_git_server, notebook_base_images, podman_env, tmp_path):
    alice, bob = people["cred-alice"], people["cred-bob"]
    token = private_git_server.token
    repo = private_git_server.make_repo("private-requirements", {
        "requirements.txt": "tabulate==0.9.0\n", "README.md": "a private repository\n"})
    host = f"127.0.0.1:{private_git_server.port}"

    # without a credential, the build fails in Prepare saying what to do
    bare = (await hub.api("POST", "api/images", bob, _git_spec(repo.url))).json()["metadata"]["name"]
    failed = await _wait_for(hub, bob, bare, timeout=120)
    assert model.phase_of(failed) == "Failed" and failed["status"]["failedPhase"] == "Prepare"
    prepared = next(c for c in failed["status"]["conditions"] if c["type"] == "Prepared")
    assert prepared["reason"] == "GitAuthenticationFailed" and "spec.gitCredential" in prepared["message"]

    r = await hub.api("PUT", "api/credentials/private-git", alice, {"host": host, "token": token})
    assert r.code == 201, r.body
    # bob names alice's credential: it is not his
    r = await hub.api("POST", "api/images", bob, _git_spec(repo.url, "private-git"))
    assert r.code == 422 and r.json()["field"] == "spec.gitCredential"

    r = await hub.api("POST", "api/images", alice, _git_spec(repo.url, "private-git"))
    assert r.code == 201, r.body
    name = r.json()["metadata"]["name"]
    obj = await _wait_for(hub, alice, name)
    assert model.phase_of(obj) == "Ready", obj["status"]
    assert obj["status"]["gitCommit"] == repo.commit
    assert any(method == "POST" and authorized for method, _, authorized in private_git_server.requests)

    # the token is in no API answer, no log, no stored file and no image layer
    needle = token.encode()
    answers = [await hub.api("GET", f"api/images/{name}", alice), await hub.api("GET", "api/images", alice),
               await hub.api("GET", f"api/images/{name}/logs", alice),
               await hub.api("GET", f"api/images/{name}/lock", alice),
               await hub.api("GET", "api/credentials", alice)]
    for answer in answers:
        assert needle not in answer.body, answer.effective_url
    assert "using the git credential private-git" in answers[2].body.decode()
    assert _files_holding(hub.data_dir, needle) == []
    layers, holding = _build_layers_holding(obj["status"]["image"], USER_BASE, needle, podman_env, tmp_path)
    assert layers >= 1 and holding == []
    # the image holds what the repository asked for
    ran = podman("run", "--rm", obj["status"]["image"], "python", "-c", "import tabulate", env=podman_env)
    assert ran.returncode == 0, ran.stderr

    # a stored credential removed: the next build says so, in Prepare
    assert (await hub.api("DELETE", "api/credentials/private-git", alice)).code == 204
    r = await hub.api("POST", f"api/images/{name}/rebuild", alice)
    assert r.code == 200, r.body
    obj = await _wait_for(hub, alice, name, timeout=120)
    assert model.phase_of(obj) == "Failed"
    prepared = next(c for c in obj["status"]["conditions"] if c["type"] == "Prepared")
    assert prepared["reason"] == "GitCredentialNotFound", prepared
