"""`python -m cnbi_hub.demo`: the embedded hub on one machine, for trying cnbi_hub out.

Starts JupyterHub on 127.0.0.1 with the cnbi service (embedded mode), a demo login (any user
name, one printed password; `admin` is an admin), and JupyterLab with the Image Builder.
Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from jupyterhub.utils import random_port

CONFIG_TEMPLATE = """\
# Written by `python -m cnbi_hub.demo`; rewritten at every start.
import os
from cnbi_hub.hubconfig import configure

c.JupyterHub.bind_url = {bind_url!r}
c.JupyterHub.db_url = {db_url!r}
c.JupyterHub.cookie_secret_file = {cookie_file!r}
c.ConfigurableHTTPProxy.pid_file = {proxy_pid!r}
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = os.environ["CNBI_DEMO_PASSWORD"]
c.Authenticator.allow_all = True
c.Authenticator.admin_users = {{"admin"}}
c.JupyterHub.spawner_class = "simple"
c.Spawner.default_url = "/lab"
c.Spawner.notebook_dir = {home!r}
c.Spawner.args = {spawner_args!r}
configure(
    c,
    url={service_url!r},
    service_config={{"data_dir": {service_data!r}, "base_images": {base_images!r}}},
)
"""


def write_config(data_dir: Path, ip: str, port: int, base_images: list[dict]) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    home = data_dir / "home"
    home.mkdir(exist_ok=True)
    spawner_args = ["--allow-root"] if os.geteuid() == 0 else []
    config = data_dir / "jupyterhub_config.py"
    config.write_text(
        CONFIG_TEMPLATE.format(
            bind_url=f"http://{ip}:{port}/",
            db_url=f"sqlite:///{data_dir / 'jupyterhub.sqlite'}",
            cookie_file=str(data_dir / "jupyterhub_cookie_secret"),
            proxy_pid=str(data_dir / "jupyterhub-proxy.pid"),
            home=str(home),
            spawner_args=spawner_args,
            service_url=f"http://127.0.0.1:{random_port()}",
            service_data=str(data_dir / "cnbi"),
            base_images=base_images,
        )
    )
    return config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ip", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--data-dir", default="cnbi-demo", help="where the demo keeps its state")
    args = parser.parse_args(argv)

    if not shutil.which("configurable-http-proxy"):
        print("configurable-http-proxy is not on PATH: run `make demo` (it installs it into .venv)", file=sys.stderr)
        return 1
    data_dir = Path(args.data_dir).resolve()
    base_images = [
        {
            "image": "localhost/cnbi/notebook-base:py311-user",
            "displayName": "Notebook base (Debian, Python 3.11)",
            "description": "JupyterLab and jupyterhub on Debian bookworm; you may pip install into it",
        }
    ]
    config = write_config(data_dir, args.ip, args.port, base_images)
    password = secrets.token_urlsafe(9)
    env = dict(os.environ, CNBI_DEMO_PASSWORD=password)

    hub = subprocess.Popen(
        [sys.executable, "-m", "jupyterhub", "-f", str(config)], cwd=data_dir, env=env, start_new_session=True
    )
    print(
        f"\n  cnbi_hub demo: http://{args.ip}:{args.port}/\n"
        f"  log in as any user name (admin: 'admin') with password: {password}\n"
        "  then open the Image Builder from the JupyterLab launcher. Ctrl-C stops everything.\n",
        flush=True,
    )

    def stop(*_):
        if hub.poll() is None:
            hub.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        return hub.wait()
    finally:
        stop()
        try:
            hub.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(hub.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
