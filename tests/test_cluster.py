"""Cluster mode on a real Kubernetes: the manifests, RBAC as the service's and operator's
ServiceAccounts, and the operator building an image with a real Tekton PipelineRun.

Tier a (etcd + apiserver) for manifests and RBAC; tier b (node, containerd, Tekton) for builds.
The operator runs on this machine as its own ServiceAccount (a real token), with a kubeconfig.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time

import pytest

from cnbi_hub import model, webhooks
from cnbi_hub.controller.rebuild import build_again, full_log, rebuild_for_push, roll_back, saved_generations
from cnbi_hub.controller.registry import RegistryClient
from cnbi_hub.store.kubernetes import KubernetesImageStore
from tests.clusterfixtures import Operator, apply, pipeline_runs, rendered_manifests, wait_for_phase
from tests.infra_podman import push_commit

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


OPERATOR_FINALIZER = f"{model.PREFIX}/operator"


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

    # the service: images and their status and artifacts, users' sealed git credentials; no builds
    for verb, resource in (("create", "customnbimages.meteor.zone"), ("delete", "customnbimages.meteor.zone"),
                           ("update", "customnbimages.meteor.zone/status"), ("update", "configmaps"),
                           ("get", "pods/log"), ("list", "imagestreams.image.openshift.io"),
                           ("create", "secrets"), ("list", "secrets")):
        assert can_i(cluster, service, verb, resource, namespace), (verb, resource)
    for verb, resource in (("create", "pipelineruns.tekton.dev"), ("create", "pods"), ("watch", "secrets")):
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
    # the operator makes one run's credential Secret and deletes it
    for verb in ("create", "delete"):
        assert can_i(cluster, operator, verb, "secrets", namespace), verb
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


async def test_operator_builds_an_image_with_a_tekton_pipelinerun(kube_node, cluster_store, cluster_namespace,
                                                                 cluster_registry, operator, local_registry):
    await cluster_store.create(image_object("tabulate", cluster_registry["base"]))
    obj = await wait_for_phase(cluster_store, "tabulate", model.TERMINAL_PHASES)
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
    log = await cluster_store.get_artifact("tabulate", "log")
    assert "check imports: ok" in log and "==> Building -> Ready" in log


async def wait_for_running_pipelinerun(cluster, namespace: str, name: str, timeout: float = 300) -> dict:
    """The PipelineRun `name` once Tekton says it is Running (its build pod started)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = {r["metadata"]["name"]: r for r in pipeline_runs(cluster, namespace)}
        run = runs.get(name)
        if run and any(c["type"] == "Succeeded" and c.get("reason") == "Running"
                       for c in (run.get("status") or {}).get("conditions", [])):
            return run
        assert time.monotonic() < deadline, f"PipelineRun {name} never ran: {sorted(runs)}"
        await asyncio.sleep(0.5)


def failure_message(obj: dict) -> str:
    return " ".join(c.get("message", "") for c in obj["status"].get("conditions", []) if c.get("status") == "False")


async def test_an_operator_killed_mid_build_follows_the_same_pipelinerun_after_restart(
        kube_node, cluster_store, cluster_namespace, cluster_registry, operator):
    await cluster_store.create(image_object("survivor", cluster_registry["base"]))
    await wait_for_running_pipelinerun(kube_node, cluster_namespace, "cnbi-survivor-g1-r1")
    operator.kill()  # SIGKILL: no cleanup, no status written
    building = await cluster_store.get("survivor")
    assert model.phase_of(building) == "Building"
    # an image in work holds the operator's finalizer: deleting it would cancel its PipelineRun
    assert OPERATOR_FINALIZER in building["metadata"].get("finalizers", [])
    operator.start()
    obj = await wait_for_phase(cluster_store, "survivor", model.TERMINAL_PHASES)
    assert model.phase_of(obj) == "Ready", json.dumps(obj["status"], indent=1) + operator.log()
    # one build: the restarted operator found its PipelineRun and followed it to the end
    assert [r["metadata"]["name"] for r in pipeline_runs(kube_node, cluster_namespace)] == ["cnbi-survivor-g1-r1"]
    assert "already exists (started before a restart): following it" in await cluster_store.get_artifact("survivor", "log")
    # finished, it holds none: what it owns goes with it, and no namespace waits for an operator
    deadline = time.monotonic() + 60
    while OPERATOR_FINALIZER in (await cluster_store.get("survivor"))["metadata"].get("finalizers", []):
        assert time.monotonic() < deadline, "the finalizer stayed on a Ready image"
        await asyncio.sleep(0.5)


