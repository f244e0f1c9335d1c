"""The jupyter_server extension forwarding {base_url}cnbi/api/ to the hub's cnbi service.

A real jupyter_server (ServerApp with the cnbi_hub extension enabled, on 127.0.0.1) talks to a
real tornado upstream on 127.0.0.1 that stands in for the cnbi service's HTTP surface: it records
each request and can emit a Server-Sent Events stream one event at a time, waiting for the test
between events, so the tests can prove the gateway relays chunks without buffering.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys

import pytest
import pytest_asyncio
from jupyter_server.serverapp import ServerApp
from tornado import httpserver, web
from tornado.httpclient import AsyncHTTPClient

from cnbi_hub import model
from cnbi_hub.serverextension import (
    EnvironmentHandler,
    RestartHandler,
    ServerInfoHandler,
    list_distributions,
    restart_plan,
)
from cnbi_hub.serverextension import (
    NOT_UNDER_HUB_MESSAGE,
    CNBIApiForwardHandler,
    CNBIServerExtension,
    default_service_url,
)

SERVER_TOKEN = "user-server-login-token"
HUB_API_TOKEN = "the-servers-hub-api-token"
BASE_URL = "/user/alice/"


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Upstream:
    """What the fake-free upstream saw and the switches the tests flip."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.release_second_event = asyncio.Event()
        self.stream_client_gone = asyncio.Event()
        self.url = ""
        self.manifest: list[dict] = []


class RecordingHandler(web.RequestHandler):
    def initialize(self, upstream: Upstream) -> None:
        self.upstream = upstream

    def record(self) -> None:
        self.upstream.requests.append(
            {
                "method": self.request.method,
                "path": self.request.path,
                "query": self.request.query,
                "body": self.request.body.decode(),
                "authorization": self.request.headers.get("Authorization"),
                "cookie": self.request.headers.get("Cookie"),
                "content_type": self.request.headers.get("Content-Type"),
            }
        )

    def answer(self) -> None:
        self.record()
        if self.get_query_argument("dryRun", "") == "true":
            self.set_status(422)
            self.set_header("Content-Type", "application/json")
            self.finish(
                {"message": "not a PEP 508 requirement: 'pandas>>2'", "field": "spec.packageVersions[1]"}
            )
            return
        self.set_status(201 if self.request.method == "POST" else 200)
        self.set_header("Content-Type", "application/json")
        self.set_header("X-Cnbi-Test", "passed-through")
        self.finish({"method": self.request.method, "echo": self.request.body.decode()})

    get = post = patch = delete = answer


class ImageManifestHandler(web.RequestHandler):
    """GET api/images/on-<x>: a Ready image whose manifest is `upstream.manifest`."""

    def initialize(self, upstream: Upstream) -> None:
        self.upstream = upstream

    def get(self, name: str) -> None:
        self.upstream.requests.append({"method": "GET", "path": self.request.path,
                                       "authorization": self.request.headers.get("Authorization")})
        self.finish({"metadata": {"name": name}, "status": {
            "phase": "Ready", "image": f"localhost/cnbi/{name}@sha256:" + "a" * 64, "packages": self.upstream.manifest}})


