"""Pytest plugin: a real single-node Kubernetes, started by ``scripts/kube-up``.

Load with ``-p tests.infra_kube`` (tests/conftest.py does). Session-scoped fixtures, both yielding
a :class:`KubeCluster`:

- ``kube_cluster``: tier a, etcd + kube-apiserver (RBAC on, static tokens), ~5 s to start.
  No controllers run: namespaces stay Terminating after deletion, ownerReferences are not
  garbage-collected, pods are never scheduled.
- ``kube_node``: tier b, + containerd, kube-scheduler, kube-controller-manager, a kubelet (node
  "localhost") and the Tekton Pipelines controller with its CRDs, ~20 s; needs root and the
  Debian packages of scripts/install-system-deps. If it cannot run, it FAILS (a skipped
  end-to-end test must not pass for a green run).

One cluster per session: if a session asks for ``kube_cluster`` first and ``kube_node`` later,
the node is added to the same cluster (so tier-a tests that run after it see controllers).
Missing binaries are built by ``scripts/kube-build`` first (cold: ~8 min tier a, ~12 min tier b;
cached in ~/.cache/cnbi-hub/kube-bin afterwards).

``CNBI_KUBE_RUNDIR=/some/dir`` makes the fixtures use (or start) the cluster in that directory
and leave it running at the end: ``scripts/kube-up /tmp/k --tier b`` once, then iterate with
``CNBI_KUBE_RUNDIR=/tmp/k pytest ...``; ``scripts/kube-down /tmp/k`` when done.

Tests using these fixtures get the ``kube`` marker automatically (``-m "not kube"`` skips them).
Identities (``as_=``): "admin" (system:masters), "cnbi-service" and "cnbi-operator", which
authenticate as ``system:serviceaccount:cnbi:cnbi-service`` / ``...:cnbi-operator`` — RBAC
subjects ``{kind: ServiceAccount, namespace: cnbi, name: cnbi-service}`` match them — plus any
added with :meth:`KubeCluster.serviceaccount_identity` (a real ServiceAccount token).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
KUBE_UP = REPO / "scripts" / "kube-up"
KUBE_DOWN = REPO / "scripts" / "kube-down"
UP_TIMEOUT = 60 * 60  # includes a cold build of the binaries
KUBE_FIXTURES = {"kube_cluster", "kube_node"}

_live_clusters: list[KubeCluster] = []


class KubeError(RuntimeError):
    """A kubectl call or a wait on the test cluster failed."""


@dataclasses.dataclass
class KubeCluster:
    """A running test cluster; see the module docstring."""

    rundir: Path
    tier: str  # "a" or "b"
    url: str  # https://127.0.0.1:PORT
    ca_file: Path  # the apiserver's self-signed certificate (verifies url)
    bindir: Path  # etcd, kube-apiserver, kubectl, ... (scripts/kube-build)
    kubeconfig: dict[str, Path]  # identity -> kubeconfig file
    users: dict[str, str]  # identity -> user name the apiserver sees
    tokens: dict[str, str]  # identity -> bearer token
    images: dict[str, str] = dataclasses.field(default_factory=dict)  # tier b: "busybox" -> "localhost/busybox:v1"
    image_tarballs: dict[str, Path] = dataclasses.field(default_factory=dict)  # docker-archive files
    _namespaces: list[str] = dataclasses.field(default_factory=list, repr=False)

    @classmethod
    def from_rundir(cls, rundir: Path) -> KubeCluster:
        state = json.loads((rundir / "state.json").read_text())
        identities = state["identities"]
        images = state.get("images", {}) if state.get("tier") == "b" else {}
        return cls(
            rundir=rundir, tier=state["tier"], url=state["apiserver"], ca_file=Path(state["ca"]),
            bindir=Path(state["bindir"]),
            kubeconfig={name: Path(i["kubeconfig"]) for name, i in identities.items()},
            users={name: i["user"] for name, i in identities.items()},
            tokens={name: i["token"] for name, i in identities.items()},
            images={name: i["ref"] for name, i in images.items()},
            image_tarballs={name: Path(i["tarball"]) for name, i in images.items()},
        )

    def _refresh(self, other: KubeCluster) -> None:
        for field in dataclasses.fields(self):
            if not field.name.startswith("_") and field.name not in ("kubeconfig", "users", "tokens"):
                setattr(self, field.name, getattr(other, field.name))
        self.kubeconfig.update(other.kubeconfig)
        self.users.update(other.users)
        self.tokens.update(other.tokens)

    # -- clients --------------------------------------------------------------------------------

    def env(self, as_: str = "admin") -> dict[str, str]:
        """os.environ with KUBECONFIG for ``as_`` (for kopf, kubectl or anything run as a subprocess)."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig[as_])}

    def kubectl(self, *args: str, as_: str = "admin", input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the built kubectl as identity ``as_``; text output; raises KubeError on failure
        unless ``check=False``."""
        argv = [str(self.bindir / "kubectl"), "--kubeconfig", str(self.kubeconfig[as_]),
                f"--cache-dir={self.rundir / 'kubectl-cache'}", *map(str, args)]
        result = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise KubeError(f"kubectl {' '.join(map(str, args))} (as {as_}) failed ({result.returncode}):\n"
                            f"{result.stderr.strip()}")
        return result

    def get(self, *args: str, as_: str = "admin", namespace: str | None = None) -> dict:
        """``kubectl get ARGS -o json``, parsed."""
        ns = ["-n", namespace] if namespace else []
        return json.loads(self.kubectl("get", *args, *ns, "-o", "json", as_=as_).stdout)

    def apply(self, manifest: str | dict | list, namespace: str | None = None, as_: str = "admin",
              server_side: bool = False) -> str:
        """``kubectl apply -f -`` of YAML text, an object or a list of objects."""
        if not isinstance(manifest, str):
            items = manifest if isinstance(manifest, list) else [manifest]
            manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
        args = ["apply", "-f", "-", *(["-n", namespace] if namespace else []),
                *(["--server-side"] if server_side else [])]
        return self.kubectl(*args, as_=as_, input=manifest).stdout

    def request(self, method: str, path: str, body: dict | None = None, as_: str = "admin",
                content_type: str = "application/json", timeout: float = 30) -> tuple[int, dict | str]:
        """A raw API request (TLS verified against ``ca_file``): (status, parsed JSON or text)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if as_ is not None:
            request.add_header("Authorization", f"Bearer {self.tokens[as_]}")
        if data is not None:
            request.add_header("Content-Type", content_type)
        context = ssl.create_default_context(cafile=str(self.ca_file))
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
                status, raw = response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read().decode()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw

    async def api_client(self, as_: str = "admin"):
        """A kubernetes_asyncio ApiClient for ``as_`` (``async with await c.api_client() as api:``)."""
        from kubernetes_asyncio import config

        return await config.new_client_from_config(config_file=str(self.kubeconfig[as_]))

    def serviceaccount_identity(self, namespace: str, name: str, create: bool = True) -> str:
        """A real ServiceAccount ``namespace/name`` (created if missing) as an identity for ``as_``:
        a 1-hour TokenRequest token in its own kubeconfig. Returns the identity key
        ``"system:serviceaccount:<namespace>:<name>"``."""
        identity = f"system:serviceaccount:{namespace}:{name}"
        if identity in self.kubeconfig:
            return identity
        if create and self.kubectl("get", "serviceaccount", name, "-n", namespace, check=False).returncode != 0:
            self.kubectl("create", "serviceaccount", name, "-n", namespace)
        token = self.kubectl("create", "token", name, "-n", namespace, "--duration=1h").stdout.strip()
        path = self.rundir / f"kubeconfig-sa-{namespace}-{name}"
        admin = json.loads(self.kubeconfig["admin"].read_text())
        admin["users"] = [{"name": identity, "user": {"token": token}}]
        admin["contexts"][0]["context"].update(user=identity, namespace=namespace)
        path.write_text(json.dumps(admin, indent=2))
        path.chmod(0o600)
        self.kubeconfig[identity], self.users[identity], self.tokens[identity] = path, identity, token
        return identity

    # -- namespaces -----------------------------------------------------------------------------

    def namespace(self, prefix: str = "t", labels: dict[str, str] | None = None) -> str:
        """Create a fresh namespace, deleted when the current test ends. On tier b this waits for
        its ``default`` ServiceAccount (pods need it)."""
        name = f"{prefix}-{secrets.token_hex(4)}"
        body = {"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "labels": {"cnbi-test": "true", **(labels or {})}}}
        self.kubectl("create", "-f", "-", input=json.dumps(body))
        self._namespaces.append(name)
        if self.tier == "b":
            self.wait_for(lambda: self.kubectl("get", "serviceaccount", "default", "-n", name,
                                               check=False).returncode == 0,
                          f"ServiceAccount default in {name}", timeout=30)
        return name

    def delete_test_namespaces(self) -> None:
        names, self._namespaces[:] = list(self._namespaces), []
        if names:
            self.kubectl("delete", "namespace", *names, "--wait=false", "--ignore-not-found", check=False)
            self.release_finalizers(names)

    def release_finalizers(self, namespaces: list[str]) -> None:
        """Drop the operator's finalizer from the CustomNBImages left in `namespaces`: its
        operator is gone by now, and without it they (and so the namespaces) would stay
        Terminating for the rest of the session, the namespace controller retrying them."""
        for namespace in namespaces:
            found = self.kubectl("get", "customnbimages.meteor.zone", "-n", namespace, "-o", "name", check=False)
            for name in found.stdout.split() if found.returncode == 0 else []:
                self.kubectl("patch", name, "-n", namespace, "--type=merge", "-p", '{"metadata":{"finalizers":null}}',
                             check=False)

    # -- waiting --------------------------------------------------------------------------------

    @staticmethod
    def wait_for(predicate, what: str, timeout: float = 60, interval: float = 0.2):
        """Poll ``predicate()`` until it returns something truthy (returned); KubeError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise KubeError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(interval)

    def wait_for_jsonpath(self, resource: str, jsonpath: str, until, namespace: str | None = None,
                          timeout: float = 60, as_: str = "admin") -> str:
        """Wait until ``kubectl get RESOURCE -o jsonpath=JSONPATH`` is one of ``until``; returns it.

        E.g. ``wait_for_jsonpath("pod/p", "{.status.phase}", {"Succeeded", "Failed"}, ns)``.
        """
        until = {until} if isinstance(until, str) else set(until)
        ns = ["-n", namespace] if namespace else []
        last = []

        def check():
            result = self.kubectl("get", resource, *ns, "-o", f"jsonpath={jsonpath}", as_=as_, check=False)
            last[:] = [result.stdout.strip() or result.stderr.strip()]
            return result.stdout.strip() if result.stdout.strip() in until else None

        try:
            return self.wait_for(check, f"{resource} {jsonpath} in {sorted(until)}", timeout=timeout)
        except KubeError as error:
            details = self.describe(resource, namespace)
            raise KubeError(f"{error}; last: {last[0] if last else None}\n{details}") from None

    def restart_apiserver(self, down_seconds: float = 3.0, timeout: float = 60) -> None:
        """Stop kube-apiserver (SIGTERM, as an upgrade or a crash does) and start it again with
        the same command line after `down_seconds`; etcd keeps every object. The harness's pid
        file names the new process, so scripts/kube-down stops it as before."""
        pidfile = self.rundir / "pids" / "apiserver.pid"
        pid = int(pidfile.read_text().split()[0])
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        # SIGTERM, as an upgrade does; its graceful shutdown can outlast a minute of open
        # watches, so after 10 s it goes as a crash does (SIGKILL)
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, timeout)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while _state(pid) not in ("Z", "X", None) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _state(pid) in ("Z", "X", None):
                break
        else:
            raise KubeError(f"kube-apiserver (pid {pid}) did not stop")
        time.sleep(down_seconds)
        with open(self.rundir / "log" / "apiserver.log", "ab") as log:
            proc = subprocess.Popen([a.decode() for a in argv], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=self.rundir, start_new_session=True)
        stat = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        pidfile.write_text(f"{proc.pid} {stat[19]}\n")

        def ready():
            try:
                return self.request("GET", "/readyz", timeout=5) == (200, "ok")
            except OSError:
                return False

        self.wait_for(ready, "kube-apiserver /readyz after its restart", timeout=timeout)

    def describe(self, resource: str, namespace: str | None = None) -> str:
        """``kubectl describe`` output, for failure messages."""
        ns = ["-n", namespace] if namespace else []
        result = self.kubectl("describe", resource, *ns, check=False)
        return result.stdout[-3000:] or result.stderr

    # -- tier b ---------------------------------------------------------------------------------

    def trust_registry(self, host: str, name: str | None = None) -> str:
        """Let the node's containerd pull from the plain-http registry at ``host`` (e.g.
        ``local_registry.host``); with ``name`` (e.g. "registry.cnbi.test:5000"), images named
        ``name/...`` are pulled from ``host``. Takes effect for the next pull; needs tier b.
        Returns the registry name images use. (containerd 1.6 also falls back to plain http for
        loopback addresses by itself; other names need this.)"""
        if self.tier != "b":
            raise KubeError("trust_registry needs the node (use kube_node)")
        _kube_up(self.rundir, "b", ["--registry", f"{name}={host}" if name else host])
        return name or host

    def install_tekton_crds(self) -> None:
        """Tekton's CRDs (tekton.dev/v1 PipelineRuns etc., no webhook) on tier a, where no Tekton
        controller runs: tests create PipelineRuns and patch their status themselves. Tier b
        has them already."""
        if self.tier != "b":
            _kube_up(self.rundir, "a", ["--tekton-crds"])

    def logs(self, pod: str, namespace: str, container: str | None = None) -> str:
        return self.kubectl("logs", pod, "-n", namespace, *(["-c", container] if container else [])).stdout


# -- starting and stopping ----------------------------------------------------------------------


def _node_prerequisite_problems() -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append(f"not root (uid {os.geteuid()}): the kubelet and containerd need root")
    for path, package in (("/usr/bin/containerd", "containerd"),
                          ("/usr/lib/cni/macvlan", "containernetworking-plugins"),
                          ("/bin/busybox", "busybox-static")):
        if not os.path.exists(path):
            problems.append(f"{path} is missing: apt-get install {package}")
    return problems


def _kube_up(rundir: Path, tier: str, extra: list[str] = ()) -> None:
    rundir.mkdir(parents=True, exist_ok=True)
    log = rundir / "kube-up.log"
    with open(log, "ab") as out:
        out.write(f"\n$ scripts/kube-up {rundir} --tier {tier} {' '.join(extra)}\n".encode())
        out.flush()
        try:
            result = subprocess.run([str(KUBE_UP), str(rundir), "--tier", tier, *extra], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=UP_TIMEOUT,
                                    check=False)
        except subprocess.TimeoutExpired:
            pytest.fail(f"scripts/kube-up {rundir} --tier {tier} took more than {UP_TIMEOUT}s; log: {log}",
                        pytrace=False)
    if result.returncode != 0:
        text = log.read_text(errors="replace").splitlines()
        pytest.fail(f"scripts/kube-up {rundir} --tier {tier} failed ({result.returncode}); {log} ends:\n"
                    + "\n".join(text[-40:]), pytrace=False)


class _KubeSession:
    def __init__(self, rundir: Path, keep: bool, reporter):
        self.rundir, self.keep, self.reporter = rundir, keep, reporter
        self.cluster: KubeCluster | None = None
        self.started = False

    def say(self, text: str) -> None:
        if self.reporter is not None:
            self.reporter.write_line(f"[kube] {text}")

    def ensure(self, tier: str) -> KubeCluster:
        if self.cluster is not None and (self.cluster.tier == "b" or tier == "a"):
            return self.cluster
        if tier == "b":
            problems = _node_prerequisite_problems()
            if problems:
                pytest.fail("kube_node: this machine cannot run the Kubernetes test node (tier b):\n  - "
                            + "\n  - ".join(problems)
                            + "\nRun as root after scripts/install-system-deps (these tests are not skipped "
                              "on purpose: a skipped end-to-end test must not count as passing).", pytrace=False)
        started = time.monotonic()
        self.say(f"starting tier {tier} in {self.rundir} (a first run builds the binaries: "
                 f"~8 min tier a, ~12 min tier b; log {self.rundir / 'kube-up.log'})")
        self.started = True
        _kube_up(self.rundir, tier)
        fresh = KubeCluster.from_rundir(self.rundir)
        if self.cluster is None:
            self.cluster = fresh
            _live_clusters.append(fresh)
        else:
            self.cluster._refresh(fresh)
        self.say(f"tier {tier} ready in {time.monotonic() - started:.1f}s: {self.cluster.url}")
        return self.cluster

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.delete_test_namespaces()
            if self.cluster in _live_clusters:
                _live_clusters.remove(self.cluster)
        if self.started and not self.keep:
            result = subprocess.run([str(KUBE_DOWN), str(self.rundir)], capture_output=True, text=True,
                                    timeout=300, check=False)
            if result.returncode != 0:
                self.say(f"kube-down {self.rundir} failed:\n{result.stdout}{result.stderr}")


@pytest.fixture(scope="session")
def _kube_session(request, tmp_path_factory):
    configured = os.environ.get("CNBI_KUBE_RUNDIR")
    rundir = Path(configured).resolve() if configured else tmp_path_factory.mktemp("kube")
    session = _KubeSession(rundir, keep=bool(configured),
                           reporter=request.config.pluginmanager.get_plugin("terminalreporter"))
    yield session
    session.close()


@pytest.fixture(scope="session")
def kube_cluster(_kube_session) -> KubeCluster:
    """etcd + kube-apiserver (tier a); see the module docstring."""
    return _kube_session.ensure("a")


@pytest.fixture(scope="session")
def kube_node(_kube_session) -> KubeCluster:
    """The full node + Tekton (tier b); see the module docstring."""
    return _kube_session.ensure("b")


@pytest.fixture(autouse=True)
def _kube_test_namespaces():
    """Deletes the namespaces a test created with ``namespace()`` when it ends."""
    yield
    for cluster in _live_clusters:
        cluster.delete_test_namespaces()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if KUBE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.kube)


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None

