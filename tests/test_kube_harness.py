"""The test Kubernetes itself (tests/infra_kube.py, scripts/kube-up): a real apiserver with RBAC
for the service's and the operator's identities; a real kubelet running local images, pulling
from a local plain-http registry; a real Tekton running a TaskRun."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time

import pytest

from tests.infra_kube import KubeCluster

pytestmark = pytest.mark.kube

# A stand-in with the project CRD's plural, in a group of its own: this file checks the harness,
# not cnbi_hub/manifests/crd.yaml (which the cluster-mode tests apply themselves).
GROUP = "harness.cnbi-test.example"
CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"customnbimages.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"kind": "CustomNBImage", "listKind": "CustomNBImageList", "plural": "customnbimages",
                  "singular": "customnbimage"},
        "versions": [{
            "name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
            "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                "spec": {"type": "object", "required": ["buildType"],
                         "properties": {"buildType": {"type": "string", "enum": ["ImageImport", "PackageList"]}}},
                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}},
        }],
    },
}


def cnbi(name: str) -> dict:
    return {"apiVersion": f"{GROUP}/v1", "kind": "CustomNBImage", "metadata": {"name": name},
            "spec": {"buildType": "ImageImport"}}


@pytest.fixture(scope="module")
def harness_crd(kube_cluster):
    kube_cluster.apply(CRD)
    kube_cluster.kubectl("wait", "--for=condition=Established", f"crd/customnbimages.{GROUP}", "--timeout=30s")
    return GROUP


def test_apiserver_answers_readyz_and_authenticates(kube_cluster):
    assert kube_cluster.request("GET", "/readyz") == (200, "ok")
    status, version = kube_cluster.request("GET", "/version")
    assert status == 200 and version["gitVersion"] == "v1.37.2"
    status, _ = kube_cluster.request("GET", "/api/v1/namespaces", as_=None)  # anonymous
    assert status in (401, 403)
    for identity in ("admin", "cnbi-service", "cnbi-operator"):
        review = json.loads(kube_cluster.kubectl("auth", "whoami", "-o", "json", as_=identity).stdout)
        assert review["status"]["userInfo"]["username"] == kube_cluster.users[identity]
    assert kube_cluster.users["cnbi-service"] == "system:serviceaccount:cnbi:cnbi-service"


def test_rbac_service_identity_needs_a_rolebinding(kube_cluster, harness_crd):
    ns = kube_cluster.namespace()
    path = f"/apis/{GROUP}/v1/namespaces/{ns}/customnbimages"
    assert kube_cluster.request("POST", path, cnbi("by-admin"))[0] == 201

    status, body = kube_cluster.request("GET", path, as_="cnbi-service")
    assert status == 403, body
    assert "system:serviceaccount:cnbi:cnbi-service" in body["message"]
    assert kube_cluster.request("POST", path, cnbi("x"), as_="cnbi-service")[0] == 403

    kube_cluster.apply([
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "cnbi-service"},
         "rules": [{"apiGroups": [GROUP], "resources": ["customnbimages"],
                    "verbs": ["get", "list", "watch", "create"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "cnbi-service"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cnbi-service"},
         "subjects": [{"kind": "ServiceAccount", "namespace": "cnbi", "name": "cnbi-service"}]},
    ], namespace=ns)

    # the authorizer's cache follows the binding within milliseconds; poll briefly
    status, body = kube_cluster.wait_for(
        lambda: (r := kube_cluster.request("GET", path, as_="cnbi-service"))[0] != 403 and r,
        "the RoleBinding to take effect", timeout=10, interval=0.05)
    assert status == 200, body
    assert [item["metadata"]["name"] for item in body["items"]] == ["by-admin"]
    assert kube_cluster.request("POST", path, cnbi("by-service"), as_="cnbi-service")[0] == 201
    # only what the Role grants, only in that namespace, only for that identity
    assert kube_cluster.request("DELETE", f"{path}/by-admin", as_="cnbi-service")[0] == 403
    assert kube_cluster.request("GET", f"/apis/{GROUP}/v1/namespaces/default/customnbimages",
                                as_="cnbi-service")[0] == 403
    assert kube_cluster.request("GET", path, as_="cnbi-operator")[0] == 403
    can_i = kube_cluster.kubectl("auth", "can-i", "list", f"customnbimages.{GROUP}", "-n", ns,
                                 as_="cnbi-operator", check=False)
    assert can_i.stdout.strip() == "no"
    # kubectl (what the kopf operator's kubeconfig looks like) as the service identity
    listed = kube_cluster.get(f"customnbimages.{GROUP}", as_="cnbi-service", namespace=ns)
    assert sorted(i["metadata"]["name"] for i in listed["items"]) == ["by-admin", "by-service"]


def test_serviceaccount_identity_uses_a_real_token(kube_cluster):
    ns = kube_cluster.namespace()
    identity = kube_cluster.serviceaccount_identity(ns, "reader")
    assert identity == f"system:serviceaccount:{ns}:reader"
    assert kube_cluster.request("GET", f"/api/v1/namespaces/{ns}/configmaps", as_=identity)[0] == 403
    kube_cluster.kubectl("create", "role", "cm-reader", "--verb=list", "--resource=configmaps", "-n", ns)
    kube_cluster.kubectl("create", "rolebinding", "cm-reader", "--role=cm-reader",
                         f"--serviceaccount={ns}:reader", "-n", ns)
    kube_cluster.wait_for(
        lambda: kube_cluster.request("GET", f"/api/v1/namespaces/{ns}/configmaps", as_=identity)[0] == 200,
        "the ServiceAccount's RoleBinding", timeout=10, interval=0.05)


async def test_kubernetes_asyncio_client(kube_cluster):
    from kubernetes_asyncio import client

    ns = kube_cluster.namespace()
    async with await kube_cluster.api_client("admin") as api:
        await client.CoreV1Api(api).create_namespaced_config_map(
            ns, {"metadata": {"name": "hello"}, "data": {"k": "v"}})
        got = await client.CoreV1Api(api).read_namespaced_config_map("hello", ns)
    assert got.data == {"k": "v"}


# -- tier b: the node ---------------------------------------------------------------------------


def pod(name: str, image: str, command: str, host_network: bool = True, pull: str = "IfNotPresent") -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "hostNetwork": host_network, "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "main", "image": image, "imagePullPolicy": pull,
                                     "command": ["sh", "-c", command]}]}}


def run_pod(node: KubeCluster, ns: str, spec: dict, timeout: float = 90) -> str:
    """Create the pod, wait for it to finish; assert it Succeeded; return its log."""
    node.apply(spec, namespace=ns)
    name = spec["metadata"]["name"]
    phase = node.wait_for_jsonpath(f"pod/{name}", "{.status.phase}", {"Succeeded", "Failed"}, ns, timeout=timeout)
    log = node.kubectl("logs", name, "-n", ns, "--all-containers", check=False).stdout
    assert phase == "Succeeded", f"{log}\n{node.describe(f'pod/{name}', ns)}"
    return log


def test_hostnetwork_pod_runs_local_busybox(kube_node):
    ns = kube_node.namespace()
    started = time.monotonic()
    log = run_pod(kube_node, ns, pod("hello", kube_node.images["busybox"], "echo hello from $(hostname)"))
    print(f"hostNetwork pod create -> Succeeded: {time.monotonic() - started:.1f}s")
    assert log.strip().startswith("hello from ")


def test_pod_network_is_isolated(kube_node):
    """A non-hostNetwork pod gets 198.51.100.x and no route out (nothing leaves the machine)."""
    ns = kube_node.namespace()
    log = run_pod(kube_node, ns, pod("isolated", kube_node.images["busybox"],
                                     "ip -4 -o addr show eth0; echo ROUTES; ip route", host_network=False))
    addresses, routes = log.split("ROUTES")
    address = addresses.split("inet ")[1].split("/")[0]
    assert ipaddress.ip_address(address) in ipaddress.ip_network("198.51.100.0/24"), log
    assert "default" not in routes and "198.51.100.0/24" in routes, log


def test_tekton_taskrun_script_step_succeeds(kube_node):
    ns = kube_node.namespace()
    taskrun = {
        "apiVersion": "tekton.dev/v1", "kind": "TaskRun", "metadata": {"name": "hello"},
        "spec": {"params": [{"name": "who", "value": "cnbi"}], "taskSpec": {
            "params": [{"name": "who", "type": "string"}],
            "results": [{"name": "greeting"}],
            "steps": [{"name": "greet", "image": kube_node.images["busybox"],
                       "script": "#!/bin/sh\nset -e\necho \"hello $(params.who)\" | tee $(results.greeting.path)\n"}],
        }},
    }
    started = time.monotonic()
    kube_node.apply(taskrun, namespace=ns)
    status = kube_node.wait_for_jsonpath("taskrun/hello", '{.status.conditions[?(@.type=="Succeeded")].status}',
                                         {"True", "False"}, ns, timeout=120)
    print(f"TaskRun create -> Succeeded: {time.monotonic() - started:.1f}s")
    tr = kube_node.get("taskrun/hello", namespace=ns)
    assert status == "True", json.dumps(tr.get("status"), indent=1)[-3000:]
    assert tr["status"]["results"] == [{"name": "greeting", "type": "string", "value": "hello cnbi\n"}]
    pod_name = tr["status"]["podName"]
    assert "hello cnbi" in kube_node.logs(pod_name, ns, container="step-greet")


def test_pod_pulls_from_local_plain_http_registry(kube_node, local_registry, tmp_path):
    """An image pushed to the local docker-registry (plain http) is pulled by the node, by its
    127.0.0.1 address and by a registry name that only the node's hosts.toml knows."""
    repository = "cnbi-test/kube-busybox"
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"--digestfile={tmp_path / 'digest'}",
                    f"docker-archive:{kube_node.image_tarballs['busybox']}",
                    f"docker://{local_registry.host}/{repository}:v1"],
                   check=True, capture_output=True, timeout=120)
    digest = (tmp_path / "digest").read_text().strip()
    kube_node.trust_registry(local_registry.host)
    alias = kube_node.trust_registry(local_registry.host, name="registry.cnbi.test:5000")
    ns = kube_node.namespace()
    spec = pod("pulled", f"{local_registry.host}/{repository}:v1", "echo pulled by address", pull="Always")
    spec["spec"]["containers"].append({"name": "aliased", "image": f"{alias}/{repository}:v1",
                                       "imagePullPolicy": "Always", "command": ["echo", "pulled by name"]})
    started = time.monotonic()
    run_pod(kube_node, ns, spec)
    print(f"pull from local registry + run: {time.monotonic() - started:.1f}s")
    assert kube_node.logs("pulled", ns, "main").strip() == "pulled by address"
    assert kube_node.logs("pulled", ns, "aliased").strip() == "pulled by name"
    # the same manifest by both names: containerd reports one of its repo digests for both
    image_ids = [c["imageID"] for c in kube_node.get("pod/pulled", namespace=ns)["status"]["containerStatuses"]]
    assert len(image_ids) == 2 and all(i.endswith(f"/{repository}@{digest}") for i in image_ids), image_ids
    # the node's own image (same image ID, never pulled by the kubelet) still runs afterwards
    assert "local" in run_pod(kube_node, ns, pod("local-again", kube_node.images["busybox"], "echo local"))