async def test_a_pipelinerun_cancelled_in_tekton_ends_the_image_failed_with_tektons_words(
        kube_node, cluster_store, cluster_namespace, cluster_registry, operator):
    await cluster_store.create(image_object("stopped", cluster_registry["base"]))
    await wait_for_running_pipelinerun(kube_node, cluster_namespace, "cnbi-stopped-g1-r1")
    # someone (a cluster admin, `tkn pipelinerun cancel`) cancels the run itself
    kube_node.kubectl("patch", "pipelineruns.tekton.dev", "cnbi-stopped-g1-r1", "-n", cluster_namespace,
                      "--type=merge", "-p", '{"spec": {"status": "Cancelled"}}')
    obj = await wait_for_phase(cluster_store, "stopped", model.TERMINAL_PHASES, timeout=300)
    assert model.phase_of(obj) == "Failed", json.dumps(obj["status"], indent=1)
    [run] = pipeline_runs(kube_node, cluster_namespace)
    succeeded = [c for c in run["status"]["conditions"] if c["type"] == "Succeeded"][0]
    assert succeeded["status"] == "False" and succeeded["reason"] == "Cancelled"
    assert succeeded["message"] in failure_message(obj), (succeeded["message"], obj["status"])
    assert any(c.get("reason") == "Cancelled" for c in obj["status"]["conditions"])


@pytest.fixture
def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


async def test_a_failing_build_ends_failed_with_tektons_reason_and_the_steps_own_words(
        kube_node, cluster_store, cluster_namespace, cluster_registry, closed_port, tmp_path):
    # builds push to a registry that is not there: buildah's push step fails inside Tekton
    unreachable = Operator(kube_node, cluster_namespace, cluster_registry, tmp_path / "operator.log",
                           overrides={"push_registry": f"127.0.0.1:{closed_port}/built"}).start()
    try:
        await cluster_store.create(image_object("unpushable", cluster_registry["base"]))
        obj = await wait_for_phase(cluster_store, "unpushable", model.TERMINAL_PHASES)
        assert model.phase_of(obj) == "Failed", json.dumps(obj["status"], indent=1) + unreachable.log()
        [run] = pipeline_runs(kube_node, cluster_namespace)
        succeeded = [c for c in run["status"]["conditions"] if c["type"] == "Succeeded"][0]
        assert succeeded["status"] == "False" and succeeded["reason"] == "Failed"
        message = failure_message(obj)
        assert succeeded["message"] in message  # Tekton's sentence...
        assert f"127.0.0.1:{closed_port}" in message and "connection refused" in message.lower()  # ...and buildah's
    finally:
        unreachable.stop()
        print("--- operator log (tail) ---\n" + unreachable.log())


