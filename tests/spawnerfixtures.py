"""Pytest plugin: fixtures for the spawner hooks and PodmanSpawner.

- ``make_ready_image`` (function): ``await make_ready_image(owner, display_name, packages=[...],
  shared=False)`` validates a CustomNBImage with the API's own validation (creator ``owner``)
  and writes it to the service's store already Ready, with ``status.image`` a digest reference
  (the status the reconciler writes when a build finishes). One write, so the service's
  reconciler never sees it Pending and never builds it. Returns the stored object.
- ``kubeconfig_without_cluster`` (session): a kubeconfig naming a cluster that is never
  contacted, so the real KubeSpawner class can be constructed (it loads a config in __init__);
  rendering forms and applying profiles makes no API call.
- ``make_kubespawner`` (function): ``make_kubespawner(username, hooks)`` → a real KubeSpawner for
  a real hub user, with the hooks set as profile_list / options_from_form / apply_user_options.
- ``podman_api`` (session): ``podman system service`` on a unix socket in a temp dir, run with
  cnbi_hub's podman environment (:class:`cnbi_hub.spawner.PodmanService`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import pytest
import pytest_asyncio

from cnbi_hub import model
from cnbi_hub.podmanspawner import PodmanService
from cnbi_hub.store.sqlite import SQLImageStore

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: nowhere, cluster: {server: "http://127.0.0.1:9"}}]
users: [{name: nobody, user: {}}]
contexts: [{name: nowhere, context: {cluster: nowhere, user: nobody}}]
current-context: nowhere
"""


def fake_digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def service_store(hub):
    """The cnbi service's own SQLite store (the same file the service process uses)."""
    store = SQLImageStore("sqlite:///" + str(hub.data_dir / "cnbi.sqlite"))
    yield store
    store.close()


@pytest_asyncio.fixture
async def make_ready_image(hub, service_store):
    created = []

    async def make(owner: str, display_name: str, packages=("six==1.16.0",), shared: bool = False,
                   description: str = "", image: str | None = None, status_packages=None) -> dict:
        body = {
            "metadata": {"annotations": {
                model.ANNOTATION_DISPLAY_NAME: display_name, model.ANNOTATION_DESCRIPTION: description}},
            "spec": {"buildType": "PackageList", "baseImage": "localhost/cnbi/notebook-base:py311-user",
                     "packageVersions": list(packages)},
        }
        # The API's own validation, then one store write of the finished object: the service's
        # reconciler only picks up Pending images, so it never starts a real build of these.
        obj = model.validate_new_object(body, creator=owner)
        obj["metadata"]["name"] = name = model.generate_name(display_name)
        if shared:
            obj["metadata"]["annotations"][model.ANNOTATION_SHARED] = "true"
        obj["status"] = {
            **model.initial_status(),
            "phase": model.PHASE_READY,
            "image": image or f"localhost/cnbi/{owner}/{name}@{fake_digest(name)}",
            "packages": status_packages if status_packages is not None else [
                {"name": p.split("==")[0], "version": p.split("==")[-1], "visible": True} for p in packages],
        }
        stored = await service_store.create(obj)
        created.append(name)
        assert model.phase_of(stored) == model.PHASE_READY
        return stored

    yield make
    for name in created:
        try:
            await service_store.delete(name)
        except Exception:
            pass


@pytest.fixture(scope="session")
def kubeconfig_without_cluster(tmp_path_factory):
    path = tmp_path_factory.mktemp("kube") / "config"
    path.write_text(KUBECONFIG)
    from kubernetes_asyncio.config import kube_config

    old = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(path)
    # kubernetes_asyncio reads $KUBECONFIG once, when first imported (the cluster tests import
    # it while pytest collects): KubeSpawner's load_kube_config() uses that module default
    old_default = kube_config.KUBE_CONFIG_DEFAULT_LOCATION
    kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(path)
    yield path
    kube_config.KUBE_CONFIG_DEFAULT_LOCATION = old_default
    if old is None:
        os.environ.pop("KUBECONFIG", None)
    else:
        os.environ["KUBECONFIG"] = old


@pytest.fixture
def make_kubespawner(hub, kubeconfig_without_cluster):
    from jupyterhub import orm
    from jupyterhub.tests.utils import add_user
    from kubespawner import KubeSpawner

    def make(username: str, hooks, **traits) -> KubeSpawner:
        orm_user = orm.User.find(hub.app.db, username) or add_user(hub.app.db, hub.app, name=username)
        user = hub.app.users[orm_user]
        return KubeSpawner(
            user=user, hub=hub.app.hub, config=hub.app.config,
            profile_list=hooks.profile_list,
            options_from_form=hooks.kubespawner_options_from_form,
            apply_user_options=hooks.kubespawner_apply_user_options,
            **traits,
        )

    return make


@pytest.fixture(scope="session")
def podman_api(podman_env):
    # unix socket paths are limited to ~107 bytes: keep it short, out of pytest's deep tmp dirs
    run_dir = tempfile.mkdtemp(prefix="cnbi-podman-")
    service = PodmanService(os.path.join(run_dir, "podman.sock")).start()
    yield service
    service.stop()