async def test_the_projects_client_looks_for_a_proxy_only_when_the_environment_names_one(kube_cluster, monkeypatch):
    """cnbi_hub.kubeclient.api_client: without a proxy in the environment, aiohttp is not asked
    to look for one (nor for a ~/.netrc) at every request; with HTTPS_PROXY set, requests to the
    apiserver go through that proxy, as kubectl's would."""
    from kubernetes_asyncio import client

    from cnbi_hub.kubeclient import api_client
    from tests.infra_tcp import ConnectProxy

    for variable in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(variable, raising=False)
        monkeypatch.delenv(variable.upper(), raising=False)
    kubeconfig = str(kube_cluster.kubeconfig["admin"])
    api = await api_client(kubeconfig)
    try:
        assert api.rest_client.pool_manager.trust_env is False
        assert (await client.VersionApi(api).get_code()).major == "1"
    finally:
        await api.close()

    proxy = ConnectProxy()
    monkeypatch.setenv("HTTPS_PROXY", await proxy.start())
    api = await api_client(kubeconfig)
    try:
        assert api.rest_client.pool_manager.trust_env is True
        assert (await client.VersionApi(api).get_code()).major == "1"
        assert proxy.tunnels >= 1, "the apiserver was reached around the proxy the environment names"
    finally:
        await api.close()
        await proxy.close()
