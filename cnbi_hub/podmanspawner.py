"""Embedded mode's spawner: DockerSpawner over podman's API socket, on the host network.

`PodmanService` runs `podman system service` with cnbi_hub's container configuration;
`PodmanSpawner` starts each user's server in a container listening on 127.0.0.1, with the
user's home on a podman volume and the machine's CA bundle mounted, so `pip install` in a
terminal reaches the same package index as builds. The spawn-form hooks live in
cnbi_hub.spawner and work with any DockerSpawner.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

from jupyterhub.utils import random_port
from traitlets import Integer, List, Unicode, default

from .containers import podman_environ
from .trust import machine_ca_bundle

DEFAULT_PODMAN_SOCKET = "/run/cnbi/podman.sock"


def podman_service_argv(socket_path: str | os.PathLike) -> list[str]:
    """podman's Docker-compatible API on a unix socket; --time=0 keeps it up while idle."""
    return ["podman", "system", "service", "--time=0", f"unix://{socket_path}"]


class PodmanService:
    """`podman system service` on a unix socket, run with cnbi_hub's podman environment.

    Started as its own process group so stopping it also ends the conmon helpers it spawned
    for this service, never anyone else's.
    """

    def __init__(self, socket_path: str | os.PathLike, log_path: str | os.PathLike | None = None):
        self.socket_path = Path(socket_path)
        self.log_path = Path(log_path) if log_path else self.socket_path.with_suffix(".log")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self, timeout: float = 30) -> "PodmanService":
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        if self.socket_path.exists():
            self.socket_path.unlink()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                podman_service_argv(self.socket_path), env=podman_environ(), stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"podman system service exited ({self.process.returncode}): {self.log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"podman's API did not answer on {self.socket_path}")
            time.sleep(0.1)
        return self

    def answers(self) -> bool:
        import http.client
        import socket

        if not self.socket_path.exists():
            return False
        connection = http.client.HTTPConnection("localhost", timeout=2)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(2)
            sock.connect(str(self.socket_path))
            connection.sock = sock
            connection.request("GET", "/_ping")
            return connection.getresponse().status == 200
        except OSError:
            return False
        finally:
            connection.close()

    def stop(self, timeout: float = 15) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        import signal

        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


SERVER_CA_PATH = "/etc/cnbi/ca-certificates.crt"

try:
    from dockerspawner import DockerSpawner
except ImportError:  # the [docker] extra is not installed: the hooks above still work
    DockerSpawner = None

