"""Cluster mode's store against a real kube-apiserver (etcd + apiserver built from source,
tests/infra_kube.py): CRUD through the CRD, the status subresource, conflicts, label-filtered
lists, CEL rules, artifacts, and a change feed that survives a cut connection and 410 Gone."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path

import pytest
import yaml

from cnbi_hub import model
from cnbi_hub.store.base import AlreadyExists, Conflict, NotFound, StoreError, modify_status
from cnbi_hub.store.kubernetes import KubernetesImageStore, group_label
from tests.infra_tcp import CuttableProxy

pytestmark = pytest.mark.kube

MANIFESTS = Path(model.__file__).parent / "manifests"
BASE = "quay.io/jupyter/minimal-notebook:2024-10-07"


@pytest.fixture(scope="module")
def crd_installed(kube_cluster):
    kube_cluster.kubectl("apply", "--server-side", "-f", str(MANIFESTS / "crd.yaml"))
    kube_cluster.kubectl("wait", "--for=condition=Established", "crd/customnbimages.meteor.zone", "--timeout=60s")
    return kube_cluster


@pytest.fixture
async def store(crd_installed):
    namespace = crd_installed.namespace()
    store = KubernetesImageStore(namespace=namespace, kubeconfig=str(crd_installed.kubeconfig["admin"]))
    await store.start()
    yield store
    await store.aclose()


def new_image(creator: str, name: str, packages=("six",), **spec) -> dict:
    body = {"metadata": {"name": name, "annotations": {model.ANNOTATION_DISPLAY_NAME: name}},
            "spec": {"buildType": "PackageList", "baseImage": BASE, "packageVersions": list(packages), **spec}}
    return model.validate_new_object(body, creator=creator)


async def next_event(subscription, name: str, kinds=("ADDED", "MODIFIED", "DELETED"), timeout=15):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        event = await subscription.get(timeout=max(remaining, 0.01))
        if event.object["metadata"].get("name") == name and event.type in kinds:
            return event


async def test_create_get_and_status_through_the_subresource(store):
    created = await store.create(new_image("alice", "first"))
    assert model.phase_of(created) == "Pending" and created["status"]["conditions"] == []
    assert created["metadata"]["uid"] and created["metadata"]["generation"] == 1
    assert created["metadata"]["labels"][model.LABEL_OWNER] == "alice"
    got = await store.get("first")
    assert got["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    with pytest.raises(AlreadyExists):
        await store.create(new_image("alice", "first"))
    with pytest.raises(NotFound):
        await store.get("nothing-here")

    status = {**got["status"], "phase": "Prepare"}
    written = await store.update_status("first", status, got["metadata"]["resourceVersion"])
    assert model.phase_of(written) == "Prepare"
    # the write sent status only: the stored spec, labels and annotations are as they were
    assert written["spec"] == got["spec"] and written["metadata"]["labels"] == got["metadata"]["labels"]
    assert written["metadata"]["annotations"] == got["metadata"]["annotations"]
    with pytest.raises(Conflict):  # based on the version before our own write
        await store.update_status("first", {**status, "phase": "Failed"}, got["metadata"]["resourceVersion"])
    # a spec change through replace leaves status alone and bumps the generation
    current = await store.get("first")
    current["spec"]["packageVersions"] = ["six", "toolz"]
    current["status"] = {"phase": "Ready"}  # ignored: status has its own subresource
    replaced = await store.replace(current)
    assert replaced["metadata"]["generation"] == 2 and model.phase_of(replaced) == "Prepare"
    with pytest.raises(Conflict):
        await store.replace(current)  # stale resourceVersion
    await store.delete("first")
    with pytest.raises(NotFound):
        await store.delete("first")


async def test_concurrent_status_writers_lose_no_update(store):
    """Two writers each add 10 to a counter in status, conflicting on the way: 409s are retried
    on a fresh read, so the end value is exactly 20."""
    await store.create(new_image("alice", "counted"))

    def add_one(obj):
        status = obj.get("status") or {}
        return {**status, "counter": status.get("counter", 0) + 1}

    async def writer():
        for _ in range(10):
            await modify_status(store, "counted", add_one)

    await asyncio.gather(writer(), writer())
    assert (await store.get("counted"))["status"]["counter"] == 20


async def test_lists_filter_on_the_server_by_owner_sharing_groups_and_phase(store):
    await store.create(new_image("alice", "alice-private"))
    shared = new_image("bob", "bob-shared")
    shared["metadata"]["annotations"][model.ANNOTATION_SHARED] = "true"
    await store.create(shared)
    team = new_image("carol", "carol-team")
    team["metadata"]["annotations"] = model.with_shared_groups(team["metadata"]["annotations"], ["data team", "ml"])
    created = await store.create(team)
    assert created["metadata"]["labels"][group_label("data team")] == "true"
    await store.create(new_image("carol", "carol-private"))

    def names(items):
        return sorted(model.name_of(o) for o in items)

    assert names(await store.list()) == ["alice-private", "bob-shared", "carol-private", "carol-team"]
    assert names(await store.list(owner="alice")) == ["alice-private"]
    assert names(await store.list(owner="alice", include_shared=True)) == ["alice-private", "bob-shared"]
    assert names(await store.list(owner="alice", include_shared=True, groups=["data team"])) == [
        "alice-private", "bob-shared", "carol-team"]
    assert await store.count("carol") == 2

    # unsharing removes the label: the group's members no longer get it from the server
    obj = await store.get("carol-team")
    obj["metadata"]["annotations"] = model.with_shared_groups(obj["metadata"]["annotations"], [])
    obj["metadata"].pop("resourceVersion")
    unshared = await store.replace(obj)
    assert group_label("data team") not in unshared["metadata"]["labels"]
    assert names(await store.list(owner="alice", include_shared=True, groups=["data team"])) == [
        "alice-private", "bob-shared"]

    # phase and build type are the CRD's selectable fields
    ready = await store.get("bob-shared")
    await store.update_status("bob-shared", {**ready["status"], "phase": "Ready", "specHash": "sha256:" + "a" * 64})
    assert names(await store.list(phase="Ready")) == ["bob-shared"]
    assert names(await store.list(build_type="ImageImport")) == []
    # so is the spec hash: finding an identical image costs one filtered list, however many there are
    assert names(await store.list(phase="Ready", spec_hash="sha256:" + "a" * 64)) == ["bob-shared"]
    assert names(await store.list(spec_hash="sha256:" + "b" * 64)) == []


@pytest.mark.parametrize("spec,words", [
    ({"buildType": "PackageList", "baseImage": BASE, "runtimeEnvironment": {"pythonVersion": "3.11"},
      "packageVersions": ["six"]}, "exactly one of spec.baseImage and spec.runtimeEnvironment"),
    ({"buildType": "PackageList", "baseImage": BASE, "packageVersions": []}, "list at least one package"),
    ({"buildType": "ImageImport"}, "name the image to import"),
    ({"buildType": "GitRepository"}, "name the git repository"),
    ({"buildType": "ImageImport", "fromImage": BASE, "gitCredential": "gh"},
     "a git credential is used only by buildType GitRepository"),
])
async def test_the_crds_cel_rules_refuse_what_the_model_refuses(store, spec, words):
    """The apiserver's CEL rules say no to the objects cnbi_hub.model refuses, in its words
    (written straight to the store, past the service's own validation)."""
    body = {"metadata": {"name": "refused", "annotations": {model.ANNOTATION_CREATOR: "alice"}}, "spec": spec}
    with pytest.raises(model.InvalidObject):
        model.validate_new_object(copy.deepcopy(body), creator="alice")
    with pytest.raises(StoreError) as refused:
        await store.create(body)
    assert words in refused.value.message
    with pytest.raises(NotFound):
        await store.get("refused")


@pytest.mark.parametrize("spec", [
    # the shapes of meteor-operator's own samples (config/samples)
    {"buildType": "ImageImport", "fromImage": "quay.io/thoth-station/s2i-minimal-py38-notebook:v0.2.2"},
    {"buildType": "PackageList", "runtimeEnvironment": {"osName": "ubi", "osVersion": "8", "pythonVersion": "3.8"},
     "packageVersions": ["pandas", "scikit-learn>=1.0"]},
    {"buildType": "GitRepository", "repository": "https://github.com/thoth-station/elyra-aidevsecops-tutorial",
     "gitRef": "master"},
])
async def test_meteor_operator_sample_shapes_are_accepted(store, spec):
    body = {"metadata": {"name": "sample", "annotations": {model.ANNOTATION_CREATOR: "odh-user"}}, "spec": spec}
    assert model.validate_new_object(copy.deepcopy(body), creator="odh-user")["spec"]["buildType"] == spec["buildType"]
    created = await store.create(body)
    assert created["spec"] == spec


async def test_artifacts_live_in_a_configmap_the_image_owns(store, crd_installed):
    await store.create(new_image("alice", "with-lock"))
    assert await store.get_artifact("with-lock", "lock") is None
    await store.put_artifact("with-lock", "lock", "six==1.16.0 \\\n    --hash=sha256:abc\n")
    await store.put_artifact("with-lock", "log", "line one\nline two\n")
    assert await store.get_artifact("with-lock", "lock") == "six==1.16.0 \\\n    --hash=sha256:abc\n"
    assert await store.get_artifact("with-lock", "log") == "line one\nline two\n"
    configmap = yaml.safe_load(crd_installed.kubectl(
        "get", "configmap", "cnbi-artifacts-with-lock", "-n", store.namespace, "-o", "yaml").stdout)
    owner = configmap["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "CustomNBImage" and owner["name"] == "with-lock"
    # an image made again under the same name does not inherit the old one's artifacts
    old_uid = (await store.get("with-lock"))["metadata"]["uid"]
    await store.delete("with-lock")
    await store.create(new_image("alice", "with-lock"))
    assert await store.get_artifact("with-lock", "lock") is None
    # a writer that still holds the old image's uid writes nothing to the new one's
    await store.put_artifact("with-lock", "log", "the new image's log\n")
    with pytest.raises(NotFound):
        await store.put_artifact("with-lock", "log", "a stale writer's log\n", uid=old_uid)
    assert await store.get_artifact("with-lock", "log") == "the new image's log\n"
    # a write the apiserver refuses says why (artifact writes do not read the answer back)
    with pytest.raises(StoreError, match="422"):
        await store.put_artifact("with-lock", "not a key!", "text", uid=None)


async def test_the_change_feed_tells_creates_changes_and_deletes(store):
    with store.watch() as changes:
        await store.create(new_image("alice", "watched"))
        assert (await next_event(changes, "watched", ("ADDED",))).type == "ADDED"
        obj = await store.get("watched")
        await store.update_status("watched", {**obj["status"], "phase": "Prepare"})
        event = await next_event(changes, "watched", ("MODIFIED",))
        while model.phase_of(event.object) != "Prepare":
            event = await next_event(changes, "watched", ("MODIFIED",))
        await store.delete("watched")
        assert (await next_event(changes, "watched", ("DELETED",))).type == "DELETED"


async def test_the_change_feed_resumes_after_its_connection_is_cut(crd_installed):
    """The store reaches the apiserver through a TCP relay on 127.0.0.1; cutting every relayed
    connection mid-watch, then changing objects while it reconnects, loses no event."""
    namespace = crd_installed.namespace()
    kubeconfig = crd_installed.rundir / f"kubeconfig-relay-{namespace}"
    relay = await CuttableProxy.in_front_of(crd_installed.kubeconfig["admin"], kubeconfig)
    watched = KubernetesImageStore(namespace=namespace, kubeconfig=str(kubeconfig))
    direct = KubernetesImageStore(namespace=namespace, kubeconfig=str(crd_installed.kubeconfig["admin"]))
    try:
        await watched.start()
        with watched.watch() as changes:
            await direct.create(new_image("alice", "before-cut"))
            await next_event(changes, "before-cut", ("ADDED",))
            relay.cut()  # every open connection: the watch is cut mid-stream
            await direct.create(new_image("alice", "during-cut"))
            await direct.delete("before-cut")
            assert (await next_event(changes, "during-cut", ("ADDED",), timeout=30)).type == "ADDED"
            assert (await next_event(changes, "before-cut", ("DELETED",), timeout=30)).type == "DELETED"
        assert relay.connections >= 2  # it did reconnect
    finally:
        await watched.aclose()
        await direct.aclose()
        await relay.close()


async def test_the_change_feed_lists_again_after_410_gone(store, crd_installed):
    """A watch from a resourceVersion the apiserver no longer has answers 410 Gone; the feed
    lists again and tells what it missed (here: one image created and one deleted)."""
    direct = KubernetesImageStore(namespace=store.namespace, kubeconfig=str(crd_installed.kubeconfig["admin"]))
    await direct.create(new_image("alice", "old-one"))
    await next_event_after(store, "old-one")
    with store.watch() as changes:
        await store.follow_from("1")  # long compacted away: the apiserver answers 410
        await direct.create(new_image("alice", "new-one"))
        await direct.delete("old-one")
        kinds = {}
        while len(kinds) < 2:
            event = await changes.get(timeout=30)
            if model.name_of(event.object) in ("new-one", "old-one") and event.type != "MODIFIED":
                kinds.setdefault(model.name_of(event.object), event.type)
        assert kinds == {"new-one": "ADDED", "old-one": "DELETED"}
    assert store.relists >= 2
    await direct.aclose()


async def next_event_after(store, name):
    with store.watch() as changes:
        try:
            await store.get(name)
        except NotFound:
            await next_event(changes, name, ("ADDED",))


async def test_git_credentials_are_secrets_per_owner_holding_only_the_sealed_record(store):
    from cryptography.fernet import Fernet

    from cnbi_hub import credentials

    vault = credentials.CredentialVault(keys=[Fernet.generate_key().decode()])
    record = credentials.new_record("alice@example.org", "gh", {"host": "github.com", "username": "oauth2"},
                                    vault.seal("oauth2", "ghp_x"))
    await store.put_credential(record)
    assert await store.get_credential("alice@example.org", "gh") == record
    # the owner label is lossy ('@' becomes '_'): another owner with the same label sees nothing
    assert await store.get_credential("alice_example.org", "gh") is None
    assert await store.list_credentials("alice_example.org") == []
    assert [r["name"] for r in await store.list_credentials("alice@example.org")] == ["gh"]
    await store.put_credential({**record, "host": "gitlab.com"})  # a PUT replaces
    assert (await store.get_credential("alice@example.org", "gh"))["host"] == "gitlab.com"
    assert not await store.delete_credential("bob", "gh")
    assert await store.delete_credential("alice@example.org", "gh")
    assert await store.list_credentials("alice@example.org") == []
