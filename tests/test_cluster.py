"""Cluster mode on a real Kubernetes: the manifests, RBAC as the service's and operator's
ServiceAccounts, and the operator building an image with a real Tekton PipelineRun.

Tier a (etcd + apiserver) for manifests and RBAC; tier b (node, containerd, Tekton) for builds.
The operator runs on this machine as its own ServiceAccount (a real token), with a kubeconfig.
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
import yaml

from cnbi_hub import model
from cnbi_hub.store.kubernetes import KubernetesImageStore
from tests.hubfixtures import CA_BUNDLE

pytestmark = pytest.mark.kube

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


def can_i(cluster, who: str, verb: str, resource: str, namespace: str) -> bool:
    """RBAC's answer for `who` (a SelfSubjectAccessReview: no discovery, so it also answers for
    API groups not served here, such as OpenShift's image.openshift.io)."""
    resource, _, subresource = resource.partition("/")
    plural, _, group = resource.partition(".")
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
              "spec": {"resourceAttributes": {"namespace": namespace, "verb": verb, "group": group,
                                              "resource": plural, "subresource": subresource}}}
    code, answer = cluster.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review, as_=who)
    assert code == 201, answer
    return bool(answer["status"].get("allowed"))


def image_object(name: str, base: str, packages=("tabulate==0.9.0",), creator: str = "alice") -> dict:
    body = {"metadata": {"name": name, "annotations": {model.ANNOTATION_DISPLAY_NAME: name}},
            "spec": {"buildType": "PackageList", "baseImage": base, "packageVersions": list(packages)}}
    return model.validate_new_object(body, creator=creator)


def test_manifests_apply_and_each_identity_may_do_exactly_its_part(kube_cluster):
    cluster = kube_cluster
    cluster.install_tekton_crds()
    namespace = cluster.namespace("rbac")
    documents = rendered_manifests(cluster, namespace, without=())
    kinds = sorted({d["kind"] for d in documents})
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Deployment", "NetworkPolicy",
                     "Pipeline", "Role", "RoleBinding", "ServiceAccount", "Task"], kinds
    apply(cluster, documents, dry_run=True)  # every manifest is valid for this apiserver
    apply(cluster, [d for d in documents if d["kind"] != "Deployment"])
    cluster.kubectl("wait", "--for=condition=Established", "crd/customnbimages.meteor.zone", "--timeout=60s")
    service = cluster.serviceaccount_identity(namespace, "cnbi-service", create=False)
    operator = cluster.serviceaccount_identity(namespace, "cnbi-operator", create=False)

    # the service: images and their status and artifacts, no builds, no secrets
    for verb, resource in (("create", "customnbimages.meteor.zone"), ("delete", "customnbimages.meteor.zone"),
                           ("update", "customnbimages.meteor.zone/status"), ("update", "configmaps"),
                           ("get", "pods/log"), ("list", "imagestreams.image.openshift.io")):
        assert can_i(cluster, service, verb, resource, namespace), (verb, resource)
    for verb, resource in (("create", "pipelineruns.tekton.dev"), ("get", "secrets"), ("create", "pods")):
        assert not can_i(cluster, service, verb, resource, namespace), (verb, resource)
    # the operator: builds, status, pull secrets, ImageStreams; it never creates or deletes images
    for verb, resource in (("create", "pipelineruns.tekton.dev"), ("patch", "pipelineruns.tekton.dev"),
                           ("create", "taskruns.tekton.dev"),
                           ("update", "customnbimages.meteor.zone/status"), ("get", "secrets"),
                           ("update", "customnbimages.meteor.zone/finalizers"),
                           ("create", "imagestreams.image.openshift.io"), ("watch", "customnbimages.meteor.zone")):
        assert can_i(cluster, operator, verb, resource, namespace), (verb, resource)
    for verb, resource in (("create", "customnbimages.meteor.zone"), ("delete", "customnbimages.meteor.zone"),
                           ("list", "secrets"), ("create", "pods")):
        assert not can_i(cluster, operator, verb, resource, namespace), (verb, resource)
    # nothing outside its namespace
    assert not can_i(cluster, service, "list", "customnbimages.meteor.zone", "default")

    # what each writes, written for real by each identity (server-side dry run)
    image = image_object("dry-run", "quay.io/jupyter/minimal-notebook:2024-10-07")
    image.update(apiVersion=model.API_VERSION, kind=model.KIND)
    image["metadata"]["namespace"] = namespace
    cluster.kubectl("create", "--dry-run=server", "-f", "-", as_=service, input=json.dumps(image))
    run = {"apiVersion": "tekton.dev/v1", "kind": "PipelineRun",
           "metadata": {"name": "cnbi-dry-run-g1-r1", "namespace": namespace},
           "spec": {"pipelineRef": {"name": "cnbi-package-list"},
                    "params": [{"name": "image", "value": "registry.example.org/x:1"},
                               {"name": "builder-image", "value": "registry.example.org/builder:1"}],
                    "workspaces": [{"name": "plan", "configMap": {"name": "plan"}}]}}
    cluster.kubectl("create", "--dry-run=server", "-f", "-", as_=operator, input=json.dumps(run))
    refused = cluster.kubectl("create", "--dry-run=server", "-f", "-", as_=service, input=json.dumps(run), check=False)
    assert refused.returncode != 0 and "forbidden" in refused.stderr.lower()


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

    def __init__(self, cluster, namespace: str, registry: dict, log_path: Path):
        self.identity = cluster.serviceaccount_identity(namespace, "cnbi-operator", create=False)
        self.kubeconfig = cluster.kubeconfig[self.identity]
        self.namespace = namespace
        self.registry = registry
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> "Operator":
        config = {
            "push_registry": self.registry["push"], "max_concurrent_builds": 4,
            "TektonBuilder": {"builder_image": self.registry["builder"], "poll_interval": 0.5},
            "PhaseWork": {"ca_bundle": CA_BUNDLE if os.path.exists(CA_BUNDLE) else ""},
        }
        env = dict(os.environ, CNBI_OPERATOR_CONFIG=json.dumps(config))
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


