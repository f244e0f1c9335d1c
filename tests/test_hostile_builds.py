"""Builds written to attack, in embedded mode: what a user's Containerfile can and cannot reach.

Each build here is a GitRepository whose Containerfile (the user's own: it may say `USER root`)
runs a probe, driven through the real engine (SQLite store, phase work, podman builder). The
probe prints one `CNBI-PROBE {json}` line with what it found; the tests read it from the build
log and check it against what is really there on this machine: the session hub and its cnbi
service, a registry, a podman API service, a canary server and an abstract Unix socket, all on
this machine's loopback; another build's context and secrets on disk; the service's token in
its environment. The limits (memory, CPU, processes, image size, free disk, time) are each a
build that goes over them and must end Failed naming the limit.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest

from cnbi_hub import model
from cnbi_hub.controller.builders.podman import PodmanBuilder
from cnbi_hub.controller.builders.sandbox import BuildCgroup
from tests.infra_podman import podman
from tests.infra_registry import free_port
from tests.test_embedded_runner import failure_message, one_image_through_an_engine

pytestmark = pytest.mark.podman

BASE = "localhost/cnbi/notebook-base:py311-user"
PROBE_MARK = "CNBI-PROBE "

# What the probe does, as root inside the build (the Containerfile says USER root first).
PROBE = r'''
import json, os, socket, sys, urllib.request

targets = json.load(open("/probe/targets.json"))
found = {"tcp": {}, "http": {}, "abstract": None, "sockets": [], "canaries": [], "env_secrets": [],
         "pid1": open("/proc/1/cmdline", "rb").read().split(b"\0")[0].decode(errors="replace")}

# first, try to leave the build's root: a chroot inside it and `..` from outside that (works
# for root with CAP_SYS_CHROOT in a plain chroot), and the root of pid 1; what follows then
# searches whatever root this process ended up in
try:
    os.makedirs("/tmp/.escape", exist_ok=True)
    outside = os.open("/", os.O_RDONLY)
    os.chroot("/tmp/.escape")
    os.fchdir(outside)
    for _ in range(64):
        os.chdir("..")
    os.chroot(".")
    found["escape"] = "chroot done"
except OSError as e:
    found["escape"] = "refused: " + type(e).__name__
try:
    found["proc1_root"] = sorted(os.listdir("/proc/1/root"))[:40]
except OSError as e:
    found["proc1_root"] = "refused: " + type(e).__name__
# the machine's disks and loop devices, as a privileged container's /dev would hold them
found["devices_opened"] = []
for name in sorted(os.listdir("/dev")):
    path = os.path.join("/dev", name)
    try:
        import stat
        if stat.S_ISBLK(os.stat(path).st_mode):
            with open(path, "rb") as device:
                device.read(16)
            found["devices_opened"].append(path)
    except OSError:
        pass
found["outside_markers"] = [p for p in ("/tekton", "/workspace", "/var/run/secrets/kubernetes.io",
                                        "/proc/1/root/tekton", "/proc/1/root/workspace",
                                        "/proc/1/root/var/run/secrets/kubernetes.io", "/var/lib/containers/storage")
                            if os.path.exists(p)]

def connect(host, port):
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((host, port))
        return "connected"
    except OSError as e:
        return "refused: " + type(e).__name__
    finally:
        s.close()

for name, (host, port) in targets["tcp"].items():
    found["tcp"][name] = connect(host, port)
for name, url in targets["http"].items():
    try:
        found["http"][name] = urllib.request.urlopen(url, timeout=3).status
    except Exception as e:
        found["http"][name] = "failed: " + type(e).__name__

s = socket.socket(socket.AF_UNIX)
try:
    s.connect("\0" + targets["abstract"])
    found["abstract"] = "connected"
except OSError as e:
    found["abstract"] = "refused: " + type(e).__name__

for top in ("/run", "/var/run", "/tmp", "/var/lib", "/root", "/home"):
    for directory, dirs, files in os.walk(top):
        for f in files:
            path = os.path.join(directory, f)
            try:
                import stat
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    found["sockets"].append(path)
            except OSError:
                pass

canaries = [c[::-1].encode() for c in targets["canaries"]]  # written reversed: not found in targets.json itself
skip = ("/proc", "/sys", "/dev", "/usr", "/opt/venv", "/var/lib/containers")
for directory, dirs, files in os.walk("/"):
    dirs[:] = [d for d in dirs if not os.path.join(directory, d).startswith(skip)]
    for f in files:
        path = os.path.join(directory, f)
        try:
            if os.path.islink(path) or os.path.getsize(path) > 1 << 20:
                continue
            data = open(path, "rb").read()
        except OSError:
            continue
        found["canaries"] += [path for c in canaries if c in data]
for pid in os.listdir("/proc"):
    if pid.isdigit():
        for what in ("environ", "cmdline"):
            try:
                data = open(f"/proc/{pid}/{what}", "rb").read()
            except OSError:
                continue
            found["canaries"] += [f"/proc/{pid}/{what}" for c in canaries if c in data]
found["env_secrets"] = sorted(k for k in os.environ if any(w in k.upper() for w in ("TOKEN", "SECRET", "PASSWORD", "JUPYTERHUB")))
print("CNBI-PROBE " + json.dumps(found), flush=True)
'''


async def build_repo(tmp_path, builder, repo, name, timeout_s=600):
    """Drive one GitRepository image to Ready/Failed; returns (object, its build log lines)."""
    return await one_image_through_an_engine(tmp_path, {"buildType": "GitRepository", "repository": repo.url, "gitRef": "main"},
                            name, builder=builder, creator="mallory", timeout_s=timeout_s)


class _Canary(BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self):
        type(self).hits += 1
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"you reached the host")

    def log_message(self, *args):
        pass


@pytest.fixture
def canary_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Canary)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Canary.hits = 0
    yield server
    server.shutdown()


@pytest.fixture
def abstract_socket():
    name = f"cnbi-canary-{secrets.token_hex(4)}"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind("\0" + name)
    sock.listen(5)
    yield name
    sock.close()


@pytest.fixture
def podman_api(podman_env):
    """A real podman API service on this machine's loopback: what a build must never drive."""
    port = free_port()
    proc = subprocess.Popen(["podman", "system", "service", "--time=0", f"tcp:127.0.0.1:{port}"],
                            env=podman_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    yield port
    proc.terminate()
    proc.wait(timeout=30)


def containerfile(*steps: str, user_root: bool = True) -> str:
    # a fresh label first: every step really runs (podman's layer cache would replay an earlier run)
    lines = [f"FROM {BASE}", f"LABEL cnbi.test.run={secrets.token_hex(6)}"] + (["USER root"] if user_root else [])
    lines += list(steps) + ["USER jovyan"]
    return "\n".join(lines) + "\n"


async def test_a_hostile_build_reaches_nothing_on_this_machine_and_finds_no_secret(
        tmp_path, hub, local_registry, notebook_base_images, make_git_repo, canary_server, abstract_socket,
        podman_api, podman_env, monkeypatch):
    canary_context, canary_secret, canary_token = (f"cnbi-canary-{what}-{secrets.token_hex(8)}"
                                                   for what in ("context", "secret", "token"))
    contexts = tmp_path / "contexts"
    # another user's build in progress: its context (the lock) and its secret files, where ours go
    other = contexts / "cnbi-build-other"
    (other / "context").mkdir(parents=True)
    (other / "context" / "requirements.lock").write_text(f"six==1.16.0 # {canary_context}\n")
    (other / "context.secrets").mkdir()
    (other / "context.secrets" / "pip-index").write_text(f"https://u:{canary_secret}@index.example/simple\n")
    # the service's own credential, as it has it (its environment)
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", canary_token)
    monkeypatch.setenv("CNBI_WEBHOOK_SECRET", canary_secret)

    hub_api = urlparse(hub.url)
    service = urlparse(hub.service_url)
    registry_host, registry_port = local_registry.host.rsplit(":", 1)
    targets = {
        "tcp": {"hub": [hub_api.hostname, hub_api.port], "service": [service.hostname, service.port],
                "registry": [registry_host, int(registry_port)], "podman_api": ["127.0.0.1", podman_api],
                "canary": ["127.0.0.1", canary_server.server_port]},
        "http": {"hub_api": f"{hub.url.rstrip('/')}/hub/api/user", "service_health": f"{hub.service_url}health",
                 "registry_catalog": f"http://{local_registry.host}/v2/_catalog",
                 "podman_info": f"http://127.0.0.1:{podman_api}/v4.0.0/libpod/info",
                 "canary": f"http://127.0.0.1:{canary_server.server_port}/"},
        "abstract": abstract_socket,
        "canaries": [canary[::-1] for canary in (canary_context, canary_secret, canary_token)],
    }
    repo = make_git_repo(f"hostile-{secrets.token_hex(3)}", {
        "probe.py": PROBE,
        "targets.json": json.dumps(targets),
        "Containerfile": containerfile(
            "COPY probe.py targets.json /probe/",
            "RUN python3 /probe/probe.py",
            # a process meant to outlive its step and the build
            "RUN (setsid sleep 31337 >/dev/null 2>&1 &) ; (nohup sh -c 'sleep 31338' >/dev/null 2>&1 &) ; true",
        ),
    })
    # the same targets, first from the host network: the probe would have reached them all
    open_from_here = {name: _reachable(host, port) for name, (host, port) in targets["tcp"].items()}
    assert all(open_from_here.values()), open_from_here

    builder = PodmanBuilder(context_root=str(contexts))
    obj, lines = await build_repo(tmp_path, builder, repo, "hostile")
    assert model.phase_of(obj) == "Ready", failure_message(obj)
    found = json.loads(next(line for line in lines if line.startswith(PROBE_MARK))[len(PROBE_MARK):])
    print("the probe found:", json.dumps(found, indent=1))

    assert all(result.startswith("refused") for result in found["tcp"].values()), found["tcp"]
    assert all(str(result).startswith("failed") for result in found["http"].values()), found["http"]
    assert _Canary.hits == 0
    assert found["abstract"].startswith("refused"), found["abstract"]
    assert not [s for s in found["sockets"] if "podman" in s or "docker" in s or "containerd" in s], found["sockets"]
    assert found["canaries"] == [], found["canaries"]
    assert found["env_secrets"] == [], found["env_secrets"]
    assert found["pid1"] != "/sbin/init" and "jupyterhub" not in found["pid1"], found["pid1"]
    assert found["outside_markers"] == [], found  # a chroot leads back to the container's own root
    assert found["devices_opened"] == [], found
    # nothing it started runs on: not in the build's steps, not after it
    assert not _processes_running("sleep", "31337") and not _processes_running("sleep", "31338")
    # no secret in the log, nor anywhere in the image it made
    text = "\n".join(lines)
    for canary in (canary_context, canary_secret, canary_token):
        assert canary not in text
    grep = podman("run", "--rm", "--network=none", "--user=root", "--entrypoint=grep", obj["status"]["image"], "-rl",
                  "--exclude-dir=proc", "--exclude-dir=sys", "--exclude-dir=dev", "-e", canary_context,
                  "-e", canary_secret, "-e", canary_token, "/", env=podman_env)
    assert grep.returncode == 1 and grep.stdout == "", grep.stdout + grep.stderr
    # the build's cgroup went with it
    assert not list((BuildCgroup(builder.limits).mounts["memory"] / "cnbi").glob("*/build")), "a build cgroup was left"


def _reachable(host, port) -> bool:
    try:
        socket.create_connection((host, port), timeout=3).close()
        return True
    except OSError:
        return False


def _processes_running(*argv: str) -> list[int]:
    """PIDs of the processes on this machine whose command line is exactly `argv` (a build's
    `sleep 30`, not a shell that happens to mention it)."""
    wanted = [a.encode() for a in argv]
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read().rstrip(b"\0").split(b"\0")
            except OSError:
                continue
            if cmdline == wanted:
                found.append(int(pid))
    return found


MEMORY_HOG = textwrap.dedent("""\
    chunks = []
    for i in range(64):
        chunks.append(bytearray(16 << 20))
        print("allocated", (i + 1) * 16, "MiB", flush=True)
    """)

CPU_HOG = textwrap.dedent("""\
    import os, resource, time
    started = time.time()
    children = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            while time.time() - started < 4:
                pass
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    print("CPU-USED %.2f WALL %.2f" % (used.ru_utime + used.ru_stime, time.time() - started), flush=True)
    """)


@pytest.fixture
def limited_builder(notebook_base_images):
    base_size = int(podman("image", "inspect", "--format", "{{.Size}}", BASE).stdout)
    return PodmanBuilder(build_memory_limit=256 << 20, build_cpu_limit=0.5, build_pids_limit=64,
                         max_image_size=base_size + (200 << 20), build_timeout=120, disk_check_interval=0.5)


@pytest.mark.skipif(not BuildCgroup.available(), reason="needs cgroup v1 controllers (podman's cgroupfs manager)")
async def test_a_build_over_its_memory_limit_fails_naming_it(tmp_path, limited_builder, make_git_repo):
    repo = make_git_repo(f"memory-hog-{secrets.token_hex(3)}", {
        "hog.py": MEMORY_HOG, "Containerfile": containerfile("COPY hog.py /hog.py", "RUN python3 /hog.py")})
    obj, lines = await build_repo(tmp_path, limited_builder, repo, "memory-hog")
    assert model.phase_of(obj) == "Failed" and obj["status"]["failedPhase"] == "Building"
    message = failure_message(obj)
    assert "reached its memory limit of 256 MiB" in message, message
    allocated = [int(line.split()[1]) for line in lines if line.startswith("allocated ")]
    assert allocated and max(allocated) <= 256, allocated[-3:]


@pytest.mark.skipif(not BuildCgroup.available(), reason="needs cgroup v1 controllers (podman's cgroupfs manager)")
async def test_a_build_over_its_process_limit_fails_naming_it(tmp_path, limited_builder, make_git_repo):
    repo = make_git_repo(f"fork-hog-{secrets.token_hex(3)}", {
        "Containerfile": containerfile("RUN set -e; for i in $(seq 200); do sleep 30 & done; wait")})
    obj, _ = await build_repo(tmp_path, limited_builder, repo, "fork-hog")
    assert model.phase_of(obj) == "Failed", failure_message(obj)
    assert "reached its limit of 64 processes" in failure_message(obj), failure_message(obj)
    assert not _processes_running("sleep", "30")


@pytest.mark.skipif(not BuildCgroup.available(), reason="needs cgroup v1 controllers (podman's cgroupfs manager)")
async def test_a_build_is_held_to_its_cpu_limit_and_the_log_says_what_it_used(tmp_path, limited_builder, make_git_repo):
    repo = make_git_repo(f"cpu-hog-{secrets.token_hex(3)}", {
        "hog.py": CPU_HOG, "Containerfile": containerfile("COPY hog.py /hog.py", "RUN python3 /hog.py")})
    obj, lines = await build_repo(tmp_path, limited_builder, repo, "cpu-hog")
    assert model.phase_of(obj) == "Ready", failure_message(obj)
    used, wall = next(map(float, line.split()[1::2]) for line in lines if line.startswith("CPU-USED"))
    # two busy processes for 4 s would use 8 s of CPU on two free cores; 0.5 CPU allows about 2
    assert used <= 0.5 * wall * 1.25 + 0.3, (used, wall)
    assert any(line.startswith("the build used ") and " s of CPU" in line for line in lines)


async def test_a_build_over_the_image_size_limit_is_stopped_after_that_step(tmp_path, limited_builder, make_git_repo,
                                                                            podman_env):
    repo = make_git_repo(f"disk-hog-{secrets.token_hex(3)}", {
        "Containerfile": containerfile("RUN head -c 300M /dev/zero > /big", "RUN echo never-reached")})
    obj, lines = await build_repo(tmp_path, limited_builder, repo, "disk-hog")
    assert model.phase_of(obj) == "Failed"
    message = failure_message(obj)
    assert "over the image size limit of" in message and "after a step finished" in message, message
    assert not any("never-reached" in line and not line.startswith("STEP") for line in lines)


async def test_a_build_that_fills_the_disk_is_stopped_while_it_writes(tmp_path, limited_builder, make_git_repo):
    free = shutil.disk_usage("/var/lib/containers/storage").free
    limited_builder.max_image_size = 0  # the free-space watch alone
    limited_builder.min_free_disk = free - (150 << 20)
    repo = make_git_repo(f"disk-filler-{secrets.token_hex(3)}", {
        "Containerfile": containerfile(
            "RUN for i in $(seq 40); do head -c 10M /dev/urandom > /fill-$i; sleep 0.25; done; echo wrote-it-all")})
    obj, lines = await build_repo(tmp_path, limited_builder, repo, "disk-filler")
    assert model.phase_of(obj) == "Failed"
    message = failure_message(obj)
    assert "while the build ran; it was stopped" in message and "the disk limit" in message, message
    assert not any(line == "wrote-it-all" for line in lines)
    assert shutil.disk_usage("/var/lib/containers/storage").free > free - (300 << 20)


async def test_a_build_over_its_time_limit_fails_naming_it(tmp_path, limited_builder, make_git_repo):
    limited_builder.build_timeout = 20
    repo = make_git_repo(f"slow-{secrets.token_hex(3)}", {
        "Containerfile": containerfile("RUN sleep 300")})
    obj, _ = await build_repo(tmp_path, limited_builder, repo, "slow")
    assert model.phase_of(obj) == "Failed"
    assert "longer than 20 s (its time limit)" in failure_message(obj), failure_message(obj)
    assert not _processes_running("sleep", "300")


def test_build_cgroups_a_killed_service_left_are_swept_and_recent_ones_kept(tmp_path):
    from cnbi_hub.controller.builders.sandbox import sweep_stale_cgroups

    for hierarchy in ("memory", "pids"):
        for build, age in (("stale", 7200), ("recent", 10)):
            path = tmp_path / hierarchy / "cnbi" / build / "build"
            path.mkdir(parents=True)
            then = time.time() - age
            os.utime(path.parent, (then, then))
    busy = tmp_path / "memory" / "cnbi" / "busy"
    (busy / "build").mkdir(parents=True)
    (busy / "build" / "cgroup.procs").write_text("1\n")  # a directory rmdir refuses, as a cgroup in use
    os.utime(busy, (time.time() - 7200,) * 2)
    assert sweep_stale_cgroups(cgroup_root=str(tmp_path)) == 2
    assert sorted(p.name for p in (tmp_path / "memory" / "cnbi").iterdir()) == ["busy", "recent"]
    assert [p.name for p in (tmp_path / "pids" / "cnbi").iterdir()] == ["recent"]
