"""Cluster mode end to end, as a z2jh hub admin runs it, on the real test cluster:

the Lab panel's API call → the cnbi service (cluster mode, its own ServiceAccount) → a
CustomNBImage → the operator → a real Tekton PipelineRun → the image in the local registry →
an ImageStream tag (OpenShift's image API is the one stand-in: tests/openshift_standin.py) →
the KubeSpawner form offers it → KubeSpawner starts a real pod on it and the hub reaches it.

The hub is `jupyterhub -f jupyterhub_config.py` in its own process, configured as the README
says (`configure(c, mode="kubernetes")` and `configure_kubespawner(c)`), with KubeSpawner
authenticating as a ServiceAccount that has z2jh's hub Role. Pods use the host network and
servers listen on 127.0.0.1, so nothing here uses a private address range.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from cnbi_hub import imagestreams as ist
from cnbi_hub import model
from tests.clusterfixtures import apply, pipeline_runs
from tests.infra_registry import end_process

pytestmark = pytest.mark.kube

STANDIN_CRD = Path(__file__).parent / "openshift" / "imagestream-crd.yaml"
HUB_ROLE_RULES = [  # z2jh's hub Role: what KubeSpawner needs
    {"apiGroups": [""], "resources": ["pods", "persistentvolumeclaims", "secrets", "services"],
     "verbs": ["get", "watch", "list", "create", "delete"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["get", "watch", "list"]},
]


def free_port() -> int:
    from jupyterhub.utils import random_port

    return random_port()


@pytest.fixture(scope="module")
def openshift_image_api(kube_node, local_registry, tmp_path_factory):
    """The ImageStream CRD plus the stand-in import controller, running as cluster admin."""
    kube_node.kubectl("apply", "--server-side", "-f", str(STANDIN_CRD))
    kube_node.kubectl("wait", "--for=condition=Established", "crd/imagestreams.image.openshift.io", "--timeout=60s")
    log_path = tmp_path_factory.mktemp("standin") / "standin.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.openshift_standin", "--kubeconfig", str(kube_node.kubeconfig["admin"]),
             "--insecure-registry", local_registry.host],
            stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent, start_new_session=True)
    yield log_path
    end_process(process, timeout=20)
    print("--- stand-in log (tail) ---\n" + log_path.read_text(errors="replace")[-3000:])


class HubProcess:
    """`jupyterhub -f jupyterhub_config.py` for cluster mode, driven over its REST API."""

    def __init__(self, workdir: Path, config_text: str, kubeconfig: Path, driver_token: str):
        self.workdir = workdir
        self.driver_token = driver_token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        (workdir / "jupyterhub_config.py").write_text(config_text.replace("@HUB_PORT@", str(self.port)))
        env = dict(os.environ, KUBECONFIG=str(kubeconfig))
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # configurable-http-proxy
        self.log_path = workdir / "hub.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "jupyterhub", "-f", "jupyterhub_config.py"],
                stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(self.url + "services/cnbi/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert self.process.poll() is None, "the hub exited:\n" + self.log()
            assert time.monotonic() < deadline, "the hub or its cnbi service did not come up:\n" + self.log()
            time.sleep(0.5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:]

    def call(self, method: str, path: str, token: str | None = None, body=None, **kwargs) -> requests.Response:
        headers = {"Authorization": f"token {token or self.driver_token}"}
        return requests.request(method, self.url + path.lstrip("/"), headers=headers, json=body, timeout=60,
                                **kwargs)

    def user_token(self, name: str) -> str:
        self.call("POST", f"hub/api/users/{name}")
        r = self.call("POST", f"hub/api/users/{name}/tokens", body={"note": "e2e"})
        assert r.status_code == 201, r.text
        return r.json()["token"]

    def browser(self, name: str) -> requests.Session:
        """A session logged in through the hub's login form, as a user's browser is."""
        session = requests.Session()
        session.get(self.url + "hub/login", timeout=30)
        r = session.post(self.url + "hub/login", timeout=30, data={
            "username": name, "password": "any", "_xsrf": session.cookies.get("_xsrf", path="/hub/")})
        assert r.status_code == 200 and "/hub/login" not in r.url, (r.url, r.text[:500])
        return session

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def hub_config(namespace: str, service_kubeconfig: Path, base: str, driver_token: str, server_port: int) -> str:
    """A jupyterhub_config.py as a z2jh admin writes it (hub.extraConfig), with test ports."""
    return f"""
from cnbi_hub.hubconfig import configure
from cnbi_hub.spawner import configure_kubespawner