class SlowEventsHandler(web.RequestHandler):
    """An SSE stream: one event, then nothing until the test releases the second one."""

    def initialize(self, upstream: Upstream) -> None:
        self.upstream = upstream

    async def get(self, name: str) -> None:
        self.upstream.requests.append(
            {"method": "GET", "path": self.request.path, "authorization": self.request.headers.get("Authorization")}
        )
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        obj = {"metadata": {"name": name}, "status": {"phase": "Building"}}
        self.write(f"event: object\ndata: {json.dumps(obj)}\n\n")
        await self.flush()
        waiter = asyncio.ensure_future(self.upstream.release_second_event.wait())
        gone = asyncio.ensure_future(self.upstream.stream_client_gone.wait())
        await asyncio.wait([waiter, gone], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        gone.cancel()
        if self.upstream.stream_client_gone.is_set():
            return
        self.write('event: log\ndata: {"line": "STEP 2/5"}\n\n')
        self.write("event: deleted\ndata: {}\n\n")
        self.finish()

    def on_connection_close(self) -> None:
        self.upstream.stream_client_gone.set()


@pytest_asyncio.fixture
async def upstream():
    state = Upstream()
    port = unused_port()
    app = web.Application(
        [
            (r"/services/cnbi/api/images/([^/]+)/events", SlowEventsHandler, {"upstream": state}),
            (r"/services/cnbi/api/images/(on-[a-z-]+)", ImageManifestHandler, {"upstream": state}),
            (r"/services/cnbi/api/.*", RecordingHandler, {"upstream": state}),
        ]
    )
    server = httpserver.HTTPServer(app)
    server.listen(port, "127.0.0.1")
    state.url = f"http://127.0.0.1:{port}/services/cnbi/"
    yield state
    server.stop()
    await server.close_all_connections()


@pytest.fixture
def isolated_jupyter_env(tmp_path, monkeypatch):
    """No user/system Jupyter config and no hub environment leak into the server under test."""
    for var in ("CNBI_SERVICE_URL", "JUPYTERHUB_API_TOKEN", "JUPYTERHUB_API_URL", "CNBI_IMAGE", "JUPYTERHUB_USER",
                "JUPYTERHUB_SERVER_NAME", "JUPYTERHUB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    for var, sub in (
        ("JUPYTER_CONFIG_DIR", "config"),
        ("JUPYTER_DATA_DIR", "data"),
        ("JUPYTER_RUNTIME_DIR", "runtime"),
    ):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("JUPYTER_NO_CONFIG", "1")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "root").mkdir()
    return tmp_path


@pytest_asyncio.fixture
async def start_server(isolated_jupyter_env):
    """Factory: a real jupyter_server with the cnbi_hub extension, listening on 127.0.0.1."""
    apps: list[ServerApp] = []

    async def _start(extension_config: dict | None = None) -> str:
        # The port is free when picked, but another process (a hub's server, podman) may take
        # it before ServerApp binds: then ServerApp exits, and we try a fresh port.
        for _ in range(5):
            try:
                return await _start_on(unused_port(), extension_config)
            except SystemExit:
                CNBIServerExtension.clear_instance()
                ServerApp.clear_instance()
        raise RuntimeError("no free port for the test server after 5 tries")

    async def _start_on(port: int, extension_config: dict | None) -> str:
        config = {
            "ServerApp": {"jpserver_extensions": {"cnbi_hub": True}},
            "IdentityProvider": {"token": SERVER_TOKEN},
        }
        if extension_config:
            config["CNBIServerExtension"] = extension_config
        from traitlets.config import Config

        app = ServerApp(
            config=Config(config),
            ip="127.0.0.1",
            port=port,
            port_retries=0,
            open_browser=False,
            base_url=BASE_URL,
            root_dir=str(isolated_jupyter_env / "root"),
        )
        app.init_signal = lambda: None
        # ServerApp binds its socket in a loop callback, exiting if the port was taken meanwhile
        bound = asyncio.get_running_loop().create_future()

        def bind_and_tell():
            try:
                ServerApp._bind_http_server(app)
            except SystemExit as e:
                bound.set_exception(e)
                return
            bound.set_result(True)

        app._bind_http_server = bind_and_tell
        app.initialize(argv=[], new_httpserver=True)
        for _ in range(100):
            if bound.done():
                break
            await asyncio.sleep(0.02)
        if bound.done() and bound.exception():
            raise bound.exception()
        apps.append(app)
        for _ in range(100):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except ConnectionRefusedError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            break
        return f"http://127.0.0.1:{port}{BASE_URL}"

    yield _start
    for app in apps:
        await app._cleanup()
    CNBIServerExtension.clear_instance()
    ServerApp.clear_instance()


async def fetch(url: str, token: str | None = SERVER_TOKEN, **kwargs):
    headers = kwargs.pop("headers", {})
    if token:
        headers["Authorization"] = f"token {token}"
    return await AsyncHTTPClient().fetch(url, headers=headers, raise_error=False, **kwargs)


# -- the default service URL -----------------------------------------------------------------


