"""A real single-node Kubernetes (+ Tekton) for cnbi_hub's tests, run from binaries built here.

Used by ``scripts/kube-up`` / ``scripts/kube-down`` and by the pytest plugin ``tests/infra_kube.py``:

    scripts/kube-up RUNDIR [--tier a|b] [--registry [NAME=]HOST:PORT]... [--tekton-crds] [--bindir DIR]
    scripts/kube-down RUNDIR

Tier ``a``: etcd + kube-apiserver (RBAC, static bearer tokens). Tier ``b`` adds containerd (the
Debian package, with a private root/state/socket under RUNDIR), images imported from local files
(pause, busybox, Tekton's helpers: nothing is pulled from the internet), kube-scheduler,
kube-controller-manager, a kubelet (node "localhost"), an isolated pod network and the Tekton
Pipelines controller with its CRDs. Binaries come from ``scripts/kube-build`` (pinned versions,
cached outside the repository).

Everything listens on 127.0.0.1 on random ports (except knative's profiling server in the Tekton
controller: a random port on all addresses, see ``_start_tekton``), so several clusters can run
side by side; non-hostNetwork pods get an address in 198.51.100.0/24 on a veth that leads nowhere, with no
route out; the service CIDR 198.18.0.0/24 is blackholed (no kube-proxy runs).

RUNDIR layout: ``state.json`` (ports, identities, tokens, images, timings), ``kubeconfig``
(admin) and ``kubeconfig-<identity>``, ``pids/<name>.pid`` ("PID STARTTIME": kube-down stops
exactly the processes recorded there), ``log/<name>.log``, plus the components' data dirs.
Both commands are idempotent: kube-up on a running cluster only checks it (and adds a node to a
tier-a cluster when asked for tier b); kube-down on a stopped one only cleans up leftovers.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KUBE_BUILD = HERE / "kube-build"

SERVICE_CIDR = "198.18.0.0/24"  # RFC 2544 benchmark range; blackholed, never routed
POD_SUBNET = "198.51.100.0/24"  # RFC 5737 TEST-NET-2; pods reach each other only
NODE_NAME = "localhost"  # the apiserver dials the kubelet by this name -> 127.0.0.1

# identity -> (user name, groups); RBAC subjects for the two ServiceAccount-like users are
# {kind: ServiceAccount, namespace: cnbi, name: cnbi-service|cnbi-operator}.
IDENTITIES = {
    "admin": ("cnbi-test-admin", ["system:masters"]),
    "cnbi-service": ("system:serviceaccount:cnbi:cnbi-service",
                     ["system:serviceaccounts", "system:serviceaccounts:cnbi", "system:authenticated"]),
    "cnbi-operator": ("system:serviceaccount:cnbi:cnbi-operator",
                      ["system:serviceaccounts", "system:serviceaccounts:cnbi", "system:authenticated"]),
}

IMAGES = {  # name -> reference; non-"latest" tags so the pull policy is IfNotPresent
    "pause": "localhost/pause:v1",
    "busybox": "localhost/busybox:v1",
    "tekton-tools": "localhost/tekton-tools:v1",
}

REGISTRY_HOST = re.compile(r"[A-Za-z0-9.\-]+(:\d+)?")
CONTROL_PLANE = ("etcd", "apiserver")
NODE = ("containerd", "scheduler", "kcm", "kubelet", "tekton-controller")
# wiped by a fresh start (log/ and the cached image tarballs in images/ are kept)
DATA_DIRS = ("etcd-data", "certs", "pki", "containerd", "cni", "kubelet", "pids", "kubectl-cache")

BUILD_TIMEOUT = float(os.environ.get("CNBI_KUBE_BUILD_TIMEOUT", "2700"))
START_TIMEOUT = float(os.environ.get("CNBI_KUBE_START_TIMEOUT", "120"))


class HarnessError(RuntimeError):
    """The cluster could not be started (the message says why and where the logs are)."""


# -- small helpers ------------------------------------------------------------------------------


class Clock:
    def __init__(self, say):
        self.t0 = time.monotonic()
        self.marks: dict[str, float] = {}
        self.say = say

    def mark(self, what: str, since: float | None = None) -> None:
        now = time.monotonic()
        self.marks[what] = round(now - self.t0, 2)
        extra = f" (+{now - since:.1f}s)" if since is not None else ""
        self.say(f"{what}: {now - self.t0:.1f}s{extra}")


def free_ports(count: int) -> list[int]:
    """Distinct currently free TCP ports on 127.0.0.1 (the kernel's ephemeral range)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_low_port(exclude: set[int]) -> int:
    """A free port below 32768 (knative parses METRICS_PROMETHEUS_PORT as an int16)."""
    for _ in range(200):
        port = secrets.randbelow(32767 - 20000) + 20000
        if port in exclude:
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        return port
    raise HarnessError("no free port found in 20000-32767")


def proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat fields after the command name (index 0 = state, 19 = start time)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


def run(argv, *, timeout=120, check=True, input=None, env=None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                            input=input, env=env, check=False)
    if check and result.returncode != 0:
        raise HarnessError(f"{' '.join(map(str, argv))} failed ({result.returncode}):\n"
                           f"{result.stderr.strip() or result.stdout.strip()}")
    return result


def http_get(url: str, token: str | None = None, timeout: float = 2.0) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    context = ssl._create_unverified_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


# -- docker-archive images from local files -----------------------------------------------------


def docker_archive(out: Path, ref: str, files: dict[str, str | Path], links: dict[str, str] = (),
                   entrypoint: list[str] | None = None) -> str:
    """Write a one-layer docker-archive tarball (``ctr images import``, ``skopeo copy
    docker-archive:``) holding ``files`` {dest path: host file} and symlinks {dest: target}.

    Timestamps and owners are fixed, so the same inputs give the same image digest. Returns the
    image config digest (the image ID).
    """
    mtime = 1767225600  # 2026-01-01T00:00:00Z
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        made: set[str] = set()

        def add_dir(path: str, mode: int = 0o755) -> None:
            if path in made or not path:
                return
            made.add(path)
            info = tarfile.TarInfo(path)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, mtime
            tar.addfile(info)

        def parents(path: str) -> None:
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                add_dir("/".join(parts[:i]))

        add_dir("tmp", 0o1777)
        for dest, src in sorted(files.items()):
            dest = dest.strip("/")
            parents(dest)
            info = tarfile.TarInfo(dest)
            data = Path(src).read_bytes()
            info.size, info.mode, info.mtime = len(data), 0o755, mtime
            tar.addfile(info, io.BytesIO(data))
        for dest, target in sorted(dict(links).items()):
            dest = dest.strip("/")
            if dest in files:
                continue
            parents(dest)
            info = tarfile.TarInfo(dest)
            info.type, info.linkname, info.mode, info.mtime = tarfile.SYMTYPE, target, 0o777, mtime
            tar.addfile(info)
    layer_bytes = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = {
        "architecture": "amd64", "os": "linux", "created": "2026-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   **({"Entrypoint": entrypoint} if entrypoint else {})},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "2026-01-01T00:00:00Z", "created_by": "cnbi_hub scripts/kube_harness.py"}],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_digest = hashlib.sha256(config_bytes).hexdigest()
    manifest = [{"Config": f"{config_digest}.json", "RepoTags": [ref], "Layers": ["layer.tar"]}]
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tar:
        for name, data in (("layer.tar", layer_bytes), (f"{config_digest}.json", config_bytes),
                           ("manifest.json", json.dumps(manifest).encode())):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            tar.addfile(info, io.BytesIO(data))
    tmp.rename(out)
    return "sha256:" + config_digest


def busybox_links(prefix: str = "") -> dict[str, str]:
    """Every applet of the static busybox as a symlink to /bin/busybox."""
    out = run(["/bin/busybox", "--list-full"]).stdout.split()
    return {f"{prefix}{path}": "/bin/busybox" for path in out if path != "bin/busybox"}


def build_images(rundir: Path, bindir: Path, with_tekton: bool) -> dict[str, dict]:
    """The local images as docker-archive tarballs in RUNDIR/images (reused while inputs match)."""
    images_dir = rundir / "images"
    images_dir.mkdir(exist_ok=True)
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        raise HarnessError("/bin/busybox is missing: apt-get install busybox-static (scripts/install-system-deps)")
    specs = {
        "pause": ({"/pause": bindir / "pause"}, {}, ["/pause"]),
        "busybox": ({"/bin/busybox": busybox}, busybox_links(), None),
    }
    if with_tekton:
        tools = {f"/ko-app/{n}": bindir / "tekton" / n
                 for n in ("entrypoint", "nop", "workingdirinit", "sidecarlogresults")}
        specs["tekton-tools"] = ({**tools, "/bin/busybox": busybox}, busybox_links(), ["/ko-app/nop"])
    result = {}
    for name, (files, links, entrypoint) in specs.items():
        tarball = images_dir / f"{name}.tar"
        stamp = images_dir / f"{name}.stamp"
        key = json.dumps({str(k): [str(v), os.stat(v).st_size, os.stat(v).st_mtime_ns]
                          for k, v in files.items()} | {"ref": IMAGES[name], "v": 2}, sort_keys=True)
        if tarball.exists() and stamp.exists() and json.loads(stamp.read_text())["key"] == key:
            image_id = json.loads(stamp.read_text())["id"]
        else:
            image_id = docker_archive(tarball, IMAGES[name], files, links, entrypoint)
            stamp.write_text(json.dumps({"key": key, "id": image_id}))
        result[name] = {"ref": IMAGES[name], "tarball": str(tarball), "id": image_id}
    return result


# -- the run directory --------------------------------------------------------------------------


class RunDir:
    def __init__(self, path: str | Path, say=print):
        self.path = Path(path).resolve()
        self.say = say
        self.procs: dict[str, subprocess.Popen] = {}

    # state
    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    def load(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def save(self, state: dict) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
        tmp.rename(self.state_file)

    @contextlib.contextmanager
    def locked(self):
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    # processes
    def pidfile(self, name: str) -> Path:
        return self.path / "pids" / f"{name}.pid"

    def record(self, name: str) -> tuple[int, str] | None:
        try:
            pid, start = self.pidfile(name).read_text().split()
            return int(pid), start
        except (OSError, ValueError):
            return None

    def alive(self, name: str) -> bool:
        rec = self.record(name)
        if not rec:
            return False
        stat = proc_stat(rec[0])
        return bool(stat) and stat[19] == rec[1] and stat[0] not in "ZX"

    def start(self, name: str, argv: list, env: dict | None = None) -> subprocess.Popen:
        (self.path / "log").mkdir(exist_ok=True)
        (self.path / "pids").mkdir(exist_ok=True)
        with open(self.path / "log" / f"{name}.log", "ab") as log:
            proc = subprocess.Popen([str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=self.path, start_new_session=True,
                                    env={**os.environ, **(env or {})})
        stat = proc_stat(proc.pid)
        self.pidfile(name).write_text(f"{proc.pid} {stat[19] if stat else '?'}\n")
        self.procs[name] = proc
        return proc

    def stop(self, name: str, timeout: float = 15) -> None:
        """SIGTERM (then SIGKILL) the recorded process, if it is still the one we started."""
        if self.alive(name):
            pid = self.record(name)[0]
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.alive(name) and time.monotonic() < deadline:
                self._reap(pid)
                time.sleep(0.05)
            if self.alive(name):
                self.say(f"{name} (pid {pid}) ignored SIGTERM for {timeout:.0f}s: SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                for _ in range(100):
                    self._reap(pid)
                    if not self.alive(name):
                        break
                    time.sleep(0.05)
        self.pidfile(name).unlink(missing_ok=True)

    @staticmethod
    def _reap(pid: int) -> None:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)

    def wait_for(self, what: str, check, timeout: float = START_TIMEOUT, watch: tuple[str, ...] = ()) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while True:
            for name in watch:
                proc = self.procs.get(name)
                if proc is not None and proc.poll() is not None:
                    raise HarnessError(f"{name} exited with {proc.returncode} while waiting for {what}; "
                                       f"{self.path}/log/{name}.log ends:\n{tail(self.path / 'log' / f'{name}.log')}")
            try:
                if check():
                    return
            except Exception as error:  # noqa: BLE001 - retried until the deadline
                last = error
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- log/{n}.log:\n{tail(self.path / 'log' / f'{n}.log', 15)}" for n in watch)
                raise HarnessError(f"timed out after {timeout:.0f}s waiting for {what}"
                                   f"{f' (last error: {last})' if last else ''}\n{logs}")
            time.sleep(0.1)


# -- kube-up ------------------------------------------------------------------------------------


def build_binaries(tier: str, say) -> Path:
    say(f"binaries: scripts/kube-build {tier} (cached after the first build; cold ~8 min tier a, ~12 min tier b)")
    try:
        proc = subprocess.run([str(KUBE_BUILD), tier], stdout=subprocess.PIPE, stderr=None, text=True,
                              timeout=BUILD_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as error:
        raise HarnessError(f"scripts/kube-build {tier} did not finish within {BUILD_TIMEOUT:.0f}s") from error
    if proc.returncode != 0:
        raise HarnessError(f"scripts/kube-build {tier} failed ({proc.returncode}); see its output above")
    return Path(proc.stdout.strip().splitlines()[-1])


def check_node_prerequisites() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append(f"tier b runs a kubelet and containerd and needs root (running as uid {os.geteuid()})")
    for tool, package in (("containerd", "containerd"), ("ctr", "containerd"), ("runc", "runc"),
                          ("ip", "iproute2")):
        if not shutil.which(tool):
            problems.append(f"`{tool}` is missing: apt-get install {package}")
    for plugin in ("macvlan", "host-local"):
        if not Path(f"/usr/lib/cni/{plugin}").exists():
            problems.append(f"/usr/lib/cni/{plugin} is missing: apt-get install containernetworking-plugins")
    if not Path("/bin/busybox").exists():
        problems.append("/bin/busybox is missing: apt-get install busybox-static")
    if problems:
        raise HarnessError("this machine cannot run the kube test node (tier b):\n  - " + "\n  - ".join(problems)
                           + "\n(scripts/install-system-deps installs the Debian packages, as root)")


def kubeconfig_text(server: str, ca: Path, user: str, token: str) -> str:
    config = {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": "cnbi-test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "cnbi-test", "context": {"cluster": "cnbi-test", "user": user, "namespace": "default"}}],
        "current-context": "cnbi-test",
    }
    return json.dumps(config, indent=2) + "\n"  # JSON is YAML


def parse_registry(spec: str) -> tuple[str, str]:
    """"HOST:PORT" or "NAME=HOST:PORT" -> (name images use, address containerd connects to)."""
    name, _, address = spec.rpartition("=")
    name = name or address
    if not (REGISTRY_HOST.fullmatch(name) and REGISTRY_HOST.fullmatch(address)):
        raise HarnessError(f"not a registry HOST:PORT or NAME=HOST:PORT: {spec!r}")
    return name, address


def write_registry_hosts(rundir: Path, spec: str) -> Path:
    """Let containerd pull images named ``NAME/...`` from the plain-http registry at HOST:PORT
    (``spec`` is "HOST:PORT" or "NAME=HOST:PORT"). containerd reads certs.d at each pull."""
    name, address = parse_registry(spec)
    directory = rundir / "containerd" / "certs.d" / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hosts.toml").write_text(
        f'server = "http://{address}"\n\n[host."http://{address}"]\n'
        f'  capabilities = ["pull", "resolve", "push"]\n  skip_verify = true\n')
    return directory / "hosts.toml"


def containerd_config(rundir: Path) -> str:
    c = rundir / "containerd"
    # version 2 config: only what differs from containerd's defaults (merged by containerd)
    return f"""version = 2
root = "{c}/root"
state = "{c}/state"
oom_score = 0

[grpc]
  address = "{c}/containerd.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{c}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{IMAGES['pause']}"
  # this VM drops CAP_SYS_RESOURCE: runc must not raise oom_score_adj
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{c}/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{rundir}/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{c}/certs.d"
"""


def veth_name(rundir: Path) -> str:
    return "cnbk" + hashlib.sha256(str(rundir).encode()).hexdigest()[:8]  # + "a"/"b": 13 chars


class Cluster:
    """Starts the components into a RunDir (the state lives in RUNDIR/state.json)."""

    def __init__(self, rd: RunDir, bindir: Path, state: dict, clock: Clock):
        self.rd, self.bindir, self.state, self.clock = rd, bindir, state, clock
        self.say = rd.say
        self.path = rd.path

    @property
    def kubeconfig(self) -> Path:
        return self.path / "kubeconfig"

    def kubectl(self, *args, timeout=120, check=True, input=None):
        return run([self.bindir / "kubectl", "--kubeconfig", self.kubeconfig,
                    f"--cache-dir={self.path / 'kubectl-cache'}", *args], timeout=timeout, check=check, input=input)

    def admin_get(self, path: str) -> tuple[int, str]:
        return http_get(self.state["apiserver"] + path, self.state["identities"]["admin"]["token"])

    # ---- control plane
    def start_control_plane(self) -> None:
        p = self.path
        for d in ("etcd-data", "certs", "pki", "log", "pids"):
            (p / d).mkdir(parents=True, exist_ok=True)
        etcd_port, peer_port, api_port = free_ports(3)
        self.state["ports"] = {"etcd": etcd_port, "etcd-peer": peer_port, "apiserver": api_port}
        self.state["apiserver"] = f"https://127.0.0.1:{api_port}"
        self.rd.start("etcd", [
            self.bindir / "etcd", "--name", "default", "--data-dir", p / "etcd-data",
            "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"default=http://127.0.0.1:{peer_port}",
            "--unsafe-no-fsync", "--log-level", "warn"])
        t = time.monotonic()
        # while etcd starts: a ServiceAccount signing key (TokenRequest works), static bearer tokens
        run(["openssl", "genrsa", "-out", p / "pki/sa.key", "2048"])
        run(["openssl", "rsa", "-in", p / "pki/sa.key", "-pubout", "-out", p / "pki/sa.pub"])
        identities = {}
        lines = []
        for name, (user, groups) in IDENTITIES.items():
            token = f"{name}-{secrets.token_hex(16)}"
            identities[name] = {"user": user, "groups": groups, "token": token,
                                "kubeconfig": str(p / ("kubeconfig" if name == "admin" else f"kubeconfig-{name}"))}
            lines.append(f'{token},{user},{name}-uid,"{",".join(groups)}"')
        (p / "pki/tokens.csv").write_text("\n".join(lines) + "\n")
        os.chmod(p / "pki/tokens.csv", 0o600)
        self.state["identities"] = identities

        self.rd.wait_for("etcd /health", lambda: http_get(f"http://127.0.0.1:{etcd_port}/health")[0] == 200,
                         watch=("etcd",))
        self.clock.mark("etcd ready", t)
        if os.geteuid() == 0:  # pods would get KUBERNETES_SERVICE_HOST=198.18.0.1: keep it on this machine
            run(["ip", "route", "replace", "blackhole", SERVICE_CIDR], check=False)
        self.rd.start("apiserver", [
            self.bindir / "kube-apiserver", f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1", f"--secure-port={api_port}", "--advertise-address=127.0.0.1",
            f"--cert-dir={p / 'certs'}",
            f"--service-account-key-file={p / 'pki/sa.pub'}",
            f"--service-account-signing-key-file={p / 'pki/sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--token-auth-file={p / 'pki/tokens.csv'}", "--authorization-mode=RBAC",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--endpoint-reconciler-type=none",  # a loopback Endpoint for `kubernetes` is invalid
            "--allow-privileged=true", "--kubelet-preferred-address-types=Hostname",
            "--profiling=false"])
        t = time.monotonic()
        self.rd.wait_for("kube-apiserver /readyz", lambda: self.admin_get("/readyz") == (200, "ok"),
                         watch=("etcd", "apiserver"))
        self.clock.mark("kube-apiserver ready", t)
        ca = p / "certs" / "apiserver.crt"
        for ident in identities.values():
            Path(ident["kubeconfig"]).write_text(
                kubeconfig_text(self.state["apiserver"], ca, ident["user"], ident["token"]))
            os.chmod(ident["kubeconfig"], 0o600)
        self.state["ca"] = str(ca)

    def control_plane_healthy(self) -> bool:
        if not all(self.rd.alive(n) for n in CONTROL_PLANE) or "apiserver" not in self.state:
            return False
        try:
            return self.admin_get("/readyz") == (200, "ok")
        except OSError:
            return False

    # ---- Tekton manifests
    def tekton_config_dir(self) -> Path:
        config = self.bindir / "tekton" / "config"
        if config.is_dir():
            return config
        # tier-a binaries: the pinned Tekton module's own config/ (a download, no build)
        work = Path(self.path / "tekton-module")
        work.mkdir(exist_ok=True)
        shutil.copy(REPO / "tools/kube/tekton.go.mod", work / "go.mod")
        shutil.copy(REPO / "tools/kube/tekton.go.sum", work / "go.sum")
        env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=readonly",
               "PATH": f"/usr/local/go/bin:{os.environ.get('PATH', '')}"}
        out = subprocess.run(["go", "mod", "download", "-json", "github.com/tektoncd/pipeline"], cwd=work,
                             capture_output=True, text=True, env=env, timeout=600, check=False)
        if out.returncode != 0:
            raise HarnessError(f"go mod download github.com/tektoncd/pipeline failed:\n{out.stderr}")
        return Path(json.loads(out.stdout)["Dir"]) / "config"

    def install_tekton_manifests(self, with_config: bool) -> None:
        """Tekton's CRDs (conversion webhooks -> None: v1 only, no webhook runs) and, for the
        controller, its namespace, RBAC and ConfigMaps; server-side apply (CRDs are too big)."""
        import yaml

        src = self.tekton_config_dir()
        files = sorted([*src.glob("100-namespace/*.yaml"), *src.glob("20[01]-*.yaml"),
                        *src.glob("config-*.yaml"), *src.glob("300-crds/*.yaml")])
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 0.1 s instead of 1 s
        docs = [d for f in files for d in yaml.load_all(f.read_text(), Loader=loader) if d]
        crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
        for crd in crds:
            crd["spec"]["conversion"] = {"strategy": "None"}

        def as_list(items):
            return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})

        (self.path / "tekton-crds.json").write_text(as_list(crds))
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", self.path / "tekton-crds.json")
        self.kubectl("wait", "--for=condition=Established", "crd", "-l",
                     "app.kubernetes.io/part-of=tekton-pipelines", "--timeout=60s", timeout=90)
        if with_config:
            (self.path / "tekton-config.json").write_text(
                as_list([d for d in docs if d["kind"] != "CustomResourceDefinition"]))
            self.kubectl("apply", "--server-side", "--force-conflicts", "-f", self.path / "tekton-config.json")
        self.state["tekton_crds"] = True

    # ---- node
    def start_node(self) -> None:
        check_node_prerequisites()
        p, st = self.path, self.state
        for d in ("containerd", "cni/net.d", "cni/ipam", "kubelet/root", "kubelet/pki", "kubelet/pod-logs",
                  "kubelet/volume-plugins"):
            (p / d).mkdir(parents=True, exist_ok=True)
        sched_port, kcm_port, kubelet_port, healthz_port, probes_port, profiling_port = free_ports(6)
        metrics_port = free_low_port({sched_port, kcm_port, kubelet_port, healthz_port, probes_port, profiling_port})
        st["ports"].update(scheduler=sched_port, kcm=kcm_port, kubelet=kubelet_port, kubelet_healthz=healthz_port,
                           tekton_probes=probes_port, tekton_profiling=profiling_port, tekton_metrics=metrics_port)
        errors: list[BaseException] = []

        def in_thread(fn):
            def body():
                try:
                    fn()
                except BaseException as error:  # noqa: BLE001 - re-raised by the main thread
                    errors.append(error)
            thread = threading.Thread(target=body, daemon=True)
            thread.start()
            return thread

        t_node = time.monotonic()
        # pod network: macvlan on one end of a veth pair that goes nowhere
        veth = veth_name(p)
        if run(["ip", "link", "show", f"{veth}a"], check=False).returncode != 0:
            run(["ip", "link", "add", f"{veth}a", "type", "veth", "peer", "name", f"{veth}b"])
            run(["ip", "link", "set", f"{veth}a", "alias", f"cnbi kube test node {p}"], check=False)
        run(["ip", "link", "set", f"{veth}b", "up"])
        run(["ip", "link", "set", f"{veth}a", "up"])
        st["veth"] = f"{veth}a"
        (p / "cni/net.d/10-cnbi-isolated.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "cnbi-isolated",
            "plugins": [{"type": "macvlan", "master": f"{veth}a", "mode": "bridge",
                         "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET}]],
                                  "dataDir": str(p / "cni/ipam")}}]}, indent=1))
        (p / "containerd/config.toml").write_text(containerd_config(p))
        sock = p / "containerd" / "containerd.sock"
        st["containerd_socket"] = str(sock)
        ctr = ["ctr", "-a", sock, "-n", "k8s.io"]

        images: dict = {}

        def containerd_and_images():
            self.rd.start("containerd", ["containerd", "--config", p / "containerd/config.toml"])
            built = build_images(p, self.bindir, with_tekton=True)
            self.rd.wait_for("containerd", lambda: run([*ctr, "version"], check=False, timeout=5).returncode == 0,
                             watch=("containerd",))
            self.clock.mark("containerd ready")
            # the kubelet can start now; importing runs alongside
            kubelet_ok.set()
            for image in built.values():
                run([*ctr, "images", "import", image["tarball"]], timeout=300)
            images.update(built)
            self.clock.mark("images imported")

        kubelet_ok = threading.Event()
        kc = self.kubeconfig
        def tekton():
            self.install_tekton_manifests(True)
            self.clock.mark("tekton manifests applied")
            self._start_tekton()  # it needs its ConfigMaps, not the node

        threads = [in_thread(containerd_and_images), in_thread(tekton)]
        self.rd.start("scheduler", [
            self.bindir / "kube-scheduler", f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}", "--bind-address=127.0.0.1", f"--secure-port={sched_port}",
            "--leader-elect=false"])
        self.rd.start("kcm", [
            self.bindir / "kube-controller-manager", f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}", "--bind-address=127.0.0.1", f"--secure-port={kcm_port}",
            "--leader-elect=false", "--controllers=*",
            f"--service-account-private-key-file={p / 'pki/sa.key'}", f"--root-ca-file={st['ca']}",
            "--use-service-account-credentials=false"])
        (p / "kubelet/config.yaml").write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": "127.0.0.1", "port": kubelet_port, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": healthz_port,
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs", "cgroupsPerQOS": False, "enforceNodeAllocatable": [],
            "failCgroupV1": False, "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{sock}",
            "clusterDomain": "cluster.local", "evictionHard": {},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            # the same image (same ID) imported as localhost/busybox:v1 and later pulled from a
            # registry under another name would otherwise count as "not preloaded" and be re-pulled
            # (KubeletEnsureSecretPulledImages) from localhost:80 -> ErrImagePull
            "imagePullCredentialsVerificationPolicy": "NeverVerify",
            "podLogsDir": str(p / "kubelet/pod-logs"),
            "volumePluginDir": str(p / "kubelet/volume-plugins"),
        }, indent=1))
        while not kubelet_ok.wait(0.1):
            if errors:
                raise errors[0]
        self.rd.start("kubelet", [
            self.bindir / "kubelet", f"--config={p / 'kubelet/config.yaml'}", f"--kubeconfig={kc}",
            f"--hostname-override={NODE_NAME}", f"--root-dir={p / 'kubelet/root'}",
            f"--cert-dir={p / 'kubelet/pki'}"])
        t = time.monotonic()
        watch = ("containerd", "scheduler", "kcm", "kubelet", "apiserver", "etcd")

        def node_ready():
            status, body = self.admin_get(f"/api/v1/nodes/{NODE_NAME}")
            conditions = json.loads(body).get("status", {}).get("conditions", []) if status == 200 else []
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

        self.rd.wait_for("node localhost Ready", node_ready, watch=watch)
        self.rd.wait_for("ServiceAccount default/default",
                         lambda: self.admin_get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200,
                         watch=watch)
        self.clock.mark("node Ready", t)
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)
                if errors:
                    raise errors[0]
        if errors:
            raise errors[0]
        st["images"] = images
        url = f"http://127.0.0.1:{st['ports']['tekton_probes']}/readiness"
        self.rd.wait_for("tekton controller /readiness", lambda: http_get(url)[0] == 200,
                         watch=("tekton-controller",))
        self.clock.mark("tekton controller ready")
        st["tier"] = "b"
        self.clock.mark("node + tekton total", t_node)

    def _start_tekton(self) -> None:
        """Start the Tekton controller as the admin user. Its probes listen on 127.0.0.1:<random>
        (scripts/kube-build patches that, and switches off knative's copy on a fixed *:8080); the
        Prometheus metrics port is random too, bound to 127.0.0.1; knative's profiling server only
        takes a port (random; it listens on all addresses but profiling is off: it answers 404)."""
        ports = self.state["ports"]
        img = IMAGES["tekton-tools"]
        env = {
            "SYSTEM_NAMESPACE": "tekton-pipelines", "KUBERNETES_MIN_VERSION": "v1.28.0",
            "CONFIG_DEFAULTS_NAME": "config-defaults", "CONFIG_LOGGING_NAME": "config-logging",
            "CONFIG_OBSERVABILITY_NAME": "config-observability", "CONFIG_FEATURE_FLAGS_NAME": "feature-flags",
            "CONFIG_LEADERELECTION_NAME": "config-leader-election-controller", "CONFIG_SPIRE": "config-spire",
            "METRICS_DOMAIN": "tekton.dev/pipeline",
            "PROBES_PORT": str(ports["tekton_probes"]), "PROFILING_PORT": str(ports["tekton_profiling"]),
            "METRICS_PROMETHEUS_PORT": str(ports["tekton_metrics"]), "METRICS_PROMETHEUS_HOST": "127.0.0.1",
        }
        self.rd.start("tekton-controller", [
            self.bindir / "tekton/controller", f"-kubeconfig={self.kubeconfig}", "-disable-ha",
            f"-entrypoint-image={img}", f"-nop-image={img}", f"-sidecarlogresults-image={img}",
            f"-workingdirinit-image={img}", f"-shell-image={img}", f"-shell-image-win={img}"], env=env)