if DockerSpawner is not None:

    class PodmanSpawner(DockerSpawner):
        """DockerSpawner over podman's API socket, on the host network.

        Each server listens on 127.0.0.1 on a free port (JupyterHub passes the address in
        JUPYTERHUB_SERVICE_URL, which jupyterhub-singleuser binds to), so the hub reaches it
        directly and podman's bridge network is never used. Containers are named per user
        (`cnbi-<user>`) and removed when the server stops.
        """

        podman_socket = Unicode(
            DEFAULT_PODMAN_SOCKET,
            help="""podman's API socket, as served by
            `podman system service --time=0 unix:///run/cnbi/podman.sock` (run it with
            cnbi_hub.containers.podman_environ(), see PodmanService).""",
        ).tag(config=True)

        port_range = List(
            Integer(), [0, 0],
            help="""`[low, high)` ports to pick a server's port from; `[0, 0]` lets the OS pick a
            free one. Servers share the host network, so each needs its own port.""",
        ).tag(config=True)

        home_volume_name_template = Unicode(
            "cnbi-home-{username}",
            help="""Name of the podman volume that holds a user's home, the same for every server
            of theirs (default and named, on any image), so files survive a server's stop and a
            change of image. DockerSpawner's fields work in it: {username}, {raw_username},
            {servername} (a per-server volume, if you want one), {prefix}. Empty: no home volume.

            A new volume starts as a copy of the image's home directory (podman copies it up on
            first use). Deleting an image or stopping a server never removes it; remove one with
            `podman volume rm cnbi-home-<user>`.""",
        ).tag(config=True)

        home_mount_point = Unicode(
            "/home/jovyan",
            help="""Where the home volume is mounted in the server's container: the notebook user's
            home, /home/jovyan in the Jupyter Docker Stacks convention that the images built here
            follow. Set it for images whose user lives elsewhere.""",
        ).tag(config=True)

        ca_bundle = Unicode(
            help="""PEM CA bundle mounted read-only into every server (at
            /etc/cnbi/ca-certificates.crt, named by PIP_CERT, SSL_CERT_FILE and
            REQUESTS_CA_BUNDLE), so `pip install` in a user's terminal trusts the same package
            index as the builds do (a TLS-intercepting proxy, a private mirror).
            Default: this machine's bundle (cnbi_hub.trust.machine_ca_bundle). Empty: none.""",
        ).tag(config=True)

        @default("ca_bundle")
        def _default_ca_bundle(self):
            return machine_ca_bundle()

        @default("volumes")
        def _default_volumes(self):
            volumes = {}
            if self.home_volume_name_template:
                volumes[self.home_volume_name_template] = self.home_mount_point
            if self.ca_bundle:
                volumes[self.ca_bundle] = {"bind": SERVER_CA_PATH, "mode": "ro"}
            return volumes

        def get_env(self):
            env = super().get_env()
            if self.ca_bundle:
                for name in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
                    env.setdefault(name, SERVER_CA_PATH)
            # the package index the hub's machine uses (a mirror) is the users' index too
            for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
                if os.environ.get(name):
                    env.setdefault(name, os.environ[name])
            return env

        @default("client_kwargs")
        def _default_client_kwargs(self):
            return {"base_url": f"unix://{self.podman_socket}"}

        @default("network_name")
        def _default_network_name(self):
            return "host"

        @default("use_internal_ip")
        def _default_use_internal_ip(self):
            # True only so DockerSpawner asks for no port bindings, which the host network
            # refuses; the address itself comes from get_ip_and_port below, not from podman.
            return True

        @default("remove")
        def _default_remove(self):
            return True

        @default("prefix")
        def _default_prefix(self):
            return "cnbi"

        @default("ip")
        def _default_ip(self):
            return "127.0.0.1"

        @default("host_ip")
        def _default_host_ip(self):
            return "127.0.0.1"

        @default("pull_policy")
        def _default_pull_policy(self):
            # Built images live in local storage and their digest references cannot be pulled
            # by tag; a missing image should say so rather than try a registry.
            return "never"

        _clients: dict = {}

        @property
        def client(self):
            """One docker API client per socket (DockerSpawner keeps one per class)."""
            import docker

            kwargs = {"version": "auto", **self.client_kwargs}
            key = json.dumps(kwargs, sort_keys=True, default=str)
            if key not in PodmanSpawner._clients:
                PodmanSpawner._clients[key] = docker.APIClient(**kwargs)
            return PodmanSpawner._clients[key]

        def _pick_port(self) -> int:
            low, high = self.port_range
            if low and high:
                return free_port_in(low, high)
            return random_port()

        async def create_object(self):
            # a fresh port for every start: another server may hold the last one now
            self.port = self._pick_port()
            return await super().create_object()

        async def get_ip_and_port(self):
            # host network: no port mapping to ask podman about
            return self.ip, self.port

        async def stop(self, now=False):
            await super().stop(now=now)
            # auto_remove races with our remove; wait until the name is free for the next start
            for _ in range(50):
                if await self.get_object() is None:
                    return
                await asyncio.sleep(0.1)

else:  # pragma: no cover
    PodmanSpawner = None


def free_port_in(low: int, high: int) -> int:
    """The first port in [low, high) that nothing on 127.0.0.1 listens on."""
    import socket

    for port in range(low, high):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high})")