c.JupyterHub.bind_url = "http://127.0.0.1:@HUB_PORT@/"
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {free_port()}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{free_port()}"
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "kubespawner.KubeSpawner"
c.KubeSpawner.namespace = {namespace!r}
# the test node: pods on the host network, each server on its own loopback port
c.KubeSpawner.extra_pod_config = {{"hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet"}}
c.KubeSpawner.ip = "127.0.0.1"
c.KubeSpawner.port = {server_port}
c.KubeSpawner.pod_connect_ip = "127.0.0.1"
c.KubeSpawner.image_pull_policy = "IfNotPresent"
c.KubeSpawner.start_timeout = 300
c.KubeSpawner.http_timeout = 120

configure(c, url="http://127.0.0.1:{free_port()}", mode="kubernetes", namespace={namespace!r},
          environment={{"KUBECONFIG": {str(service_kubeconfig)!r}}},
          service_config={{"base_images": [{{"image": {base!r}, "displayName": "Notebook base"}}]}})
configure_kubespawner(c)
c.CNBISpawnerHooks.admin_profiles = [{{"display_name": "Notebook base", "slug": "base",
                                      "kubespawner_override": {{"image": {base!r}}}}}]
c.CNBISpawnerHooks.cache_seconds = 0

c.JupyterHub.services.append({{"name": "e2e-driver", "api_token": {driver_token!r}}})
c.JupyterHub.load_roles.append({{"name": "e2e-driver", "services": ["e2e-driver"],
    "scopes": ["admin:users", "admin:servers", "tokens", "list:users", "read:users", "access:servers"]}})
