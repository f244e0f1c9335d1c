"""Push webhooks: the pure part (signatures, payloads, which images track a push) and, through
the real hub's proxy, a signed GitHub push that rebuilds a GitRepository image at the pushed
commit, beside the deliveries that must start nothing (unsigned, wrongly signed, replayed,
another branch)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid

import pytest

from cnbi_hub import model, webhooks
from cnbi_hub.controller.statemachine import MAX_REMEMBERED_TRIGGERS, rebuild_after_this_run, rebuilt
from tests.hubfixtures import GITHUB_WEBHOOK_SECRET, GITLAB_WEBHOOK_TOKEN
from tests.infra_podman import push_commit

USER_BASE = "localhost/cnbi/notebook-base:py311-user"


def github_push(clone_url: str, branch: str, before: str, after: str, default_branch: str = "main") -> dict:
    """The parts of GitHub's push payload that matter here, shaped as GitHub sends them."""
    return {
        "ref": f"refs/heads/{branch}", "before": before, "after": after, "created": False, "deleted": False,
        "repository": {"full_name": "org/repo", "clone_url": clone_url, "html_url": clone_url.removesuffix(".git"),
                       "default_branch": default_branch},
        "pusher": {"name": "octocat"}, "sender": {"login": "octocat"},
    }


def signed(body: bytes, secret: str = GITHUB_WEBHOOK_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


# -- pure ------------------------------------------------------------------------------------


def test_github_signature_is_checked_in_full():
    body = b'{"ref": "refs/heads/main"}'
    assert webhooks.github_signature_valid("s3cret", body, signed(body, "s3cret"))
    assert not webhooks.github_signature_valid("s3cret", body, signed(body, "other"))
    assert not webhooks.github_signature_valid("s3cret", body + b" ", signed(body, "s3cret"))
    assert not webhooks.github_signature_valid("s3cret", body, None)
    assert not webhooks.github_signature_valid("s3cret", body, signed(body, "s3cret").replace("sha256=", "sha1="))
    assert not webhooks.github_signature_valid("", body, signed(body, ""))  # no secret: nothing is valid
    assert webhooks.gitlab_token_valid("tok", "tok") and not webhooks.gitlab_token_valid("tok", "tok2")
    assert not webhooks.gitlab_token_valid("tok", None) and not webhooks.gitlab_token_valid("", "")


@pytest.mark.parametrize("url", [
    "https://github.com/Org/Repo.git", "https://github.com/Org/Repo", "http://GitHub.com/Org/Repo/",
    "git@github.com:Org/Repo.git", "ssh://git@github.com/Org/Repo.git", "git://github.com/Org/Repo.git",
])
def test_repository_urls_of_one_repository_compare_equal(url):
    assert webhooks.normalize_repository_url(url) == "github.com/Org/Repo"


def test_ports_and_paths_keep_repositories_apart():
    assert webhooks.normalize_repository_url("git://127.0.0.1:9418/a.git") == "127.0.0.1:9418/a"
    assert webhooks.normalize_repository_url("git://127.0.0.1:9419/a.git") != "127.0.0.1:9418/a"
    assert webhooks.normalize_repository_url("https://github.com/org/repo") != \
        webhooks.normalize_repository_url("https://github.com/org/repo2")


def image(repository: str, git_ref: str | None = None, build_type: str = "GitRepository") -> dict:
    spec = {"buildType": build_type, "repository": repository, "baseImage": USER_BASE}
    if git_ref:
        spec["gitRef"] = git_ref
    return {"metadata": {"name": "x", "uid": "u"}, "spec": spec, "status": {"phase": "Ready", "gitCommit": "a" * 40}}


def test_which_images_track_a_push():
    push = webhooks.parse_push("github", "push", github_push("https://github.com/org/repo.git", "main",
                                                             "a" * 40, "b" * 40), "d1")
    assert push.branch == "main" and push.after == "b" * 40 and push.pusher == "octocat"
    assert webhooks.tracks(image("https://github.com/org/repo"), push)  # no ref: the default branch
    assert webhooks.tracks(image("git@github.com:org/repo.git", "main"), push)
    assert webhooks.tracks(image("https://github.com/org/repo", "refs/heads/main"), push)
    assert not webhooks.tracks(image("https://github.com/org/repo", "dev"), push)
    assert not webhooks.tracks(image("https://github.com/org/repo", "a" * 40), push)  # pinned to a commit
    assert not webhooks.tracks(image("https://github.com/org/other"), push)
    assert not webhooks.tracks(image("https://github.com/org/repo", build_type="PackageList"), push)
    dev = webhooks.parse_push("github", "push", github_push("https://github.com/org/repo.git", "dev",
                                                            "a" * 40, "c" * 40), "d2")
    assert not webhooks.tracks(image("https://github.com/org/repo"), dev)  # not the default branch
    assert webhooks.tracks(image("https://github.com/org/repo", "dev"), dev)


def test_what_is_not_a_branch_push_starts_nothing():
    payload = github_push("https://github.com/org/repo.git", "main", "a" * 40, "b" * 40)
    assert webhooks.parse_push("github", "issues", payload, "d") is None
    assert webhooks.parse_push("github", "push", {**payload, "ref": "refs/tags/v1"}, "d") is None
    deleted = webhooks.parse_push("github", "push", {**payload, "after": "0" * 40, "deleted": True}, "d")
    assert deleted.deleted
    with pytest.raises(webhooks.WebhookRefused) as refused:
        webhooks.parse_push("github", "push", {"repository": {}}, "d")
    assert refused.value.status == 400 and "ref" in refused.value.message


def test_gitlab_push_payload():
    payload = {"object_kind": "push", "ref": "refs/heads/main", "before": "a" * 40, "after": "b" * 40,
               "checkout_sha": "b" * 40, "user_username": "jdoe",
               "project": {"path_with_namespace": "grp/proj", "default_branch": "main",
                           "git_http_url": "https://gitlab.example.org/grp/proj.git",
                           "git_ssh_url": "git@gitlab.example.org:grp/proj.git"}}
    push = webhooks.parse_push("gitlab", "Push Hook", payload, "uuid-1")
    assert push.pusher == "jdoe" and push.default_branch == "main"
    assert webhooks.tracks(image("https://gitlab.example.org/grp/proj"), push)
    assert webhooks.delivery_id("gitlab", {"X-Gitlab-Event-UUID": "e1"}) == "e1"
    assert webhooks.delivery_id("gitlab", {"Idempotency-Key": "k", "X-Gitlab-Event-UUID": "e1"}) == "k"


def test_triggers_are_recorded_and_bounded_and_a_push_during_a_run_waits_for_it():
    obj = image("https://github.com/org/repo")
    push = webhooks.parse_push("github", "push", github_push("https://github.com/org/repo.git", "main",
                                                             "a" * 40, "b" * 40), "d1")
    trigger = webhooks.trigger_record(push, obj, now="2026-11-23T10:00:00Z")
    assert trigger == {"kind": "webhook", "source": "github", "delivery": "d1", "at": "2026-11-23T10:00:00Z",
                       "ref": "refs/heads/main", "from": "a" * 40, "to": "b" * 40, "by": "octocat"}
    status = obj["status"]
    for i in range(MAX_REMEMBERED_TRIGGERS + 5):
        status = rebuilt({**obj, "status": {**status, "phase": "Ready"}}, "github webhook", trigger={**trigger, "n": i})
    assert len(status["triggers"]) == MAX_REMEMBERED_TRIGGERS and status["triggers"][-1]["n"] == MAX_REMEMBERED_TRIGGERS + 4
    manual = rebuilt({**obj, "status": {**status, "phase": "Failed"}}, "alice")
    assert manual["triggers"][-1]["kind"] == "rebuild" and manual["triggers"][-1]["by"] == "alice"
    assert rebuild_after_this_run(obj, trigger) is None  # finished: rebuild now instead
    building = {**obj, "status": {"phase": "Building"}}
    assert rebuild_after_this_run(building, trigger)["rebuildAfter"] == trigger


# -- through the hub -------------------------------------------------------------------------


async def wait_for(hub, token, name, done, timeout=600):
    deadline = time.monotonic() + timeout
    while True:
        obj = (await hub.api("GET", f"api/images/{name}", token)).json()
        if done(obj):
            return obj
        assert time.monotonic() < deadline, f"{name}: {json.dumps(obj.get('status'), indent=1)}"
        await asyncio.sleep(0.5)


def finished(obj):
    return model.phase_of(obj) in model.TERMINAL_PHASES


async def deliver(hub, body: dict, *, signature: str | None = "sign", delivery: str | None = None,
                  event: str = "push", provider: str = "github", headers: dict | None = None):
    raw = json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if provider == "github":
        all_headers["X-GitHub-Event"] = event
        all_headers["X-GitHub-Delivery"] = delivery or str(uuid.uuid4())
        if signature == "sign":
            all_headers["X-Hub-Signature-256"] = signed(raw)
        elif signature:
            all_headers["X-Hub-Signature-256"] = signature
    return await hub.api("POST", f"api/webhooks/{provider}", None, raw=raw, headers=all_headers)


@pytest.mark.podman
async def test_a_signed_push_rebuilds_the_images_that_track_the_branch_and_nothing_else_does(
        hub, make_git_repo, notebook_base_images):
    repo = make_git_repo("webhook-tracked", {
        "Containerfile": f"FROM {USER_BASE}\nCOPY hello.txt /tmp/hello.txt\n", "hello.txt": "one\n"})
    token = hub.token("w-webhook-owner")
    tracked = (await hub.api("POST", "api/images", token, {"spec": {
        "buildType": "GitRepository", "repository": repo.url}})).json()["metadata"]["name"]
    on_main = (await hub.api("POST", "api/images", token, {"spec": {
        "buildType": "GitRepository", "repository": repo.url, "gitRef": "main"}})).json()["metadata"]["name"]
    first = await wait_for(hub, token, tracked, finished)
    assert model.phase_of(first) == "Ready" and first["status"]["gitCommit"] == repo.commit, first["status"]
    await wait_for(hub, token, on_main, finished)

    new_commit = push_commit(repo, {"hello.txt": "two\n"}, message="say two")
    payload = github_push(repo.url, "main", repo.commit, new_commit)

    # what must start nothing: no signature, a wrong one, another branch, webhooks from nowhere
    r = await deliver(hub, payload, signature=None)
    assert r.code == 401 and "X-Hub-Signature-256" in r.json()["message"]
    r = await deliver(hub, payload, signature=signed(json.dumps(payload).encode(), "not-the-secret"))
    assert r.code == 401
    r = await deliver(hub, payload, provider="gitlab", headers={"X-Gitlab-Token": "wrong", "X-Gitlab-Event": "Push Hook"})
    assert r.code == 401 and "X-Gitlab-Token" in r.json()["message"]
    assert (await hub.api("POST", "api/webhooks/bitbucket", None, raw=b"{}")).code == 404
    r = await deliver(hub, github_push(repo.url, "other-branch", repo.commit, new_commit))
    assert r.code == 202 and (r.json()["rebuilding"], r.json()["afterCurrentRun"]) == (0, 0)
    r = await deliver(hub, {"zen": "hi"}, event="ping")
    assert r.code == 200 and r.json()["status"] == "pong"
    for name in (tracked, on_main):
        still = (await hub.api("GET", f"api/images/{name}", token)).json()
        assert model.phase_of(still) == "Ready" and still["status"].get("run", 1) == 1

    # the signed push: both images follow main, both are rebuilt at the pushed commit
    delivery = str(uuid.uuid4())
    r = await deliver(hub, payload, delivery=delivery)
    assert r.code == 202, r.body
    assert r.json()["rebuilding"] == 2 and r.json()["commit"] == new_commit
    assert "webhook-owner" not in r.body.decode()  # counts only: nobody's image names
    replay = await deliver(hub, payload, delivery=delivery)
    assert replay.code == 200 and replay.json()["status"] == "ignored"
    for name in (tracked, on_main):
        again = await wait_for(hub, token, name, lambda o: finished(o) and o["status"].get("run", 1) == 2)
        assert model.phase_of(again) == "Ready", again["status"]
        assert again["status"]["gitCommit"] == new_commit
        [trigger] = again["status"]["triggers"]
        assert trigger["kind"] == "webhook" and trigger["source"] == "github" and trigger["delivery"] == delivery
        assert (trigger["from"], trigger["to"], trigger["by"]) == (repo.commit, new_commit, "octocat")
        assert again["status"]["rebuildRequestedBy"] == "github webhook"
    logs = (await hub.api("GET", f"api/images/{tracked}/logs", token)).body.decode()
    assert "=== Run 2 · rebuild requested by github webhook" in logs

    # the same push again (a redelivery after a restart has a new id): already built, left alone
    r = await deliver(hub, payload)
    assert r.code == 202 and r.json()["unchanged"] == 2 and r.json()["rebuilding"] == 0


@pytest.mark.podman
async def test_a_push_during_a_build_rebuilds_after_it_and_gitlab_tokens_work(hub, make_git_repo, notebook_base_images):
    repo = make_git_repo("webhook-during-build", {
        "Containerfile": f"FROM {USER_BASE}\nRUN sleep 8\nCOPY hello.txt /tmp/hello.txt\n", "hello.txt": "one\n"})
    token = hub.token("w-webhook-during")
    name = (await hub.api("POST", "api/images", token, {"spec": {
        "buildType": "GitRepository", "repository": repo.url}})).json()["metadata"]["name"]
    await wait_for(hub, token, name, lambda o: model.phase_of(o) == "Building", timeout=120)
    new_commit = push_commit(repo, {"hello.txt": "two\n"})
    payload = {"object_kind": "push", "ref": "refs/heads/main", "before": repo.commit, "after": new_commit,
               "user_username": "jdoe", "project": {"path_with_namespace": "grp/proj", "default_branch": "main",
                                                    "git_http_url": repo.url}}
    r = await deliver(hub, payload, provider="gitlab",
                      headers={"X-Gitlab-Token": GITLAB_WEBHOOK_TOKEN, "X-Gitlab-Event": "Push Hook",
                               "X-Gitlab-Event-UUID": str(uuid.uuid4())})
    assert r.code == 202 and r.json()["afterCurrentRun"] == 1, r.body
    # the run in progress ends at the old commit; the rebuild follows by itself, at the new one
    done = await wait_for(hub, token, name, lambda o: finished(o) and o["status"].get("run", 1) == 2, timeout=900)
    assert model.phase_of(done) == "Ready", done["status"]
    assert done["status"]["gitCommit"] == new_commit and "rebuildAfter" not in done["status"]
    assert done["status"]["runs"][0]["phase"] == "Ready"
    [trigger] = done["status"]["triggers"]
    assert trigger["source"] == "gitlab" and trigger["to"] == new_commit and trigger["by"] == "jdoe"


async def test_a_rebuild_that_loses_its_write_moves_no_log(tmp_path):
    from cnbi_hub.controller.rebuild import start_rebuild
    from cnbi_hub.store.base import Conflict
    from cnbi_hub.store.sqlite import SQLImageStore

    store = SQLImageStore(f"sqlite:///{tmp_path}/cnbi.sqlite")
    obj = await store.create(model.validate_new_object(
        {"metadata": {"name": "logged"}, "spec": {"buildType": "ImageImport", "fromImage": "a.example/b:1"}},
        creator="alice"))
    ready = await store.update_status("logged", {**obj["status"], "phase": "Ready"}, obj["metadata"]["resourceVersion"])
    await store.put_artifact("logged", "log", "run one\n")
    await store.update_status("logged", {**ready["status"], "note": "someone wrote"}, ready["metadata"]["resourceVersion"])
    with pytest.raises(Conflict):
        await start_rebuild(store, ready, "alice")  # read before that write: loses
    assert await store.get_artifact("logged", "log") == "run one\n"
    assert await store.get_artifact("logged", "log-history") is None
    current = await store.get("logged")
    again = await start_rebuild(store, current, "alice")
    assert again["status"]["run"] == 2 and again["status"]["triggers"][-1]["by"] == "alice"
    assert await store.get_artifact("logged", "log") == ""
    assert await store.get_artifact("logged", "log-history") == "run one\n"
