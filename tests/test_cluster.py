"""Cluster mode on a real Kubernetes: the manifests, RBAC as the service's and operator's
ServiceAccounts, and the operator building an image with a real Tekton PipelineRun.

Tier a (etcd + apiserver) for manifests and RBAC; tier b (node, containerd, Tekton) for builds.
The operator runs on this machine as its own ServiceAccount (a real token), with a kubeconfig.
"""

from __future__ import annotations

import json

import pytest

from cnbi_hub import model
from cnbi_hub.store.kubernetes import KubernetesImageStore
from tests.clusterfixtures import apply, pipeline_runs, rendered_manifests, wait_for_phase

pytestmark = pytest.mark.kube


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
