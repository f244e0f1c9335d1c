"""Pytest plugin: a real in-process JupyterHub with the cnbi service as a hub-managed service.

The hub is jupyterhub.tests.mocking.MockHub (the real JupyterHub application with the PAM
authenticator replaced by one whose password is the user name), started once per session with
the configuration a hub admin gets from `cnbi_hub.hubconfig.configure`, behind the real
configurable-http-proxy. The cnbi service runs as its own process, started by the hub.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from jupyterhub import orm
from jupyterhub.tests.mocking import MockHub
from jupyterhub.tests.utils import add_user, public_url
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from traitlets.config import Config

from cnbi_hub.hubconfig import configure

ADMIN = "cnbi-admin-user"
CA_BUNDLE = os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
BASE_IMAGES = [
    {"image": "localhost/cnbi/notebook-base:py311-user", "displayName": "Notebook base (user-owned Python)"},
]


@dataclass
class Response:
    code: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class HubHandle:
    app: MockHub
    url: str  # public URL of the hub, ending in /

    @property
    def service_url(self) -> str:
        return self.url + "services/cnbi/"

    def token(self, name: str, scopes=None) -> str:
        """A real hub API token for user `name` (created if needed)."""
        user = orm.User.find(self.app.db, name) or add_user(self.app.db, self.app, name=name)
        user = self.app.users[user]
        return user.new_api_token(scopes=scopes, note="cnbi test")

    async def api(self, method: str, path: str, token: str | None = None, body=None, raw: bytes | None = None,
                  headers: dict | None = None, timeout: float = 30) -> Response:
        """Call the cnbi service through the hub's proxy."""
        all_headers = dict(headers or {})
        if token:
            all_headers["Authorization"] = f"token {token}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is None and method in ("POST", "PATCH", "PUT"):
            data = b""
        request = HTTPRequest(
            self.service_url + path.lstrip("/"),
            method=method,
            headers=all_headers,
            body=data,
            follow_redirects=False,
            request_timeout=timeout,
            allow_nonstandard_methods=True,
        )
        response = await AsyncHTTPClient().fetch(request, raise_error=False)
        if response.code == 599 and response.error:
            raise response.error
        return Response(response.code, dict(response.headers), response.body or b"")

    async def wait_for_service(self, timeout: float = 60) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                r = await self.api("GET", "health", timeout=5)
                if r.code == 200:
                    return
            except Exception:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("the cnbi service did not come up")
            await asyncio.sleep(0.2)


def hub_config(data_dir, **service_config) -> Config:
    c = Config()
    c.Authenticator.admin_users = {ADMIN}
    # the hub kills whatever proxy its pid file names: each hub keeps its own
    c.ConfigurableHTTPProxy.pid_file = str(Path(data_dir) / "jupyterhub-proxy.pid")
    c.JupyterHub.bind_url = "http://127.0.0.1:%d/" % _free_port()
    configure(
        c,
        url="http://127.0.0.1:%d" % _free_port(),
        service_config={
            "data_dir": str(data_dir),
            "base_images": BASE_IMAGES,
            "Reconciler": {"ca_bundle": CA_BUNDLE if os.path.exists(CA_BUNDLE) else "", "max_concurrent_builds": 2},
            **service_config,
        },
    )
    return c


async def start_quiet_hub(data_dir, wait_seconds: float = 60, **service_config) -> HubHandle:
    """A MockHub with the cnbi service outside pytest (the benchmarks), its own log quiet;
    stop it with `stop_hub`. One per process: JupyterHub's app is a singleton."""
    MockHub.clear_instance()
    app = MockHub.instance(config=hub_config(data_dir, **service_config))
    app.log.setLevel("WARNING")
    await app.initialize([])
    await app.start()
    handle = HubHandle(app=app, url=public_url(app))
    await handle.wait_for_service(timeout=wait_seconds)
    return handle


async def stop_hub(handle: HubHandle) -> None:
    await handle.app.stop()
    MockHub.clear_instance()


QUOTA_BYTES = 20_000_000_000

# the session hub's webhook secrets (tests sign deliveries with them)
GITHUB_WEBHOOK_SECRET = "cnbi-test-github-webhook-secret"
GITLAB_WEBHOOK_TOKEN = "cnbi-test-gitlab-webhook-token"


def _free_port() -> int:
    from jupyterhub.utils import random_port

    return random_port()


@pytest_asyncio.fixture(scope="session")
async def hub(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("cnbi-data")
    # the bytes quota is far above what the suites build; test_service goes over it on purpose
    config = hub_config(data_dir, max_images_per_user=5, max_bytes_per_user=QUOTA_BYTES, heartbeat_interval=1.0,
                        allowed_git_schemes=["https", "git", "http"], github_webhook_secret=GITHUB_WEBHOOK_SECRET,
                        gitlab_webhook_token=GITLAB_WEBHOOK_TOKEN)
    MockHub.clear_instance()
    app = MockHub.instance(config=config)
    await app.initialize([])
    await app.start()
    handle = HubHandle(app=app, url=public_url(app))
    handle.data_dir = data_dir
    await handle.wait_for_service()
    yield handle
    await app.stop()
    MockHub.clear_instance()


@pytest.fixture
def service_proc(hub):
    """The hub's handle on the running cnbi service process."""
    return hub.app._service_map["cnbi"]