def test_default_service_url_prefers_cnbi_service_url():
    env = {
        "CNBI_SERVICE_URL": "http://127.0.0.1:10101/services/cnbi",
        "JUPYTERHUB_API_URL": "http://127.0.0.1:8081/hub/api",
    }
    assert default_service_url(env) == "http://127.0.0.1:10101/services/cnbi/"


def test_default_service_url_from_hub_api_url():
    env = {"JUPYTERHUB_API_URL": "http://127.0.0.1:8081/prefix/hub/api"}
    assert default_service_url(env) == "http://127.0.0.1:8081/prefix/services/cnbi/"


def test_default_service_url_empty_outside_hub():
    assert default_service_url({}) == ""
    assert default_service_url({"JUPYTERHUB_API_URL": "http://127.0.0.1:8081/elsewhere"}) == ""


# -- forwarding ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_get_forwards_with_the_servers_hub_token(start_server, upstream, monkeypatch):
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", HUB_API_TOKEN)
    base = await start_server({"service_url": upstream.url})
    r = await fetch(base + "cnbi/api/images?phase=Ready", headers={"Cookie": "secret-session=1"})
    assert r.code == 200
    assert json.loads(r.body) == {"method": "GET", "echo": ""}
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.headers["X-Cnbi-Test"] == "passed-through"
    (seen,) = upstream.requests
    assert seen["path"] == "/services/cnbi/api/images"
    assert seen["query"] == "phase=Ready"
    assert seen["authorization"] == f"token {HUB_API_TOKEN}"
    # the browser's cookies belong to the user's server, never to the service
    assert seen["cookie"] is None


@pytest.mark.asyncio
async def test_post_patch_delete_forward_body_and_status(start_server, upstream):
    base = await start_server({"service_url": upstream.url, "api_token": HUB_API_TOKEN})
    body = json.dumps({"spec": {"buildType": "PackageList", "packageVersions": ["pandas"]}})
    r = await fetch(
        base + "cnbi/api/images", method="POST", body=body, headers={"Content-Type": "application/json"}
    )
    assert r.code == 201
    assert json.loads(r.body)["echo"] == body
    r = await fetch(base + "cnbi/api/images/my-image", method="PATCH", body='{"shared": true}')
    assert r.code == 200 and json.loads(r.body)["method"] == "PATCH"
    r = await fetch(base + "cnbi/api/images/my-image", method="DELETE")
    assert r.code == 200 and json.loads(r.body)["method"] == "DELETE"
    assert [(q["method"], q["path"]) for q in upstream.requests] == [
        ("POST", "/services/cnbi/api/images"),
        ("PATCH", "/services/cnbi/api/images/my-image"),
        ("DELETE", "/services/cnbi/api/images/my-image"),
    ]
    assert upstream.requests[0]["content_type"] == "application/json"
    assert all(q["authorization"] == f"token {HUB_API_TOKEN}" for q in upstream.requests)


@pytest.mark.asyncio
async def test_error_status_and_json_body_pass_through(start_server, upstream):
    base = await start_server({"service_url": upstream.url})
    r = await fetch(
        base + "cnbi/api/images?dryRun=true", method="POST", body='{"spec": {}}'
    )
    assert r.code == 422
    assert json.loads(r.body) == {
        "message": "not a PEP 508 requirement: 'pandas>>2'",
        "field": "spec.packageVersions[1]",
    }
    assert upstream.requests[0]["query"] == "dryRun=true"


@pytest.mark.asyncio
async def test_event_stream_is_relayed_before_upstream_finishes(start_server, upstream):
    base = await start_server({"service_url": upstream.url})
    chunks: asyncio.Queue[bytes] = asyncio.Queue()
    request = asyncio.ensure_future(
        fetch(base + "cnbi/api/images/my-image/events", streaming_callback=chunks.put_nowait, request_timeout=30)
    )
    received = b""
    # The upstream sends the second event only once the first has reached this client: a
    # buffering gateway would never deliver it, and this wait would time out.
    while b"\n\n" not in received:
        received += await asyncio.wait_for(chunks.get(), timeout=10)
    assert received.startswith(b"event: object\ndata: ")
    assert json.loads(received.split(b"data: ", 1)[1].split(b"\n")[0])["status"]["phase"] == "Building"
    assert not request.done()
    upstream.release_second_event.set()
    response = await asyncio.wait_for(request, timeout=10)
    while not chunks.empty():
        received += chunks.get_nowait()
    assert response.code == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    assert b'event: log\ndata: {"line": "STEP 2/5"}\n\n' in received
    assert received.endswith(b"event: deleted\ndata: {}\n\n")