async def test_an_image_created_with_kubectl_without_a_status_is_driven_to_ready(
        kube_node, cluster_store, cluster_namespace, cluster_registry, operator):
    # as `kubectl apply` or GitOps create one: the status subresource drops any status given
    body = {"apiVersion": model.API_VERSION, "kind": model.KIND,
            "metadata": {"name": "from-kubectl", "namespace": cluster_namespace,
                         "annotations": {model.ANNOTATION_DISPLAY_NAME: "From kubectl",
                                         model.ANNOTATION_CREATOR: "alice"}},
            "spec": {"buildType": "ImageImport", "fromImage": cluster_registry["base"]}}
    kube_node.kubectl("create", "-f", "-", input=json.dumps(body))
    obj = await wait_for_phase(cluster_store, "from-kubectl", model.TERMINAL_PHASES, timeout=600)
    assert model.phase_of(obj) == "Ready", json.dumps(obj["status"], indent=1) + operator.log()
    assert obj["status"]["image"].split("@")[0] == cluster_registry["base"].rsplit(":", 1)[0]
    assert "Pending" in obj["status"]["phaseTimes"]
    # an import's packages are its manifest, kept once: the inspection keeps python and user
    assert obj["status"]["packages"] and "packages" not in obj["status"]["baseImageInfo"]
    assert obj["status"]["baseImageInfo"]["pythonVersion"].startswith("3.")

    # the same import again: reused outside the build slots, Pending to Ready in one status
    # write, no second PipelineRun, never a finalizer
    runs_before = len(pipeline_runs(kube_node, cluster_namespace))
    body["metadata"]["name"] = "from-kubectl-again"
    kube_node.kubectl("create", "-f", "-", input=json.dumps(body))
    again = await wait_for_phase(cluster_store, "from-kubectl-again", model.TERMINAL_PHASES, timeout=120)
    assert model.phase_of(again) == "Ready", json.dumps(again["status"], indent=1) + operator.log()
    assert again["status"]["reusedFrom"] == "from-kubectl"
    assert again["status"]["image"] == obj["status"]["image"]
    assert again["status"]["baseImageInfo"] == obj["status"]["baseImageInfo"]
    assert {"Pending", "Prepare", "Ready"} <= set(again["status"]["phaseTimes"])
    assert {c["type"]: c["status"] for c in again["status"]["conditions"]}["ImageImportReady"] == "True"
    assert OPERATOR_FINALIZER not in again["metadata"].get("finalizers", [])
    assert len(pipeline_runs(kube_node, cluster_namespace)) == runs_before
    # one write, its status: no log ConfigMap; the logs route says its run from its status
    assert await cluster_store.get_artifact("from-kubectl-again", "log") is None
    log = await full_log(cluster_store, again)
    assert "==> Pending -> Ready (Reused): identical to from-kubectl" in log, log


