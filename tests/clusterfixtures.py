"""Pytest plugin: cluster-mode fixtures shared by the cluster suites (tests/test_cluster*.py).

- ``cluster_registry``: the local registry holding the notebook base and the builder image,
  trusted by the node's containerd.
- ``cluster_namespace``: a fresh namespace with the shipped manifests applied (no Deployment:
  the operator runs on this machine, as its ServiceAccount).
- ``operator``: ``python -m cnbi_hub.controller`` running for the test (:class:`Operator`).
- ``cluster_store``: a KubernetesImageStore on ``cluster_namespace`` as the cluster admin.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_asyncio
import yaml

from cnbi_hub import model
from cnbi_hub.store.kubernetes import KubernetesImageStore
from tests.hubfixtures import CA_BUNDLE

MANIFESTS = Path(model.__file__).parent / "manifests"
CLUSTER_SCOPED = {"CustomResourceDefinition", "Namespace", "ClusterRole", "ClusterRoleBinding"}


def rendered_manifests(cluster, namespace: str, *, without=("Deployment",)) -> list[dict]:
    """`kubectl kustomize` of the shipped manifests, placed in `namespace` (the RoleBindings'
    ServiceAccount subjects too), leaving out kinds in `without`."""
    text = cluster.kubectl("kustomize", str(MANIFESTS)).stdout
    documents = [d for d in yaml.safe_load_all(text) if d and d["kind"] not in without]
    for document in documents:
        if document["kind"] not in CLUSTER_SCOPED:
            document["metadata"]["namespace"] = namespace
        elif document["kind"] == "ClusterRoleBinding":  # one per test namespace
            document["metadata"]["name"] += f"-{namespace}"
        for subject in document.get("subjects", []):
            if subject.get("kind") == "ServiceAccount":
                subject["namespace"] = namespace
    return documents


def apply(cluster, documents: list[dict], as_: str = "admin", dry_run: bool = False) -> None:
    args = ["apply", "--server-side", "--force-conflicts", "-f", "-"]
    if dry_run:
        args.append("--dry-run=server")
    cluster.kubectl(*args, as_=as_, input=json.dumps({"apiVersion": "v1", "kind": "List", "items": documents}))


@pytest.fixture(scope="module")
def cluster_registry(kube_node, local_registry, notebook_base_images, podman_env):
    """The local registry holding the notebook base and the builder image, trusted by the
    node's containerd: {"base": ..., "builder": ..., "push": registry/namespace for built images}."""
    from cnbi_hub.builderimage import ensure_builder_image, push
    from tests.infra_podman import podman

    host = local_registry.host
    base = f"{host}/cnbi/notebook-base:py311-user"
    pushed = podman("push", "--quiet", "--tls-verify=false", notebook_base_images["user"], f"docker://{base}",
                    env=podman_env)
    assert pushed.returncode == 0, pushed.stderr
    builder = f"{host}/cnbi/builder:1"
    push(ensure_builder_image(), builder)
    kube_node.trust_registry(host)
    return {"base": base, "builder": builder, "push": f"{host}/built"}


class Operator:
    """`python -m cnbi_hub.controller` on this machine, as the operator's ServiceAccount."""

    def __init__(self, cluster, namespace: str, registry: dict, log_path: Path, overrides: dict | None = None,
                 env: dict | None = None, kubeconfig: Path | None = None):
        self.overrides = overrides or {}
        self.env = env or {}
        self.identity = cluster.serviceaccount_identity(namespace, "cnbi-operator", create=False)
        self.kubeconfig = kubeconfig or cluster.kubeconfig[self.identity]
        self.namespace = namespace
        self.registry = registry
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> "Operator":
        config = {
            "push_registry": self.registry["push"], "max_concurrent_builds": 4,
            # the registry is on the node's 127.0.0.1: build pods on the node's network (the build
            # itself still gets a network namespace of its own)
            "TektonBuilder": {"builder_image": self.registry["builder"], "poll_interval": 0.5, "host_network": True},
            "PhaseWork": {"ca_bundle": CA_BUNDLE if os.path.exists(CA_BUNDLE) else ""},
        }
        for key, value in self.overrides.items():
            config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
        env = dict(os.environ, CNBI_OPERATOR_CONFIG=json.dumps(config), **self.env)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cnbi_hub.controller", "--namespace", self.namespace,
                 "--kubeconfig", str(self.kubeconfig)],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.log_path.parent, start_new_session=True)
        return self

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


@pytest.fixture
def cluster_namespace(kube_node, cluster_registry):
    namespace = kube_node.namespace("e2e")
    apply(kube_node, rendered_manifests(kube_node, namespace))
    kube_node.kubectl("wait", "--for=condition=Established", "crd/customnbimages.meteor.zone", "--timeout=60s")
    return namespace


@pytest.fixture
def operator(kube_node, cluster_namespace, cluster_registry, tmp_path):
    running = Operator(kube_node, cluster_namespace, cluster_registry, tmp_path / "operator.log").start()
    yield running
    running.stop()
    print("--- operator log (tail) ---\n" + running.log())


async def wait_for_phase(store, name, phases, timeout=900, run: int | None = None):
    """The object once it is in one of `phases` (in run `run`, if given)."""
    deadline = time.monotonic() + timeout
    while True:
        obj = await store.get(name)
        if model.phase_of(obj) in phases and (run is None or (obj.get("status") or {}).get("run", 1) == run):
            return obj
        assert time.monotonic() < deadline, f"{name} stuck in {model.phase_of(obj)}: {obj.get('status')}"
        await asyncio.sleep(1)


def pipeline_runs(cluster, namespace: str) -> list[dict]:
    return cluster.get("pipelineruns.tekton.dev", namespace=namespace)["items"]


@pytest_asyncio.fixture
async def cluster_store(kube_node, cluster_namespace):
    store = KubernetesImageStore(namespace=cluster_namespace, kubeconfig=str(kube_node.kubeconfig["admin"]))
    yield store
    await store.aclose()
