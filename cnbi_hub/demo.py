"""`python -m cnbi_hub.demo`: the embedded hub on one machine, for trying cnbi_hub out.

Starts, in this order: podman's API service on a unix socket under the data dir (with
cnbi_hub's podman config), the local notebook base image if it is missing (built from Debian
packages: no container registry is needed), and JupyterHub on 127.0.0.1 with the cnbi service
(embedded mode: builds run here with podman), PodmanSpawner (servers in containers on the host
network, one free port each on 127.0.0.1) and the cnbi spawn-form hooks, and a demo login (any
user name with one printed password; `admin`, a hub admin, with a second one).

Ctrl-C (or SIGTERM) stops everything it started: the hub stops the servers (their containers
are removed), the proxy and the service; then the podman API service stops. Containers carry a
label naming this demo run, and any still there at the end are removed.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from jupyterhub.utils import random_port

from . import model
from .baseimage import BaseImageError
from .labimage import LabImageError
from .podmanspawner import PodmanService

BASE_IMAGE = "localhost/cnbi/notebook-base:py311-user"
LAB_IMAGE = "localhost/cnbi/notebook-lab:py311"  # the base plus cnbi_hub's own Lab panel
DEMO_LABEL = f"{model.PREFIX}/demo-run"
HUB_STOP_TIMEOUT = 90  # stopping servers removes their containers; give it time
MAX_SOCKET_PATH = 100  # unix socket paths are limited to 107 bytes

CONFIG_TEMPLATE = """\
# Written by `python -m cnbi_hub.demo`; rewritten at every start.
import os
from cnbi_hub.hubconfig import configure
from cnbi_hub.spawner import configure_dockerspawner

c.JupyterHub.bind_url = {bind_url!r}
c.JupyterHub.hub_ip = "127.0.0.1"
# free ports, not 8081/8001: the demo must not collide with another hub on this machine
c.JupyterHub.hub_port = {hub_port!r}
c.ConfigurableHTTPProxy.api_url = {proxy_api_url!r}
c.JupyterHub.db_url = {db_url!r}
c.JupyterHub.cookie_secret_file = {cookie_file!r}
c.ConfigurableHTTPProxy.pid_file = {proxy_pid!r}
c.JupyterHub.authenticator_class = "shared-password"
c.SharedPasswordAuthenticator.user_password = os.environ["CNBI_DEMO_PASSWORD"]
c.SharedPasswordAuthenticator.admin_password = os.environ["CNBI_DEMO_ADMIN_PASSWORD"]
c.Authenticator.allow_all = True
c.Authenticator.admin_users = {{"admin"}}

c.JupyterHub.spawner_class = "cnbi_hub.podmanspawner.PodmanSpawner"
c.PodmanSpawner.podman_socket = {podman_socket!r}
c.PodmanSpawner.image = {base_image!r}
c.PodmanSpawner.default_url = "/lab"
c.PodmanSpawner.start_timeout = 180
c.PodmanSpawner.http_timeout = 120
# a label naming this run: the demo removes whatever still carries it when it stops
c.PodmanSpawner.extra_create_kwargs = {{"labels": {{{demo_label!r}: {run_id!r}}}}}
configure_dockerspawner(c, "PodmanSpawner")
# "Start a server with this image" opens a new server named after the image
c.JupyterHub.allow_named_servers = True
c.CNBISpawnerHooks.admin_images = {admin_images!r}