"""


def dashboard_imagestream(namespace: str, base: str, missing: str) -> dict:
    """A notebook image as the Open Data Hub dashboard imports one: one tag OpenShift can import,
    one whose image does not exist (never reaches status.tags)."""
    return {
        "apiVersion": "image.openshift.io/v1", "kind": "ImageStream",
        "metadata": {"name": "custom-dashboard-base", "namespace": namespace,
                     "labels": {ist.LABEL_NOTEBOOK_IMAGE: "true"},
                     "annotations": {model.ANNOTATION_DISPLAY_NAME: "Dashboard base", ist.ANNOTATION_ORDER: "1",
                                     model.ANNOTATION_DESCRIPTION: "Imported in the dashboard"}},
        "spec": {"lookupPolicy": {"local": True}, "tags": [
            {"name": "2024.2", "from": {"kind": "DockerImage", "name": base},
             "annotations": {ist.ANNOTATION_SOFTWARE: json.dumps([{"name": "Python", "version": "v3.11"}])}},
            {"name": "broken", "from": {"kind": "DockerImage", "name": missing}},
        ]},
    }


def follow_events(hub: HubProcess, name: str, token: str, events: list, timeout: float = 900) -> None:
    """Read api/images/{name}/events (Server-Sent Events) into `events` until the image is final."""
    with requests.get(hub.url + f"services/cnbi/api/images/{name}/events", stream=True, timeout=(10, 60),
                      headers={"Authorization": f"token {token}"}) as response:
        kind, deadline = None, time.monotonic() + timeout
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: ") and kind:
                data = json.loads(line[len("data: "):])
                events.append((kind, data))
                if kind == "object" and model.phase_of(data) in model.TERMINAL_PHASES or kind == "deleted":
                    return
            if time.monotonic() > deadline:
                return


def profile_slugs(form: str) -> list[str]:
    return re.findall(r'name="profile"\s+id="profile-item-([^"]+)"', form)


def wait(predicate, what: str, timeout: float, diagnose=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{diagnose()}"
        time.sleep(1)


def test_hub_in_cluster_mode_builds_publishes_and_spawns_a_kubespawner_pod(
        kube_node, cluster_registry, cluster_namespace, openshift_image_api, operator, local_registry, tmp_path):
    cluster, namespace = kube_node, cluster_namespace
    service_kubeconfig = cluster.kubeconfig[cluster.serviceaccount_identity(namespace, "cnbi-service", create=False)]
    hub_identity = cluster.serviceaccount_identity(namespace, "hub")
    apply(cluster, [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "hub", "namespace": namespace}, "rules": HUB_ROLE_RULES},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "hub", "namespace": namespace},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "hub"},
         "subjects": [{"kind": "ServiceAccount", "name": "hub", "namespace": namespace}]},
    ])
    base = cluster_registry["base"]
    apply(cluster, [dashboard_imagestream(namespace, base, f"{local_registry.host}/cnbi/not-there:1")])
    driver_token = secrets.token_hex(16)
    hub = HubProcess(tmp_path, hub_config(namespace, service_kubeconfig, base, driver_token, free_port()),
                     cluster.kubeconfig[hub_identity], driver_token)
    try:
        alice, bob = hub.user_token("alice"), hub.user_token("bob")

        # the Lab panel's request, through the proxy to the service, becomes a CustomNBImage
        body = {"metadata": {"annotations": {model.ANNOTATION_DISPLAY_NAME: "Tabulate on k8s"}},
                "spec": {"buildType": "PackageList", "baseImage": base, "packageVersions": ["tabulate==0.9.0"]}}
        r = hub.call("POST", "services/cnbi/api/images", alice, body)
        assert r.status_code == 201, r.text
        name = model.name_of(r.json())
        resource = cluster.get(f"customnbimages.meteor.zone/{name}", namespace=namespace)
        assert model.creator_of(resource) == "alice" and resource["spec"]["packageVersions"] == ["tabulate==0.9.0"]

        # the panel's live view: the events stream carries the build pod's log while it builds
        events: list[tuple[str, dict]] = []
        follower = threading.Thread(target=follow_events, args=(hub, name, alice, events), daemon=True)
        follower.start()

        def image():
            return hub.call("GET", f"services/cnbi/api/images/{name}", alice).json()

        obj = wait(lambda: (o := image()) and model.phase_of(o) in model.TERMINAL_PHASES and o, "a final phase", 900,
                   lambda: json.dumps(image().get("status"), indent=1) + operator.log())
        assert model.phase_of(obj) == "Ready", json.dumps(obj["status"], indent=1) + operator.log()
        reference = obj["status"]["image"]
        follower.join(timeout=60)
        kinds = [kind for kind, _ in events]
        assert "log" in kinds and "object" in kinds, kinds
        first_final = next(i for i, (kind, data) in enumerate(events)
                           if kind == "object" and model.phase_of(data) in model.TERMINAL_PHASES)
        live = [data["line"] for kind, data in events[:first_final] if kind == "log"]
        assert any(line.startswith("STEP ") for line in live), "\n".join(live)  # buildah, in the build pod
        assert [r["metadata"]["name"] for r in pipeline_runs(cluster, namespace)] == [f"cnbi-{name}-g1-r1"]
        log = hub.call("GET", f"services/cnbi/api/images/{name}/logs", alice)
        assert log.status_code == 200 and "PipelineRun" in log.text and "check imports: ok" in log.text

        # published for Open Data Hub, and imported by "OpenShift"
        def published():
            found = cluster.kubectl("get", "imagestreams.image.openshift.io", f"cnbi-{name}", "-n", namespace,
                                    "-o", "json", check=False)
            return json.loads(found.stdout) if found.returncode == 0 else None

        stream = wait(lambda: (s := published()) and (s.get("status") or {}).get("tags") and s, "the import", 120,
                      operator.log)
        assert stream["metadata"]["labels"][ist.LABEL_NOTEBOOK_IMAGE] == "true"
        assert stream["metadata"]["annotations"][model.ANNOTATION_DISPLAY_NAME] == "Tabulate on k8s"
        [tag] = stream["spec"]["tags"]
        assert tag["name"] == "v1" and tag["from"]["name"] == reference
        assert tag["annotations"][ist.ANNOTATION_RECOMMENDED] == "true"
        dependencies = json.loads(tag["annotations"][ist.ANNOTATION_DEPENDENCIES])
        assert {"name": "tabulate", "version": "0.9.0", "visible": True} in dependencies
        assert stream["status"]["tags"][0]["items"][0]["dockerImageReference"] == reference

        # the spawn form: admin's profile, alice's image, the dashboard's imported tag (not the
        # one OpenShift could not import, and not cnbi's own stream a second time)
        form = hub.browser("alice").get(hub.url + "hub/spawn/alice", timeout=60)
        assert form.status_code == 200, form.text[-2000:]
        slugs = profile_slugs(form.text)
        assert slugs == ["base", f"cnbi-{name}", "cnbi-imagestream-custom-dashboard-base-2024.2"], (form.url, form.text[:3000])
        assert "Dashboard base (2024.2)" in form.text and "Python v3.11" in form.text
        if os.environ.get("CNBI_SPAWN_SCREENSHOTS"):  # to look at the form as alice does
            shot = subprocess.run(
                ["node", "ui-tests/scripts/spawn-form-screenshots.js", hub.url, "alice", "any",
                 os.environ["CNBI_SPAWN_SCREENSHOTS"]], cwd=Path(__file__).parent.parent, capture_output=True, text=True,
                env=dict(os.environ, NODE_PATH=str(Path(__file__).parent.parent / "ui-tests" / "node_modules")))
            assert shot.returncode == 0, shot.stderr
        bob_form = hub.browser("bob").get(hub.url + "hub/spawn/bob", timeout=60)
        assert profile_slugs(bob_form.text) == ["base", "cnbi-imagestream-custom-dashboard-base-2024.2"]
        assert hub.call("GET", "services/cnbi/api/imagestreams", bob).json()["available"] is True

        # alice starts her server on the image: a real pod on that digest, reached by the hub
        r = hub.call("POST", "hub/api/users/alice/server", body={"cnbi_image": name})
        assert r.status_code in (201, 202), r.text + hub.log()

        def ready():
            return hub.call("GET", "hub/api/users/alice").json()["servers"].get("", {}).get("ready")

        wait(ready, "alice's server", 420, lambda: hub.log() + cluster.describe("pods", namespace))
        pod = cluster.get("pod/jupyter-alice", namespace=namespace)
        assert pod["spec"]["containers"][0]["image"] == reference
        assert pod["metadata"]["labels"][f"{model.PREFIX}/image"] == name
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["CNBI_IMAGE"] == name and env["JUPYTER_IMAGE"] == reference
        status = hub.call("GET", "user/alice/api/status", alice)
        assert status.status_code == 200 and "started" in status.json(), status.text[:500]
        # the server runs the built image: tabulate is there
        kernel_check = cluster.kubectl("exec", "jupyter-alice", "-n", namespace, "--", "python", "-c",
                                       "import tabulate; print(tabulate.__version__)")
        assert kernel_check.stdout.strip() == "0.9.0"
        r = hub.call("DELETE", "hub/api/users/alice/server")
        assert r.status_code in (202, 204), r.text

        # deleting the image removes its ImageStream (the finalizer), leaving the dashboard's alone
        assert hub.call("DELETE", f"services/cnbi/api/images/{name}", alice).status_code in (200, 202, 204)
        wait(lambda: published() is None, "the stream to go", 120, operator.log)
        assert cluster.get("imagestreams.image.openshift.io/custom-dashboard-base", namespace=namespace)
    finally:
        hub.stop()
        print("--- hub log (tail) ---\n" + hub.log())


async def test_the_cluster_mode_api_fuzzed_gets_no_5xx_and_matches_the_description(
        kube_node, cluster_registry, cluster_namespace, tmp_path):
    """tests/test_fuzz_api.py's fuzzing, against the service in cluster mode (its store the
    apiserver, as its own ServiceAccount): no 5xx, every answer as described, and what it made
    are whole CustomNBImages. No operator runs: the API is under test, not the builds of
    thousands of generated requests."""
    from tests.test_fuzz_api import run_schemathesis

    cluster, namespace = kube_node, cluster_namespace
    service_kubeconfig = cluster.kubeconfig[cluster.serviceaccount_identity(namespace, "cnbi-service", create=False)]
    driver_token = secrets.token_hex(16)
    hub = HubProcess(tmp_path, hub_config(namespace, service_kubeconfig, cluster_registry["base"], driver_token,
                                          free_port()),
                     cluster.kubeconfig[cluster.serviceaccount_identity(namespace, "hub")], driver_token)
    try:
        user = "fuzz-cluster"
        token = hub.user_token(user)
        made = hub.call("POST", "services/cnbi/api/images", token, {
            "spec": {"buildType": "ImageImport", "fromImage": cluster_registry["base"]}})
        assert made.status_code == 201, made.text
        target = model.name_of(made.json())
        logs = Path(__file__).resolve().parent.parent / "test-output"
        logs.mkdir(exist_ok=True)
        service = hub.url + "services/cnbi/"
        runs = {
            "own image": await run_schemathesis(service, token, logs / "fuzz-api-cluster-own-image.log",
                                                "--exclude-method", "DELETE",
                                                config=f'[parameters]\n"path.name" = "{target}"\n'),
            "generated": await run_schemathesis(service, token, logs / "fuzz-api-cluster.log"),
        }
        for what, run in runs.items():
            cases = run["test_cases"]
            print("cluster", what, cases, run["operations"])
            assert run["complete"] and cases["with_failures"] == 0, (what, run)
            assert run["operations"]["tested"] >= 20 and cases["generated"] >= 10 * run["operations"]["tested"], run
        # what the fuzzer made is whole in the apiserver: the user's, valid, with a uid
        resources = cluster.get("customnbimages.meteor.zone", namespace=namespace)["items"]
        mine = [r for r in resources if model.creator_of(r) == user]
        for resource in mine:
            assert resource["metadata"]["uid"] and resource["spec"]["buildType"] in model.BUILD_TYPES, resource
            assert hub.call("DELETE", f"services/cnbi/api/images/{model.name_of(resource)}", token).status_code \
                in (200, 202, 204, 404)
    finally:
        hub.stop()
        print("--- hub log (tail) ---\n" + hub.log())