def up(rundir: str | Path, tier: str = "a", registries: list[str] = (), bindir: str | Path | None = None,
       tekton_crds: bool = False, say=print, keep_on_failure: bool = False) -> dict:
    """Start (or check) the cluster in ``rundir``; returns the state dict (also in state.json).

    If starting fails, whatever this call started is stopped again (unless ``keep_on_failure``);
    a cluster that was already running is left alone."""
    rd = RunDir(rundir, say)
    with rd.locked():
        try:
            return _up(rd, tier, registries, bindir, tekton_crds, say)
        except BaseException:
            if rd.procs and not keep_on_failure:
                say("start failed: stopping it again (logs stay in RUNDIR/log; --keep-on-failure keeps it running)")
                _down(rd, say)
            raise


def _up(rd: RunDir, tier, registries, bindir, tekton_crds, say) -> dict:
    clock = Clock(say)
    for spec in registries:
        parse_registry(spec)
    state = rd.load()
    known = state.get("registries") or {}
    registries = {**(known if isinstance(known, dict) else {}), **dict(parse_registry(r) for r in registries)}
    needed = NODE if tier == "b" else ()
    if tier == "b":
        check_node_prerequisites()
    running = Cluster(rd, Path(state.get("bindir", "/nonexistent")), state, clock).control_plane_healthy()
    if bindir:
        bindir = Path(bindir)
    elif running and Path(state["bindir"], "kubelet" if tier == "b" else "kubectl").exists():
        bindir = Path(state["bindir"])
    else:  # scripts/kube-build answers at once when its cache holds the binaries
        bindir = build_binaries(tier, say)
        clock.mark("binaries ready")
    cluster = Cluster(rd, bindir, state, clock)
    if running:
        if all(rd.alive(n) for n in needed):
            say(f"already running (tier {state.get('tier')}): {state['apiserver']}")
        elif not any(rd.alive(n) for n in NODE):
            say(f"control plane running; adding the node (tier b) to {state['apiserver']}")
            state["bindir"] = str(bindir)
            cluster.start_node()
        else:
            say("the node is partly down: restarting the whole cluster")
            _down(rd, say)
            state = _fresh(rd, cluster, bindir, tier)
    else:
        if state:
            say("not (fully) running: cleaning up, then starting fresh")
        _down(rd, say)
        state = _fresh(rd, cluster, bindir, tier)
    state["registries"] = registries
    if state.get("tier") == "b":
        for name, address in registries.items():
            write_registry_hosts(rd.path, f"{name}={address}")
    if tekton_crds and not state.get("tekton_crds"):
        cluster.install_tekton_manifests(with_config=False)
        clock.mark("tekton CRDs installed")
    clock.mark("ready")
    state.setdefault("timings", {}).setdefault("runs", []).append({"tier": tier, **clock.marks})
    state["timings"]["runs"] = state["timings"]["runs"][-10:]
    rd.save(state)
    return state