async def wait_for_phase(store, name, phases, timeout=900):
    deadline = time.monotonic() + timeout
    while True:
        obj = await store.get(name)
        if model.phase_of(obj) in phases:
            return obj
        assert time.monotonic() < deadline, f"{name} stuck in {model.phase_of(obj)}: {obj.get('status')}"
        await asyncio.sleep(1)


def pipeline_runs(cluster, namespace: str) -> list[dict]:
    return cluster.get("pipelineruns.tekton.dev", namespace=namespace)["items"]


async def test_operator_builds_an_image_with_a_tekton_pipelinerun(kube_node, cluster_namespace, cluster_registry,
                                                                 operator, local_registry):
    store = KubernetesImageStore(namespace=cluster_namespace, kubeconfig=str(kube_node.kubeconfig["admin"]))
    try:
        await store.create(image_object("tabulate", cluster_registry["base"]))
        obj = await wait_for_phase(store, "tabulate", model.TERMINAL_PHASES)
        assert model.phase_of(obj) == "Ready", json.dumps(obj["status"], indent=1) + operator.log()
        status = obj["status"]
        repository, digest = status["image"].split("@")
        assert repository == f"{cluster_registry['push']}/tabulate"
        manifest = local_registry.skopeo_inspect(f"built/tabulate@{digest}")
        assert manifest["Digest"] == digest
        visible = {p["name"].lower(): p["version"] for p in status["packages"] if p["visible"]}
        assert visible == {"tabulate": "0.9.0"}
        runs = pipeline_runs(kube_node, cluster_namespace)
        assert [r["metadata"]["name"] for r in runs] == ["cnbi-tabulate-g1-r1"]
        succeeded = [c for c in runs[0]["status"]["conditions"] if c["type"] == "Succeeded"][0]
        assert succeeded["status"] == "True"
        assert runs[0]["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]
        log = await store.get_artifact("tabulate", "log")
        assert "check imports: ok" in log and "==> Building -> Ready" in log
    finally:
        await store.aclose()