async def test_a_git_repository_builds_with_the_gitrepo_pipeline(
        kube_node, cluster_store, cluster_namespace, cluster_registry, make_git_repo, tmp_path):
    repo = make_git_repo("cluster-requirements", {"requirements.txt": "tabulate==0.9.0\n",
                                                  "README.md": "a repository built in a PipelineRun\n"})
    operator = Operator(kube_node, cluster_namespace, cluster_registry, tmp_path / "operator.log",
                        overrides={"allowed_git_schemes": ["https", "git"]}).start()
    try:
        body = {"metadata": {"name": "from-git", "annotations": {model.ANNOTATION_DISPLAY_NAME: "From git"}},
                "spec": {"buildType": "GitRepository", "repository": repo.url, "gitRef": "main",
                         "baseImage": cluster_registry["base"]}}
        policy = model.ValidationPolicy(allowed_git_schemes=("https", "git"))
        await cluster_store.create(model.validate_new_object(body, creator="alice", policy=policy))
        obj = await wait_for_phase(cluster_store, "from-git", model.TERMINAL_PHASES)
        assert model.phase_of(obj) == "Ready", json.dumps(obj["status"], indent=1) + operator.log()
        assert obj["status"]["gitCommit"] == repo.commit
        [run] = pipeline_runs(kube_node, cluster_namespace)
        assert run["spec"]["pipelineRef"]["name"] == "cnbi-gitrepo"
        params = {p["name"]: p["value"] for p in run["spec"]["params"]}
        assert params["git-url"] == repo.url and params["git-commit"] == repo.commit
        assert {"name": "tabulate", "version": "0.9.0", "visible": True} in [
            {k: p[k] for k in ("name", "version", "visible")} for p in obj["status"]["packages"]]
        assert "check imports: ok" in await cluster_store.get_artifact("from-git", "log")

        # pushes, as the service's webhook handler passes them on, with the service's identity
        service = KubernetesImageStore(namespace=cluster_namespace, kubeconfig=str(kube_node.kubeconfig[
            kube_node.serviceaccount_identity(cluster_namespace, "cnbi-service", create=False)]))
        try:
            second = push_commit(repo, {"README.md": "second\n"})
            assert await rebuild_for_push(service, obj, github_push(repo, repo.commit, second, "d-2")) == "rebuilding"
            await wait_for_running_pipelinerun(kube_node, cluster_namespace, "cnbi-from-git-g1-r2")
            # a push while run 2 builds the second commit: the operator rebuilds after it
            third = push_commit(repo, {"README.md": "third\n"})
            building = await cluster_store.get("from-git")
            assert await rebuild_for_push(service, building, github_push(repo, second, third, "d-3")) == "afterCurrentRun"
        finally:
            await service.aclose()
        done = await cluster_store.get("from-git")
        deadline = time.monotonic() + 900
        while not (done["status"].get("run") == 3 and model.phase_of(done) in model.TERMINAL_PHASES):
            assert time.monotonic() < deadline, json.dumps(done["status"], indent=1) + operator.log()
            await asyncio.sleep(1)
            done = await cluster_store.get("from-git")
        assert model.phase_of(done) == "Ready", json.dumps(done["status"], indent=1) + operator.log()
        assert done["status"]["gitCommit"] == third and "rebuildAfter" not in done["status"]
        assert [r["phase"] for r in done["status"]["runs"]] == ["Ready", "Ready"]
        assert [(t["delivery"], t["to"]) for t in done["status"]["triggers"]] == [("d-2", second), ("d-3", third)]
        assert sorted(r["metadata"]["name"] for r in pipeline_runs(kube_node, cluster_namespace)) == [
            "cnbi-from-git-g1-r1", "cnbi-from-git-g1-r2", "cnbi-from-git-g1-r3"]

        # the first two builds are kept; the service (its own identity) makes the first current
        # again without a build, and the operator leaves it so
        service = KubernetesImageStore(namespace=cluster_namespace, kubeconfig=str(kube_node.kubeconfig[
            kube_node.serviceaccount_identity(cluster_namespace, "cnbi-service", create=False)]))
        try:
            saved = await saved_generations(service, "from-git")
            assert sorted(saved) == [1, 2] and saved[1]["image"] == obj["status"]["image"]
            assert saved[1]["gitCommit"] == repo.commit and "tabulate==0.9.0" in saved[1]["lock"]
            # read it now, as the API's rollback does: the operator may have written since run 3 ended
            back = await roll_back(service, await service.get("from-git"), 1, "alice")
        finally:
            await service.aclose()
        assert model.phase_of(back) == "Ready" and back["status"]["run"] == 4
        assert back["status"]["image"] == obj["status"]["image"] and back["status"]["gitCommit"] == repo.commit
        await asyncio.sleep(5)
        still = await cluster_store.get("from-git")
        assert model.phase_of(still) == "Ready" and still["status"]["run"] == 4, still["status"]
        assert len(pipeline_runs(kube_node, cluster_namespace)) == 3
        assert "tabulate==0.9.0" in await cluster_store.get_artifact("from-git", "lock")

        # retention, by the operator: restarted with a policy that keeps no earlier build, it
        # deletes run 2's image from the registry at once, but not run 3's while a pod runs it
        saved = await saved_generations(cluster_store, "from-git")
        run2_image, run3_image = saved[2]["image"], saved[3]["image"]
        assert len({run2_image, run3_image, still["status"]["image"]}) == 3
        server_pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a-server-on-run-3"},
                      "spec": {"containers": [{"name": "notebook", "image": run3_image, "command": ["sleep", "600"]}],
                               "terminationGracePeriodSeconds": 0}}
        kube_node.kubectl("apply", "-n", cluster_namespace, "-f", "-", input=json.dumps(server_pod))
        kube_node.kubectl("wait", "-n", cluster_namespace, "--for=condition=Ready", "pod/a-server-on-run-3",
                          "--timeout=180s")
        operator.stop()
        operator = Operator(kube_node, cluster_namespace, cluster_registry, tmp_path / "operator.log",
                            overrides={"allowed_git_schemes": ["https", "git"],
                                       "EmbeddedRunner": {"keep_generations": 0, "retention_interval": 1}}).start()
        registry = RegistryClient(insecure_registries=[cluster_registry["push"].split("/")[0]])
        saved = await _when_removed(cluster_store, "from-git", 2, operator)
        assert saved[2]["removed"]["reason"] == "this hub keeps no earlier build's image"
        assert not (await registry.exists(run2_image))["exists"]
        await asyncio.sleep(3)  # passes go on: the pod still runs run 3's build
        assert "removed" not in (await saved_generations(cluster_store, "from-git"))[3]
        assert (await registry.exists(run3_image))["exists"]
        kube_node.kubectl("delete", "-n", cluster_namespace, "pod/a-server-on-run-3", "--wait=true")
        await _when_removed(cluster_store, "from-git", 3, operator)
        assert not (await registry.exists(run3_image))["exists"]
        current = await cluster_store.get("from-git")
        assert model.phase_of(current) == "Ready" and current["status"]["image"] == still["status"]["image"]
        assert (await registry.exists(current["status"]["image"]))["exists"]
        # the records stay, with their packages and lock; going back to one is refused
        with pytest.raises(KeyError):
            await roll_back(cluster_store, current, 2, "alice")
        assert "tabulate==0.9.0" in (await saved_generations(cluster_store, "from-git"))[3]["lock"]

        # built again on demand (the service, its own identity): run 2's commit, in a PipelineRun
        service = KubernetesImageStore(namespace=cluster_namespace, kubeconfig=str(kube_node.kubeconfig[
            kube_node.serviceaccount_identity(cluster_namespace, "cnbi-service", create=False)]))
        try:
            await build_again(service, await service.get("from-git"), 2, "alice")
        finally:
            await service.aclose()
        again = await wait_for_phase(cluster_store, "from-git", model.TERMINAL_PHASES, run=5)
        assert model.phase_of(again) == "Ready", json.dumps(again["status"], indent=1) + operator.log()
        assert again["status"]["gitCommit"] == second and again["status"]["triggers"][-1]["kind"] == "restore"
        params = {p["name"]: p["value"] for p in next(
            r for r in pipeline_runs(kube_node, cluster_namespace)
            if r["metadata"]["name"] == "cnbi-from-git-g1-r5")["spec"]["params"]}
        assert params["git-commit"] == second
        assert (await registry.exists(again["status"]["image"]))["exists"]
    finally:
        operator.stop()
        print("--- operator log (tail) ---\n" + operator.log())