configure(
    c,
    url={service_url!r},
    service_config={{"data_dir": {service_data!r}, "base_images": {base_images!r}}},
)
"""


def base_image_list() -> list[dict]:
    return [
        {
            "image": LAB_IMAGE,
            "displayName": "Notebook base (Debian, Python 3.11)",
            "description": "JupyterLab, jupyterhub and the Image Builder on Debian bookworm; you may pip install into it",
        }
    ]


def podman_socket_path(data_dir: Path) -> Path:
    """Under the data dir, unless that path is too long for a unix socket."""
    path = data_dir / "run" / "podman.sock"
    if len(str(path)) <= MAX_SOCKET_PATH:
        return path
    return Path(tempfile.mkdtemp(prefix="cnbi-demo-")) / "podman.sock"


def write_config(data_dir: Path, ip: str, port: int, base_images: list[dict], podman_socket: Path, run_id: str) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "jupyterhub_config.py"
    config.write_text(
        CONFIG_TEMPLATE.format(
            bind_url=f"http://{ip}:{port}/",
            db_url=f"sqlite:///{data_dir / 'jupyterhub.sqlite'}",
            cookie_file=str(data_dir / "jupyterhub_cookie_secret"),
            proxy_pid=str(data_dir / "jupyterhub-proxy.pid"),
            podman_socket=str(podman_socket),
            base_image=LAB_IMAGE,
            hub_port=random_port(),
            proxy_api_url=f"http://127.0.0.1:{random_port()}",
            demo_label=DEMO_LABEL,
            run_id=run_id,
            admin_images={b["displayName"]: b["image"] for b in base_images},
            service_url=f"http://127.0.0.1:{random_port()}",
            service_data=str(data_dir / "cnbi"),
            base_images=base_images,
        )
    )
    return config


def ensure_notebook_base_image() -> None:
    from .baseimage import BaseImageBuilder, ensure_base_images

    builder = BaseImageBuilder()
    if not builder.image_exists(builder.plan("user").reference):
        print(f"  building the local notebook base image {BASE_IMAGE} from Debian packages "
              "(no container registry is reachable here; about 3 minutes, once)...", flush=True)
    ensure_base_images(["user"], builder=builder)
    # servers show the Image Builder only if cnbi_hub is in their image, as jupyterhub must be
    from .labimage import ensure_lab_image

    print(f"  adding the Image Builder to it: {ensure_lab_image(BASE_IMAGE)}", flush=True)


def remove_demo_containers(podman: PodmanService, run_id: str) -> list[str]:
    """Remove containers labelled with this run (a hub that died could not stop its servers)."""
    import docker

    client = docker.APIClient(base_url=podman.url, version="auto")
    try:
        leftovers = client.containers(all=True, filters={"label": f"{DEMO_LABEL}={run_id}"})
        for container in leftovers:
            client.remove_container(container["Id"], force=True)
        return [c["Id"] for c in leftovers]
    finally:
        client.close()


def stop_hub(hub: subprocess.Popen, proxy_pid_file: Path) -> None:
    if hub.poll() is None:
        hub.send_signal(signal.SIGTERM)
    try:
        hub.wait(timeout=HUB_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(hub.pid, signal.SIGKILL)  # the hub's own session: its proxy and service too
        hub.wait()
    # A hub that stopped cleanly removed its proxy's pid file; one that crashed (or failed to
    # start) left the proxy running in its own session, and the pid file says which it is.
    try:
        pid = int(proxy_pid_file.read_text().strip())
        if b"configurable-http-proxy" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ip", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--data-dir", default="cnbi-demo", help="where the demo keeps its state")
    args = parser.parse_args(argv)

    if not shutil.which("configurable-http-proxy"):
        print("configurable-http-proxy is not on PATH: run `make demo` (it installs it into .venv)", file=sys.stderr)
        return 1
    if not shutil.which("podman"):
        print("podman is not installed: run `make demo` as root, or scripts/install-system-deps", file=sys.stderr)
        return 1
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    run_id = secrets.token_hex(6)
    password = secrets.token_urlsafe(9)  # 12 characters: the shared user password needs 8
    admin_password = secrets.token_urlsafe(24)  # 32 characters, as SharedPasswordAuthenticator asks of admins

    stopping = False

    def request_stop(*_):
        nonlocal stopping
        stopping = True
        if hub is not None and hub.poll() is None:
            hub.send_signal(signal.SIGTERM)

    hub = None
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    podman = PodmanService(podman_socket_path(data_dir), log_path=data_dir / "podman-service.log")
    print(f"  starting podman's API service on {podman.socket_path}", flush=True)
    podman.start()
    try:
        try:
            ensure_notebook_base_image()
        except (BaseImageError, LabImageError) as e:
            print(f"  cannot prepare the notebook image: {e}", file=sys.stderr, flush=True)
            return 1
        if stopping:
            return 0
        config = write_config(data_dir, args.ip, args.port, base_image_list(), podman.socket_path, run_id)
        env = dict(os.environ, CNBI_DEMO_PASSWORD=password, CNBI_DEMO_ADMIN_PASSWORD=admin_password)
        # its own session: Ctrl-C reaches only us, and we stop the hub in order
        hub = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(config)], cwd=data_dir, env=env, start_new_session=True
        )
        print(
            f"\n  cnbi_hub demo: http://{args.ip}:{args.port}/\n"
            f"  log in as any user name with password: {password}\n"
            f"  the hub admin 'admin' logs in with password: {admin_password}\n"
            "  then open the Image Builder from the JupyterLab launcher. Ctrl-C stops everything.\n",
            flush=True,
        )
        while True:
            try:
                hub.wait()
                break
            except KeyboardInterrupt:
                request_stop()
        return 0 if stopping else (hub.returncode or 0)
    finally:
        if hub is not None:
            stop_hub(hub, data_dir / "jupyterhub-proxy.pid")
        try:
            removed = remove_demo_containers(podman, run_id)
            if removed:
                print(f"  removed {len(removed)} leftover server container(s)", flush=True)
        except Exception as e:
            print(f"  could not check for leftover containers: {e}", file=sys.stderr)
        podman.stop()
        print("  cnbi_hub demo stopped.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