@pytest.mark.asyncio
async def test_client_disconnect_closes_the_upstream_stream(start_server, upstream):
    base = await start_server({"service_url": upstream.url})
    host, port = base.split("//")[1].split("/")[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        (
            f"GET {BASE_URL}cnbi/api/images/my-image/events HTTP/1.1\r\n"
            f"Host: {host}:{port}\r\nAuthorization: token {SERVER_TOKEN}\r\n"
            "Accept: text/event-stream\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"event: object"), timeout=10)
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()
    # No heartbeat or further event is due, so only the gateway's abort can end the upstream.
    await asyncio.wait_for(upstream.stream_client_gone.wait(), timeout=10)
    assert not upstream.release_second_event.is_set()


@pytest.mark.asyncio
async def test_dot_segments_are_refused(start_server, upstream):
    base = await start_server({"service_url": upstream.url})
    r = await fetch(base + "cnbi/api/images/%2e%2e/%2e%2e/hub/api/users")
    assert r.code == 400
    assert "dot segments" in json.loads(r.body)["message"]
    assert upstream.requests == []


@pytest.mark.asyncio
async def test_unreachable_service_is_502_with_a_message(start_server):
    dead = f"http://127.0.0.1:{unused_port()}/services/cnbi/"
    base = await start_server({"service_url": dead})
    r = await fetch(base + "cnbi/api/images")
    assert r.code == 502
    assert json.loads(r.body)["message"].startswith(f"the cnbi service at {dead} is unreachable")


# -- outside JupyterHub and without credentials --------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PATCH", "DELETE"])
@pytest.mark.asyncio
async def test_outside_jupyterhub_every_route_is_503(start_server, method):
    base = await start_server()
    body = "{}" if method in ("POST", "PATCH") else None
    r = await fetch(base + "cnbi/api/images/x", method=method, body=body)
    assert r.code == 503
    assert json.loads(r.body)["message"] == NOT_UNDER_HUB_MESSAGE


def extension_handlers() -> list[tuple[str, type]]:
    ext = CNBIServerExtension()
    ext.initialize_handlers()
    return [(pattern, handler) for pattern, handler, *_ in ext.handlers]


def test_extension_handlers_are_the_forwarder_and_three_local_routes():
    handlers = extension_handlers()
    assert handlers == [
        (r"/cnbi/api/(.*)", CNBIApiForwardHandler),
        (r"/cnbi/server-info", ServerInfoHandler),
        (r"/cnbi/environment", EnvironmentHandler),
        (r"/cnbi/restart", RestartHandler),
    ]


@pytest.mark.asyncio
async def test_every_handler_method_requires_authentication(start_server, upstream):
    base = await start_server({"service_url": upstream.url})
    checked = 0
    for pattern, handler in extension_handlers():
        path = pattern.lstrip("/").replace("(.*)", "images/x")
        for method in ("GET", "POST", "PATCH", "PUT", "DELETE"):
            if getattr(handler, method.lower()) is getattr(web.RequestHandler, method.lower()):
                continue
            body = "{}" if method in ("POST", "PATCH", "PUT") else None
            r = await fetch(base + path, token=None, method=method, body=body)
            assert r.code == 403, (method, path, r.code)
            r = await fetch(base + path, token="wrong-token", method=method, body=body)
            assert r.code == 403, (method, path, r.code)
            checked += 1
    assert checked == 8
    assert upstream.requests == []


def test_extension_is_enabled_by_the_shipped_server_config():
    from pathlib import Path

    shipped = Path(__file__).parent.parent / "jupyter-config" / "server-config" / "cnbi_hub.json"
    assert json.loads(shipped.read_text()) == {"ServerApp": {"jpserver_extensions": {"cnbi_hub": True}}}
    import cnbi_hub

    (point,) = cnbi_hub._jupyter_server_extension_points()
    assert point["app"] is CNBIServerExtension
    assert cnbi_hub._jupyter_labextension_paths() == [{"src": "labextension", "dest": "cnbi-hub"}]



@pytest.mark.asyncio
async def test_servers_own_auth_arguments_are_not_forwarded(start_server, upstream):
    # The Lab panel's EventSource authenticates with ?_xsrf= (and ?token= outside a hub);
    # those are this server's credentials, not the service's.
    base = await start_server({"service_url": upstream.url, "api_token": HUB_API_TOKEN})
    r = await fetch(base + f"cnbi/api/images?phase=Ready&token={SERVER_TOKEN}&_xsrf=abc%7C1&owner=a+b")
    assert r.code == 200
    (seen,) = upstream.requests
    assert seen["query"] == "phase=Ready&owner=a+b"
    assert seen["authorization"] == f"token {HUB_API_TOKEN}"


def test_forwarded_query_keeps_everything_else_as_sent():
    from cnbi_hub.serverextension import forwarded_query

    assert forwarded_query("phase=Ready&dryRun=true") == "phase=Ready&dryRun=true"
    assert forwarded_query("_xsrf=2%7Cabc") == ""
    assert forwarded_query("xtoken=1&token=2") == "xtoken=1"


@pytest.mark.asyncio
async def test_server_info_names_the_image_the_server_runs_on(start_server, upstream, monkeypatch):
    monkeypatch.setenv("CNBI_IMAGE", "pandas-x7k2p")
    monkeypatch.setenv("JUPYTER_IMAGE", "localhost/cnbi/pandas-x7k2p@sha256:" + "b" * 64)
    base = await start_server({"service_url": upstream.url})
    r = await fetch(base + "cnbi/server-info")
    assert r.code == 200
    assert json.loads(r.body) == {"cnbiImage": "pandas-x7k2p", "jupyterImage": "localhost/cnbi/pandas-x7k2p@sha256:" + "b" * 64,
                                  "serverName": ""}
    assert (await fetch(base + "cnbi/server-info", token=None)).code == 403


@pytest.mark.asyncio
async def test_environment_lists_what_was_installed_over_the_images_manifest(start_server, upstream, monkeypatch):
    """The image's manifest lacks one package this environment has and pins another one at an
    older version: saving the environment pins exactly those two."""
    installed = list_distributions(sys.executable)
    by_name = {p["name"].lower(): p for p in installed}
    added, changed = by_name["tabulate"] if "tabulate" in by_name else by_name["pyyaml"], by_name["packaging"]
    upstream.manifest = [
        {"name": p["name"], "version": "0.0.1" if p is changed else p["version"], "visible": False}
        for p in installed if p is not added
    ] + [{"name": "only-in-the-image", "version": "1.0", "visible": True}]
    monkeypatch.setenv("CNBI_IMAGE", "on-built")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "the-servers-hub-token")
    base = await start_server({"service_url": upstream.url})
    r = await fetch(base + "cnbi/environment")
    assert r.code == 200, r.body
    body = json.loads(r.body)
    assert body["baseline"] == "manifest" and body["cnbiImage"] == "on-built"
    assert body["baseImage"] == "localhost/cnbi/on-built@sha256:" + "a" * 64  # the image by digest
    assert body["added"] == [{"name": added["name"], "version": added["version"]}]
    assert body["changed"] == [{"name": changed["name"], "from": "0.0.1", "to": changed["version"]}]
    assert body["removed"] == [{"name": "only-in-the-image", "version": "1.0"}]
    assert sorted(body["requirements"]) == sorted(
        [f"{added['name']}=={added['version']}", f"{changed['name']}=={changed['version']}"])
    assert upstream.requests[-1]["authorization"] == "token the-servers-hub-token"


@pytest.mark.asyncio
async def test_environment_of_a_server_on_another_image_compares_with_its_start(start_server, upstream, monkeypatch):
    monkeypatch.delenv("CNBI_IMAGE", raising=False)
    monkeypatch.setenv("JUPYTER_IMAGE_SPEC", "quay.io/jupyter/minimal-notebook:2024-10-07")
    base = await start_server({"service_url": upstream.url})
    r = await fetch(base + "cnbi/environment")
    assert r.code == 200, r.body
    body = json.loads(r.body)
    assert body["baseline"] == "startup" and body["baseImage"] == "quay.io/jupyter/minimal-notebook:2024-10-07"
    assert body["added"] == [] and body["changed"] == [] and body["requirements"] == []


@pytest.mark.asyncio
async def test_environment_without_a_known_image_is_409_with_a_message(start_server, upstream, monkeypatch):
    for var in ("CNBI_IMAGE", "JUPYTER_IMAGE", "JUPYTER_IMAGE_SPEC"):
        monkeypatch.delenv(var, raising=False)
    base = await start_server({"service_url": upstream.url})
    r = await fetch(base + "cnbi/environment")
    assert r.code == 409
    assert "image is not known" in json.loads(r.body)["message"]


# -- restart on the image's current build ------------------------------------------------------


def test_restart_plan_names_this_servers_stop_route_and_the_spawn_page():
    hub = {"CNBI_IMAGE": "pandas-x7k2p", "JUPYTERHUB_API_URL": "http://127.0.0.1:8081/hub/api",
           "JUPYTERHUB_USER": "al ice", "JUPYTERHUB_API_TOKEN": "t", "JUPYTERHUB_BASE_URL": "/jh/"}
    assert restart_plan(hub) == {
        "stopUrl": "http://127.0.0.1:8081/hub/api/users/al%20ice/server",
        "nextUrl": "/jh/services/cnbi/restarting/pandas-x7k2p?server="}
    named = restart_plan({**hub, "JUPYTERHUB_SERVER_NAME": "pandas-x7k2p"})
    assert named["stopUrl"].endswith("/users/al%20ice/servers/pandas-x7k2p")
    assert named["nextUrl"] == "/jh/services/cnbi/restarting/pandas-x7k2p?server=pandas-x7k2p"
    with pytest.raises(ValueError, match="does not run on an Image Builder image"):
        restart_plan({**hub, "CNBI_IMAGE": ""})
    with pytest.raises(ValueError, match="not running under JupyterHub"):
        restart_plan({**hub, "JUPYTERHUB_API_TOKEN": ""})


@pytest.mark.asyncio
async def test_restart_answers_first_then_asks_the_hub_to_stop_this_server(start_server, upstream, monkeypatch):
    """The hub API is the recording upstream: the server's own token asks it to stop the server."""
    monkeypatch.setenv("CNBI_IMAGE", "pandas-x7k2p")
    monkeypatch.setenv("JUPYTERHUB_USER", "alice")
    monkeypatch.setenv("JUPYTERHUB_SERVER_NAME", "pandas-x7k2p")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", HUB_API_TOKEN)
    monkeypatch.setenv("JUPYTERHUB_API_URL", upstream.url + "api/hub-api")
    base = await start_server({"service_url": upstream.url})
    r = await fetch(base + "cnbi/restart", method="POST", body="{}")
    assert r.code == 202, r.body
    assert json.loads(r.body) == {"nextUrl": "/services/cnbi/restarting/pandas-x7k2p?server=pandas-x7k2p"}
    assert [q for q in upstream.requests if q["method"] == "DELETE"] == []  # the answer went first
    for _ in range(50):
        deletes = [q for q in upstream.requests if q["method"] == "DELETE"]
        if deletes:
            break
        await asyncio.sleep(0.05)
    assert [(q["path"], q["authorization"]) for q in deletes] == [
        ("/services/cnbi/api/hub-api/users/alice/servers/pandas-x7k2p", f"token {HUB_API_TOKEN}")]


@pytest.mark.asyncio
async def test_restart_of_a_server_on_another_image_is_409_and_stops_nothing(start_server, upstream, monkeypatch):
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", HUB_API_TOKEN)
    base = await start_server({"service_url": upstream.url})
    r = await fetch(base + "cnbi/restart", method="POST", body="{}")
    assert r.code == 409 and "Image Builder image" in json.loads(r.body)["message"]
    await asyncio.sleep(0.7)
    assert [q for q in upstream.requests if q["method"] == "DELETE"] == []


async def test_cookie_authenticated_writes_need_the_xsrf_token(start_server, upstream):
    """In a browser the panel's writes carry the server's login cookie: one without the XSRF
    token (what another site's page can make the browser send) is refused and never forwarded."""
    import requests

    base = await start_server({"service_url": upstream.url})
    session = requests.Session()
    assert (await asyncio.to_thread(session.get, base + "login", timeout=30)).status_code == 200
    xsrf = session.cookies.get("_xsrf")
    login = await asyncio.to_thread(session.post, base + "login", data={"password": SERVER_TOKEN, "_xsrf": xsrf},
                                    timeout=30, allow_redirects=False)
    assert login.status_code == 302 and any(c.name.startswith("username-") for c in session.cookies), login.text[:300]
    for method in ("POST", "PATCH", "DELETE"):
        path = "cnbi/api/images" if method == "POST" else "cnbi/api/images/x"
        forged = await asyncio.to_thread(session.request, method, base + path, json={}, timeout=30)
        assert forged.status_code == 403, (method, forged.text[:200])
    assert upstream.requests == []
    sent = await asyncio.to_thread(session.post, base + "cnbi/api/images", json={"spec": {}}, timeout=30,
                                   headers={"X-XSRFToken": xsrf})
    assert sent.status_code < 300, sent.text[:200]
    assert [r["method"] for r in upstream.requests] == ["POST"]
    assert upstream.requests[0]["cookie"] is None  # the browser's cookies stay with the server


async def test_the_forwarded_api_fuzzed_through_a_server_gets_no_5xx_and_matches_the_description(
        start_server, hub, tmp_path):
    """The same fuzzing as the service's own (tests/test_fuzz_api.py), through a real server's
    `cnbi/` forwarding to the session hub's real service: the forwarder adds no 5xx and changes
    no answer, for generated paths, names, queries and bodies."""
    from pathlib import Path

    from tests.test_fuzz_api import run_schemathesis

    user = "fuzz-forwarded"
    base = await start_server({"service_url": hub.service_url, "api_token": hub.token(user)})
    logs = Path(__file__).resolve().parent.parent / "test-output"
    logs.mkdir(exist_ok=True)
    # an image of the server's user, made through the server, so one image's routes reach past 404
    made = await fetch(base + "cnbi/api/images", method="POST", body=json.dumps({
        "spec": {"buildType": "ImageImport", "fromImage": "localhost/cnbi/notebook-base:py311-user"}}))
    assert made.code == 201, made.body
    target = json.loads(made.body)["metadata"]["name"]
    # the server forwards `cnbi/api/` only: the service's health, metrics and OAuth pages are the hub's business
    only_the_api = ("--include-path-regex", "^/api/")
    runs = {
        "own image": await run_schemathesis(base + "cnbi/", SERVER_TOKEN, logs / "fuzz-api-forwarded-own-image.log",
                                            *only_the_api, "--exclude-method", "DELETE",
                                            config=f'[parameters]\n"path.name" = "{target}"\n'),
        "generated": await run_schemathesis(base + "cnbi/", SERVER_TOKEN, logs / "fuzz-api-forwarded.log",
                                            *only_the_api),
    }
    for what, run in runs.items():
        cases = run["test_cases"]
        print("forwarded", what, cases, run["operations"])
        assert run["complete"] and cases["with_failures"] == 0, (what, run)
        assert run["operations"]["tested"] >= 20 and cases["generated"] >= 10 * run["operations"]["tested"], run
    # what the fuzzer made through the server is the server's user's, whole; then it goes
    listed = json.loads((await fetch(base + "cnbi/api/images")).body)["items"]
    for obj in listed:
        assert model.creator_of(obj) == user, obj
        assert (await fetch(base + f"cnbi/api/images/{obj['metadata']['name']}", method="DELETE")).code in (200, 204)