async def _when_removed(store, name: str, run: int, operator, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        saved = await saved_generations(store, name)
        if saved[run].get("removed"):
            return saved
        assert time.monotonic() < deadline, f"run {run} was not removed: {saved[run]}\n" + operator.log()
        await asyncio.sleep(0.5)


def github_push(repo, before: str, after: str, delivery: str):
    payload = {"ref": "refs/heads/main", "before": before, "after": after,
               "repository": {"clone_url": repo.url, "default_branch": "main"}, "pusher": {"name": "dev"}}
    return webhooks.parse_push("github", "push", payload, delivery)


async def test_a_stack_waits_for_and_follows_the_image_below_it(
        kube_node, cluster_store, cluster_namespace, cluster_registry, local_registry, notebook_base_images,
        podman_env, tmp_path):
    """Cluster mode, the same engine as embedded: an image on `cnbi:<name>` created before that
    one waits in Pending, is built by a PipelineRun on its build, and is rebuilt after the one
    below it follows its base tag to a new digest (the operator's base check, every 2 s here)."""
    from tests.infra_podman import podman

    tag = f"{local_registry.host}/stackbase/base:1"
    pushed = podman("push", "--quiet", "--tls-verify=false", notebook_base_images["user"], f"docker://{tag}",
                    env=podman_env)
    assert pushed.returncode == 0, pushed.stderr
    operator = Operator(kube_node, cluster_namespace, cluster_registry, tmp_path / "operator.log",
                        overrides={"EmbeddedRunner": {"rebuild_check_interval": 2.0}}).start()

    async def run_ends(name: str, run: int) -> dict:
        deadline = time.monotonic() + 900
        while True:
            obj = await cluster_store.get(name)
            if obj["status"].get("run", 1) == run and model.phase_of(obj) in model.TERMINAL_PHASES:
                return obj
            assert time.monotonic() < deadline, f"run {run} of {name} did not end: {obj['status']}"
            await asyncio.sleep(1)

    try:
        await cluster_store.create(image_object("stack-top", "cnbi:stack-bottom", packages=("toolz==0.12.1",)))
        await cluster_store.create(model.validate_new_object(
            {"metadata": {"name": "stack-bottom"}, "spec": {"buildType": "ImageImport", "fromImage": tag}},
            creator="alice"))
        bottom, top = await run_ends("stack-bottom", 1), await run_ends("stack-top", 1)
        assert model.phase_of(bottom) == "Ready", json.dumps(bottom["status"], indent=1) + operator.log()
        assert model.phase_of(top) == "Ready", json.dumps(top["status"], indent=1) + operator.log()
        assert top["status"]["resolvedBaseImage"] == bottom["status"]["image"] and "runs" not in top["status"]

        context = tmp_path / "moved"
        context.mkdir()
        (context / "Containerfile").write_text(f"FROM {notebook_base_images['user']}\nLABEL cnbi.test.stack=moved\n")
        built = podman("build", "--quiet", "-t", "localhost/cnbi-test/stack-moved:1", str(context), env=podman_env)
        assert built.returncode == 0, built.stderr
        pushed = podman("push", "--quiet", "--tls-verify=false", "localhost/cnbi-test/stack-moved:1",
                        f"docker://{tag}", env=podman_env)
        assert pushed.returncode == 0, pushed.stderr
        bottom2, top2 = await run_ends("stack-bottom", 2), await run_ends("stack-top", 2)
    finally:
        operator.stop()
    assert model.phase_of(top2) == "Ready", json.dumps(top2["status"], indent=1) + operator.log()
    assert top2["status"]["resolvedBaseImage"] == bottom2["status"]["image"] != bottom["status"]["image"]
    assert top2["status"]["phaseTimes"]["Pending"] >= bottom2["status"]["phaseTimes"]["Ready"]
    trigger = top2["status"]["triggers"][-1]
    assert (trigger["kind"], trigger["image"]) == ("baseImage", "cnbi:stack-bottom")
    assert [r["metadata"]["name"] for r in pipeline_runs(kube_node, cluster_namespace)
            if r["metadata"]["name"].startswith("cnbi-stack-top")] == ["cnbi-stack-top-g1-r1", "cnbi-stack-top-g1-r2"]


async def test_a_private_repository_builds_in_tekton_with_its_owners_sealed_credential(
        kube_node, cluster_store, cluster_namespace, cluster_registry, private_git_server, notebook_base_images,
        podman_env, tmp_path):
    """The service stores alice's token sealed in a Secret (as its ServiceAccount); the operator
    opens it with the shared key, Prepare reads the private repository with it, and Tekton's
    fetch step gets it from a Secret that lives for the run only. The token is then in no
    object of the namespace, no log and no layer of the image; bob cannot name it."""
    from cryptography.fernet import Fernet

    from cnbi_hub.credentials import CredentialVault, check_credential_input, new_record
    from tests.infra_podman import podman
    from tests.test_credentials import _build_layers_holding

    token = private_git_server.token
    repo = private_git_server.make_repo("cluster-private", {"requirements.txt": "tabulate==0.9.0\n"})
    key = Fernet.generate_key().decode()
    service = KubernetesImageStore(namespace=cluster_namespace, kubeconfig=str(kube_node.kubeconfig[
        kube_node.serviceaccount_identity(cluster_namespace, "cnbi-service", create=False)]))
    try:
        clean = check_credential_input("private", {"host": f"127.0.0.1:{private_git_server.port}", "token": token})
        sealed = CredentialVault(keys=[key]).seal(clean["username"], clean["token"])
        await service.put_credential(new_record("alice", "private", clean, sealed))
        assert [c["name"] for c in await service.list_credentials("alice")] == ["private"]
        assert await service.list_credentials("bob") == []
    finally:
        await service.aclose()

    policy = model.ValidationPolicy(allowed_git_schemes=("https", "http"))

    def git_image(name, creator):
        body = {"metadata": {"name": name}, "spec": {
            "buildType": "GitRepository", "repository": repo.url, "baseImage": cluster_registry["base"],
            "gitCredential": "private"}}
        return model.validate_new_object(body, creator=creator, policy=policy)

    operator = Operator(kube_node, cluster_namespace, cluster_registry, tmp_path / "operator.log",
                        overrides={"allowed_git_schemes": ["https", "http"]}, env={"CNBI_CRYPT_KEY": key}).start()
    try:
        await cluster_store.create(git_image("private-alice", "alice"))
        await cluster_store.create(git_image("private-bob", "bob"))  # made with kubectl: no service check
        obj = await wait_for_phase(cluster_store, "private-alice", model.TERMINAL_PHASES)
        assert model.phase_of(obj) == "Ready", json.dumps(obj["status"], indent=1) + operator.log()
        bob = await wait_for_phase(cluster_store, "private-bob", model.TERMINAL_PHASES)
    finally:
        operator.stop()
    assert obj["status"]["gitCommit"] == repo.commit
    prepared = [c for c in bob["status"]["conditions"] if c["type"] == "Prepared"][0]
    assert model.phase_of(bob) == "Failed" and prepared["reason"] == "GitCredentialNotFound", prepared

    # the run's Secret is gone; nothing left in the namespace holds the token in the clear
    dump = kube_node.kubectl("get", "secrets,configmaps,pipelineruns.tekton.dev,taskruns.tekton.dev,pods",
                             "-n", cluster_namespace, "-o", "json").stdout
    assert "private-alice-g1-r1-git" not in [item["metadata"]["name"] for item in json.loads(dump)["items"]]
    decoded = [base64.b64decode(value) for item in json.loads(dump)["items"] if item["kind"] == "Secret"
               for value in (item.get("data") or {}).values()]
    assert token not in dump and all(token.encode() not in value for value in decoded)
    assert token not in (await cluster_store.get_artifact("private-alice", "log") or "")
    assert any(authorized for method, _, authorized in private_git_server.requests if method == "POST")

    # and no layer the build added holds it
    pulled = podman("pull", "--quiet", "--tls-verify=false", obj["status"]["image"], env=podman_env)
    assert pulled.returncode == 0, pulled.stderr
    base = podman("pull", "--quiet", "--tls-verify=false", cluster_registry["base"], env=podman_env)
    assert base.returncode == 0, base.stderr
    layers, holding = _build_layers_holding(obj["status"]["image"], cluster_registry["base"], token.encode(),
                                            podman_env, tmp_path)
    assert layers >= 1 and holding == []


async def test_a_hostile_build_in_tekton_reaches_nothing_and_finds_no_credential(
        kube_node, cluster_store, cluster_namespace, cluster_registry, local_registry, make_git_repo, tmp_path):
    """The embedded probe (tests/test_hostile_builds.py), as a repository's Containerfile built
    by a real PipelineRun: its build step must not reach the node's loopback (apiserver, registry,
    a canary), find the registry credentials (a dockerconfig Secret holding a canary), a
    ServiceAccount token, or leave buildah's chroot. The task's pods carry no token, and the
    pod that runs the image's checks is off the node's network."""
    import secrets as random
    import threading
    from http.server import ThreadingHTTPServer
    from urllib.parse import urlparse

    from tests.test_hostile_builds import PROBE, PROBE_MARK, _Canary

    canary_auth = f"cnbi-canary-registry-{random.token_hex(8)}"
    config_json = json.dumps({"auths": {"canary.invalid": {"auth": base64.b64encode(
        f"robot:{canary_auth}".encode()).decode()}}})
    kube_node.kubectl("create", "secret", "generic", "cnbi-push-creds", "-n", cluster_namespace,
                      "--type=kubernetes.io/dockerconfigjson", f"--from-literal=.dockerconfigjson={config_json}")
    # another pipeline's git credential, on the namespace's default ServiceAccount the way Tekton
    # wants it: Tekton mounts such Secrets into every step of a run that uses that account
    canary_git = f"cnbi-canary-tekton-git-{random.token_hex(8)}"
    kube_node.apply({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/basic-auth",
                     "metadata": {"name": "other-pipelines-git", "namespace": cluster_namespace,
                                  "annotations": {"tekton.dev/git-0": "https://github.com"}},
                     "stringData": {"username": "robot", "password": canary_git}})
    kube_node.kubectl("patch", "serviceaccount", "default", "-n", cluster_namespace, "--type=merge",
                      "-p", json.dumps({"secrets": [{"name": "other-pipelines-git"}]}))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Canary)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Canary.hits = 0
    abstract_name = f"cnbi-canary-{random.token_hex(4)}"
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind("\0" + abstract_name)
    abstract.listen(5)
    api = urlparse(kube_node.url)
    registry_host, registry_port = local_registry.host.rsplit(":", 1)
    targets = {
        "tcp": {"apiserver": ["127.0.0.1", api.port], "registry": [registry_host, int(registry_port)],
                "canary": ["127.0.0.1", server.server_port]},
        "http": {"registry_catalog": f"http://{local_registry.host}/v2/_catalog",
                 "canary": f"http://127.0.0.1:{server.server_port}/"},
        "abstract": abstract_name,
        "canaries": [canary_auth[::-1], canary_git[::-1]],
    }
    repo = make_git_repo(f"cluster-hostile-{random.token_hex(3)}", {
        "probe.py": PROBE, "targets.json": json.dumps(targets),
        "Containerfile": (f"FROM {cluster_registry['base']}\nUSER root\nCOPY probe.py targets.json /probe/\n"
                          "RUN python3 /probe/probe.py\nUSER jovyan\n"),
    })
    operator = Operator(kube_node, cluster_namespace, cluster_registry, tmp_path / "operator.log",
                        overrides={"allowed_git_schemes": ["https", "git"],
                                   "TektonBuilder": {"dockerconfig_secret": "cnbi-push-creds"}}).start()
    try:
        body = {"metadata": {"name": "hostile"},
                "spec": {"buildType": "GitRepository", "repository": repo.url, "gitRef": "main"}}
        policy = model.ValidationPolicy(allowed_git_schemes=("https", "git"))
        await cluster_store.create(model.validate_new_object(body, creator="mallory", policy=policy))
        obj = await wait_for_phase(cluster_store, "hostile", model.TERMINAL_PHASES)
    finally:
        operator.stop()
        server.shutdown()
        abstract.close()
    assert model.phase_of(obj) == "Ready", json.dumps(obj["status"], indent=1) + operator.log()
    log = await cluster_store.get_artifact("hostile", "log")
    found = json.loads(next(line for line in log.splitlines() if PROBE_MARK in line).split(PROBE_MARK, 1)[1])
    print("the probe found:", json.dumps(found, indent=1))

    assert all(result.startswith("refused") for result in found["tcp"].values()), found["tcp"]
    assert all(str(result).startswith("failed") for result in found["http"].values()), found["http"]
    assert _Canary.hits == 0 and found["abstract"].startswith("refused"), found["abstract"]
    assert found["escape"].startswith("refused"), found  # CAP_SYS_CHROOT is dropped for RUN steps
    assert found["outside_markers"] == [], found
    assert found["devices_opened"] == [], found  # the build step's /dev is its own, not the node's
    assert found["canaries"] == [] and found["env_secrets"] == [], found
    assert canary_auth not in log and canary_git not in log

    pods = json.loads(kube_node.kubectl("get", "pods", "-n", cluster_namespace, "-l",
                                        "tekton.dev/pipelineRun=cnbi-hostile-g1-r1", "-o", "json").stdout)["items"]
    by_task = {p["metadata"]["labels"]["tekton.dev/pipelineTask"]: p["spec"] for p in pods}
    assert set(by_task) == {"build", "validate"}
    assert all(spec.get("automountServiceAccountToken") is False for spec in by_task.values())
    # the builds' own account: the default account's Tekton-annotated Secret is in no pod
    assert {spec["serviceAccountName"] for spec in by_task.values()} == {"cnbi-build"}
    mounted = [v["secret"]["secretName"] for spec in by_task.values() for v in spec.get("volumes", []) if "secret" in v]
    assert "other-pipelines-git" not in mounted, mounted
    assert by_task["build"].get("hostNetwork") is True and not by_task["validate"].get("hostNetwork")
    build_steps = {c["name"]: c for c in by_task["build"]["containers"]}
    mounts = {name: [m["mountPath"] for m in c.get("volumeMounts", [])] for name, c in build_steps.items()}
    assert any("dockerconfig" in m for m in mounts["step-pull"]) and any("dockerconfig" in m for m in mounts["step-push"])
    assert not any("dockerconfig" in m for m in mounts["step-build"]), mounts["step-build"]
    assert build_steps["step-build"]["resources"]["limits"]["memory"] == "4Gi"
