"""`python -m cnbi_hub.demo` as a user runs it: log in, start a server, Ctrl-C, nothing left."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from cnbi_hub import model
from cnbi_hub.containers import podman_environ
from tests.infra_disk import fill_up, small_disk
from tests.infra_podman import free_port

pytestmark = pytest.mark.podman

REPO = Path(__file__).resolve().parent.parent
USERNAME = "demotester"


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc), so the test can check none outlives it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def command_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def demo_containers() -> list[str]:
    result = subprocess.run(
        ["podman", "ps", "-a", "--filter", "label=cnbi-hub.io/demo-run", "--format", "{{.Names}}"],
        env=podman_environ(), capture_output=True, text=True, check=True,
    )
    return result.stdout.split()


class Output:
    """The demo's stdout, read by a thread so the pipe never fills."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream):
        for line in stream:
            self.lines.append(line)

    def wait_for(self, pattern: str, process, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            if process.poll() is not None:
                break
            time.sleep(0.2)
        pytest.fail(f"the demo never printed {pattern!r}:\n{''.join(self.lines)[-5000:]}")


@pytest.fixture
def service_disk(tmp_path):
    """The demo's service state (`<data dir>/cnbi`) on a 32 MiB disk of its own, to fill."""
    with small_disk(tmp_path / "demo" / "cnbi", 32) as mount:
        yield mount


def test_demo_logs_in_starts_a_server_and_stops_cleanly(tmp_path, service_disk, notebook_base_images):
    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    demo = subprocess.Popen(
        [sys.executable, "-m", "cnbi_hub.demo", "--port", str(port), "--data-dir", str(tmp_path / "demo")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
    )
    output = Output(demo.stdout)
    tree: set[int] = set()
    try:
        password = output.wait_for(r"with password: (\S+)", demo, timeout=300).group(1)
        admin_password = output.wait_for(r"'admin' logs in with password: (\S+)", demo, timeout=30).group(1)
        assert len(admin_password) >= 32 and admin_password != password
        session = requests.Session()
        deadline = time.monotonic() + 120
        while True:  # the hub is up once its login page answers
            try:
                login_page = session.get(base + "hub/login", timeout=5)
                if login_page.status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "".join(output.lines)[-5000:]
            time.sleep(0.5)
        xsrf = re.search(r'name="_xsrf"\s+value="([^"]+)"', login_page.text).group(1)

        wrong = session.post(base + "hub/login", data={"username": USERNAME, "password": "not-it", "_xsrf": xsrf},
                             allow_redirects=False, timeout=30)
        assert wrong.status_code == 403  # the printed password is the one that counts
        r = session.post(base + "hub/login", data={"username": USERNAME, "password": password, "_xsrf": xsrf},
                         allow_redirects=False, timeout=30)
        assert r.status_code == 302, r.text
        home = session.get(base + "hub/home", timeout=30)
        assert home.status_code == 200 and USERNAME in home.text

        health = session.get(base + "services/cnbi/health", timeout=30)
        assert health.status_code == 200

        # the hub admin logs in with the admin password (not the users' one) and is a cnbi admin
        admin = requests.Session()
        xsrf_admin = re.search(r'name="_xsrf"\s+value="([^"]+)"', admin.get(base + "hub/login", timeout=30).text).group(1)
        r = admin.post(base + "hub/login", data={"username": "admin", "password": password, "_xsrf": xsrf_admin},
                       allow_redirects=False, timeout=30)
        assert r.status_code == 403
        r = admin.post(base + "hub/login", data={"username": "admin", "password": admin_password, "_xsrf": xsrf_admin},
                       allow_redirects=False, timeout=30)
        assert r.status_code == 302, r.text
        page = admin.get(base + "services/cnbi/", timeout=30)  # through the service's OAuth login
        assert page.status_code == 200 and "All users" in page.text, page.text[:500]

        # one image to choose from and no custom images yet: /hub/spawn starts it straight away
        r = session.get(base + "hub/spawn", allow_redirects=False, timeout=60)
        assert r.status_code == 302, r.text
        # JupyterLab itself answers once the server is up (until then the hub's pending page does)
        lab_url = base + f"user/{USERNAME}/lab"
        deadline = time.monotonic() + 180
        while True:
            lab = session.get(lab_url, timeout=30)
            if lab.status_code == 200 and lab.url.startswith(lab_url) and "jupyter-config-data" in lab.text:
                break
            assert time.monotonic() < deadline, f"server never answered: {lab.status_code} {lab.url} {lab.text[:300]}"
            time.sleep(1)
        assert demo_containers() == [f"cnbi-{USERNAME}"]
        # the server runs in the image with cnbi_hub: the Lab panel's route answers from inside
        # the container, forwarding to the cnbi service with the server's own token
        assert '"cnbi-hub"' in lab.text or "cnbi-hub" in lab.text  # the Lab extension is federated
        panel_api = session.get(base + f"user/{USERNAME}/cnbi/api/base-images", timeout=30)
        assert panel_api.status_code == 200, panel_api.text[:300]
        assert panel_api.json()["items"][0]["image"] == "localhost/cnbi/notebook-lab:py311"

        # the service's disk really full (ENOSPC): a write is refused with 507 naming it, nothing
        # is half-written, everything else answers, and once there is space again writes land
        service_api = base + "services/cnbi/api/images"
        xsrf_service = next(c.value for c in admin.cookies if c.name == "_xsrf" and c.path.startswith("/services/cnbi"))
        before = [model.name_of(o) for o in admin.get(service_api, timeout=30).json()["items"]]
        with sqlite3.connect(service_disk / "cnbi.sqlite") as db:  # an empty WAL: the next write needs new space
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        filler = fill_up(service_disk)
        answers = []
        for i in range(10):  # bounded: a write may still find room in a page the database has
            answers.append(admin.post(service_api, timeout=30, headers={"X-XSRFToken": xsrf_service}, json={
                "metadata": {"name": f"while-full-{i}", "annotations": {model.ANNOTATION_DESCRIPTION: "d" * 4096}},
                "spec": {"buildType": "ImageImport", "fromImage": "127.0.0.1:9/none:1"}}))
            if answers[-1].status_code != 201:
                break
        refused = answers[-1]
        assert refused.status_code == 507, refused.text[:300]
        assert "is full" in refused.json()["message"] and str(service_disk) not in refused.json()["message"]
        assert session.get(base + "services/cnbi/health", timeout=30).status_code == 200
        listed = [model.name_of(o) for o in admin.get(service_api, timeout=30).json()["items"]]
        assert sorted(listed) == sorted(before + [f"while-full-{i}" for i in range(len(answers) - 1)])
        filler.unlink()
        again = admin.post(service_api, timeout=30, headers={"X-XSRFToken": xsrf_service}, json={
            "metadata": {"name": "after-space"}, "spec": {"buildType": "ImageImport", "fromImage": "127.0.0.1:9/none:1"}})
        assert again.status_code == 201, again.text[:300]

        tree = descendants(demo.pid)
        commands = " ".join(command_of(pid) for pid in tree)
        assert "configurable-http-proxy" in commands and "podman system service" in commands
        assert "cnbi_hub.service" in commands

        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=150) == 0, "".join(output.lines)[-5000:]
    finally:
        if demo.poll() is None:  # a failed assertion: still stop it the way a user would
            demo.send_signal(signal.SIGINT)
            try:
                demo.wait(timeout=150)
            except subprocess.TimeoutExpired:
                demo.kill()
                demo.wait()
    left = {pid: command_of(pid) for pid in tree if alive(pid)}
    assert left == {}, left
    assert demo_containers() == []
    assert "cnbi_hub demo stopped." in "".join(output.lines)


def test_make_demo_installs_only_what_the_hub_needs():
    """`make demo` installs the hub's extras (PodmanSpawner's dockerspawner, JupyterLab), not the
    test tools or KubeSpawner and kopf, which only `make test` needs."""
    dry_run = subprocess.run(["make", "-n", "demo"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert dry_run.returncode == 0, dry_run.stderr
    installs = [line for line in dry_run.stdout.splitlines() if "pip install" in line and "-e " in line]
    assert installs == [f'{REPO}/.venv/bin/python -m pip install -q -e ".[docker,lab]"'], installs
    dry_run = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert '-e ".[test,docker,kubernetes,lab]"' in dry_run.stdout