def _fresh(rd: RunDir, cluster: Cluster, bindir: Path, tier: str) -> dict:
    for d in DATA_DIRS:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(rd.path / d)
    for f in rd.path.glob("kubeconfig*"):
        f.unlink()
    logs = rd.path / "log"
    if logs.is_dir():
        shutil.rmtree(rd.path / "log.previous", ignore_errors=True)
        logs.rename(rd.path / "log.previous")
    state = {"rundir": str(rd.path), "bindir": str(bindir), "tier": "a", "created": time.time()}
    cluster.state = state
    rd.save(state)  # from here on, kube-down knows what to clean
    cluster.start_control_plane()
    rd.save(state)
    if tier == "b":
        cluster.start_node()
    return state


# -- kube-down ----------------------------------------------------------------------------------


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path) + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mount_point = line.split()[4].encode().decode("unicode_escape")  # \040 etc.
            if mount_point.startswith(prefix):
                found.append(mount_point)
    return sorted(set(found), key=lambda m: m.count("/"), reverse=True)


def _processes_with_arg(arg: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if arg.encode() in argv:
            pids.append(int(entry.name))
    return pids


def _down(rd: RunDir, say) -> None:
    state = rd.load()
    bindir = Path(state["bindir"]) if state.get("bindir") else None
    for name in ("tekton-controller", "kcm", "scheduler"):
        rd.stop(name)
    if bindir and rd.alive("kubelet") and rd.alive("apiserver"):
        # let the kubelet tear pods down (volumes, sandboxes, netns) while it still runs
        kubectl = [bindir / "kubectl", "--kubeconfig", rd.path / "kubeconfig",
                   f"--cache-dir={rd.path / 'kubectl-cache'}"]
        result = run([*kubectl, "delete", "pods", "--all", "--all-namespaces", "--grace-period=1",
                      "--wait=true", "--timeout=60s"], check=False, timeout=90)
        if result.returncode != 0:
            say(f"deleting pods: {result.stderr.strip()}")
    rd.stop("kubelet")
    sock = state.get("containerd_socket") or str(rd.path / "containerd" / "containerd.sock")
    container_ids: set[str] = set()
    if rd.alive("containerd"):
        ctr = ["ctr", "-a", sock, "-n", "k8s.io"]
        ids = run([*ctr, "containers", "ls", "-q"], check=False, timeout=30).stdout.split()
        container_ids.update(ids)
        for cid in ids:
            run([*ctr, "tasks", "kill", "-s", "SIGKILL", cid], check=False, timeout=30)
        for cid in ids:
            run([*ctr, "tasks", "rm", "-f", cid], check=False, timeout=30)
            run([*ctr, "containers", "rm", cid], check=False, timeout=30)
    rd.stop("containerd")
    # shims of this containerd (their -address is our socket), if any outlived it
    for pid in _processes_with_arg(sock):
        say(f"killing leftover containerd shim {pid}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for name in ("apiserver", "etcd"):
        rd.stop(name)
    for mount_point in _mounts_under(rd.path):
        if subprocess.run(["umount", mount_point], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", mount_point], capture_output=True, check=False)
    # cgroups runc made for our containers (cgroupfs driver, cgroup v1 and v2)
    runc_root = rd.path / "containerd" / "runc" / "k8s.io"
    if runc_root.is_dir():
        container_ids.update(d.name for d in runc_root.iterdir())
    for cid in container_ids:
        for cgroup in Path("/sys/fs/cgroup").glob(f"**/{cid}"):
            if cgroup.is_dir():
                for proc in (cgroup / "cgroup.procs").read_text().split() if (cgroup / "cgroup.procs").exists() else []:
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(proc), signal.SIGKILL)
                with contextlib.suppress(OSError):
                    cgroup.rmdir()
    veth = state.get("veth") or f"{veth_name(rd.path)}a"
    if os.geteuid() == 0 and shutil.which("ip") and run(["ip", "link", "show", veth], check=False).returncode == 0:
        run(["ip", "link", "del", veth], check=False)
    shutil.rmtree(rd.path / "pids", ignore_errors=True)


def down(rundir: str | Path, say=print) -> None:
    rd = RunDir(rundir, say)
    if not rd.path.is_dir():
        say(f"{rd.path} does not exist: nothing to do")
        return
    t = time.monotonic()
    with rd.locked():
        _down(rd, say)
        state = rd.load()
        if state:
            state["tier"] = None
            state["stopped"] = time.time()
            rd.save(state)
    say(f"stopped in {time.monotonic() - t:.1f}s")


# -- command line -------------------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"[kube] {message}", flush=True)


def main_up(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kube-up", description="Start the single-node test Kubernetes in RUNDIR.")
    parser.add_argument("rundir")
    parser.add_argument("--tier", choices=("a", "b"), default="a",
                        help="a: etcd + kube-apiserver; b: + containerd, scheduler, controller-manager, "
                             "kubelet, Tekton")
    parser.add_argument("--registry", action="append", default=[], metavar="[NAME=]HOST:PORT",
                        help="a plain-http registry containerd may pull from; with NAME=, images named "
                             "NAME/... come from HOST:PORT (repeatable; also CNBI_KUBE_REGISTRIES, "
                             "comma-separated)")
    parser.add_argument("--tekton-crds", action="store_true", help="install Tekton's CRDs on tier a too")
    parser.add_argument("--bindir", help="use these binaries instead of running scripts/kube-build")
    parser.add_argument("--keep-on-failure", action="store_true", help="leave a failed start running, to debug it")
    args = parser.parse_args(argv)
    registries = args.registry + [r for r in os.environ.get("CNBI_KUBE_REGISTRIES", "").split(",") if r]
    try:
        state = up(args.rundir, args.tier, registries, args.bindir, args.tekton_crds, say=_say,
                   keep_on_failure=args.keep_on_failure)
    except (HarnessError, subprocess.TimeoutExpired, KeyboardInterrupt) as error:
        print(f"kube-up: {error}", file=sys.stderr)
        return 1
    _say(f"apiserver {state['apiserver']}; admin kubeconfig {Path(args.rundir).resolve() / 'kubeconfig'}")
    return 0


def main_down(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kube-down",
                                     description="Stop the test Kubernetes kube-up started in RUNDIR.")
    parser.add_argument("rundir")
    args = parser.parse_args(argv)
    down(args.rundir, say=_say)
    return 0
