"""jupyter_server extension: the Image Builder's same-origin gateway to the hub's cnbi service.

The Lab panel talks to ``{base_url}cnbi/api/...`` on the user's own server; this extension forwards
each call to ``{service_url}api/...`` with the server's ``JUPYTERHUB_API_TOKEN``, so the browser
never needs a token for the service and never makes a cross-origin request.

Every response is relayed chunk by chunk as it arrives (``streaming_callback`` + ``flush``), which
is what keeps the Server-Sent Events of ``api/images/{name}/events`` live; when the browser goes
away the upstream connection is closed at once instead of at the next heartbeat.
"""

from __future__ import annotations

import asyncio
import json
import os
import posixpath
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from urllib.parse import parse_qsl, quote, unquote, urlencode

from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.application import ExtensionApp
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import httputil, web
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.iostream import StreamClosedError
from tornado.simple_httpclient import SimpleAsyncHTTPClient, _HTTPConnection
from traitlets import Bool, Float, Unicode, default

from ._version import __version__
from .environment import PIP_LIST_PROGRAM, environment_difference

NOT_UNDER_HUB_MESSAGE = (
    "not running under JupyterHub: the Image Builder needs the hub's cnbi service"
)

# Headers that describe one hop of a connection, never the resource (RFC 9110 section 7.6.1),
# plus the ones tornado computes itself for the response it writes.
HOP_BY_HOP_HEADERS = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Content-Length",
        "Content-Encoding",
        "Server",
        "Date",
        "Set-Cookie",
    )
)

# Request headers worth passing on; cookies and the browser's credentials are for this server,
# not for the service.
FORWARDED_REQUEST_HEADERS = ("Accept", "Content-Type", "Last-Event-ID", "Cache-Control")


# Query arguments that authenticate the browser to this server (EventSource cannot send headers,
# so the Lab panel puts them in the URL); the service gets the server's own token instead.
SERVER_AUTH_QUERY_ARGUMENTS = frozenset(("_xsrf", "token"))


def forwarded_query(query: str) -> str:
    """The query string to pass on, without this server's own authentication arguments."""
    if not any(f"{name}=" in query for name in SERVER_AUTH_QUERY_ARGUMENTS):
        return query
    kept = [
        (name, value)
        for name, value in parse_qsl(query, keep_blank_values=True)
        if name not in SERVER_AUTH_QUERY_ARGUMENTS
    ]
    return urlencode(kept)


def default_service_url(environ: dict[str, str]) -> str:
    """Where the hub's cnbi service answers, as seen from this single-user server.

    ``CNBI_SERVICE_URL`` wins (set it through ``c.Spawner.environment`` when the service is not
    reachable on the hub's address, e.g. a service with its own ``url``); otherwise the hub API
    URL with ``/hub/api`` replaced by ``/services/cnbi/``. Empty when neither is known.
    """
    explicit = environ.get("CNBI_SERVICE_URL", "").strip()
    if explicit:
        return explicit if explicit.endswith("/") else explicit + "/"
    api_url = environ.get("JUPYTERHUB_API_URL", "").strip().rstrip("/")
    if api_url.endswith("/hub/api"):
        return api_url[: -len("/hub/api")] + "/services/cnbi/"
    return ""


class _TrackedConnection(_HTTPConnection):
    """tornado's client connection, remembered by its client so the stream can be closed."""

    def __init__(self, client, *args, **kwargs):
        client.open_connections.append(self)
        super().__init__(client, *args, **kwargs)


class CancellableHTTPClient(SimpleAsyncHTTPClient):
    """A one-request tornado client whose in-flight connection can be aborted.

    ``AsyncHTTPClient.fetch`` has no cancel; closing the connection's ``IOStream`` ends the
    upstream request immediately (the fetch then fails with ``HTTPStreamClosedError``).
    """

    def initialize(self, *args, **kwargs):  # noqa: D102
        super().initialize(*args, **kwargs)
        self.open_connections: list[_HTTPConnection] = []

    def _connection_class(self):
        return _TrackedConnection

    def abort(self) -> None:
        """Close every connection this client has open."""
        for connection in self.open_connections:
            stream = getattr(connection, "stream", None)
            if stream is not None and not stream.closed():
                stream.close()


class CNBIApiForwardHandler(ExtensionHandlerMixin, APIHandler):
    """Forwards ``{base_url}cnbi/api/<path>`` to ``{service_url}api/<path>``."""

    _upstream_client: CancellableHTTPClient | None = None
    _client_gone = False

    @property
    def service_url(self) -> str:
        return self.extensionapp.service_url

    @property
    def api_token(self) -> str:
        return self.extensionapp.api_token

    def upstream_url(self) -> str:
        prefix = self.reverse_url_prefix()
        raw_path = self.request.path[len(prefix) :]
        # A dot segment (plain or percent-encoded) could climb out of the service's prefix on
        # the hub's proxy, so it is refused rather than passed on.
        segments = unquote(raw_path).split("/")
        if any(s in (".", "..") for s in segments) or posixpath.isabs(unquote(raw_path)):
            raise web.HTTPError(400, "invalid path: dot segments are not allowed")
        url = self.service_url + "api/" + raw_path
        query = forwarded_query(self.request.query)
        if query:
            url += "?" + query
        return url

    def reverse_url_prefix(self) -> str:
        return self.base_url.rstrip("/") + "/cnbi/api/"

    def check_available(self) -> None:
        if not self.service_url:
            raise web.HTTPError(503, NOT_UNDER_HUB_MESSAGE)

    def on_connection_close(self) -> None:
        self._client_gone = True
        if self._upstream_client is not None:
            self._upstream_client.abort()

    # -- relaying ------------------------------------------------------------------------------

    def _on_upstream_header(self, line: str) -> None:
        if self._client_gone:
            return
        if line.startswith("HTTP/"):
            start = httputil.parse_response_start_line(line.strip())
            # 1xx interim responses (100 Continue) are not the answer.
            if start.code >= 200:
                self.set_status(start.code, start.reason)
                self.clear_header("Content-Type")
            return
        if not line.strip():
            return
        name, _, value = line.partition(":")
        name = name.strip()
        if name.lower() in HOP_BY_HOP_HEADERS:
            return
        # tornado folds repeated headers; set_header keeps the last, which is enough for the
        # single-valued headers the service sends.
        self.set_header(name, value.strip())

    def _on_upstream_chunk(self, chunk: bytes) -> None:
        if self._client_gone:
            raise StreamClosedError()
        self.write(chunk)
        # Without an explicit flush tornado would hold SSE events until the handler finishes.
        self.flush()

    async def forward(self) -> None:
        self.check_available()
        url = self.upstream_url()
        headers = {
            name: self.request.headers[name]
            for name in FORWARDED_REQUEST_HEADERS
            if name in self.request.headers
        }
        if self.api_token:
            headers["Authorization"] = f"token {self.api_token}"
        body: bytes | None = self.request.body
        if self.request.method in ("POST", "PATCH", "PUT"):
            body = body or b""
        elif not body:
            body = None
        request = HTTPRequest(
            url,
            method=self.request.method,
            headers=headers,
            body=body,
            allow_nonstandard_methods=True,
            follow_redirects=False,
            connect_timeout=self.extensionapp.connect_timeout,
            # Event streams stay open for as long as the browser watches; 0 means no limit.
            request_timeout=0,
            header_callback=self._on_upstream_header,
            streaming_callback=self._on_upstream_chunk,
            decompress_response=False,
            validate_cert=self.extensionapp.validate_cert,
        )
        client = CancellableHTTPClient(force_instance=True)
        self._upstream_client = client
        try:
            response = await client.fetch(request, raise_error=False)
        except (StreamClosedError, HTTPClientError, OSError) as e:
            if self._client_gone:
                return
            if self._headers_written:
                # The answer already started; all that is left is to end it.
                self.log.warning("cnbi service stream %s ended: %s", url, e)
                self.finish()
                return
            raise web.HTTPError(
                502, f"the cnbi service at {self.service_url} is unreachable: {e}"
            ) from e
        finally:
            self._upstream_client = None
            client.close()
        if self._client_gone:
            return
        if response.code == 599:
            # tornado's code for "no HTTP response at all" (refused, reset, timed out).
            if self._headers_written:
                self.finish()
                return
            raise web.HTTPError(
                502,
                f"the cnbi service at {self.service_url} is unreachable: {response.error}",
            )
        self.finish()

    @web.authenticated
    async def get(self, path: str) -> None:
        await self.forward()

    @web.authenticated
    async def post(self, path: str) -> None:
        await self.forward()

    @web.authenticated
    async def patch(self, path: str) -> None:
        await self.forward()

    @web.authenticated
    async def put(self, path: str) -> None:
        await self.forward()

    @web.authenticated
    async def delete(self, path: str) -> None:
        await self.forward()


def list_distributions(python: str, timeout: float = 60) -> list[dict]:
    """`{name, version}` of every distribution `python` sees (its environment and user site)."""
    result = subprocess.run([python, "-c", PIP_LIST_PROGRAM], capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"listing packages failed: {result.stderr.strip()[-300:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def server_image_info(environ: dict[str, str]) -> dict:
    """Which image this server runs: the CustomNBImage's name (set by the cnbi spawner hooks) and
    the reference the spawner started (KubeSpawner and DockerSpawner set JUPYTER_IMAGE[_SPEC])."""
    return {
        "cnbiImage": environ.get("CNBI_IMAGE") or None,
        "jupyterImage": environ.get("JUPYTER_IMAGE") or environ.get("JUPYTER_IMAGE_SPEC") or None,
        "serverName": environ.get("JUPYTERHUB_SERVER_NAME", ""),
    }


class ServerInfoHandler(ExtensionHandlerMixin, APIHandler):
    """GET {base_url}cnbi/server-info: the image this server runs on (the Lab status bar shows it)."""

    @web.authenticated
    def get(self) -> None:
        self.finish(json.dumps(server_image_info(dict(os.environ))))


def restart_plan(environ: dict[str, str]) -> dict:
    """Where this server asks the hub to stop it (`stopUrl`, its own hub API route) and where the
    browser goes meanwhile (`nextUrl`: the cnbi service's page that waits for the stop, then
    sends it to the hub's spawn page with `opt-cnbi_image`); ValueError saying why when this
    server cannot do that."""
    image = environ.get("CNBI_IMAGE")
    if not image:
        raise ValueError("this server does not run on an Image Builder image")
    api_url, user = environ.get("JUPYTERHUB_API_URL", ""), environ.get("JUPYTERHUB_USER", "")
    if not api_url or not user or not environ.get("JUPYTERHUB_API_TOKEN"):
        raise ValueError(NOT_UNDER_HUB_MESSAGE)
    server = environ.get("JUPYTERHUB_SERVER_NAME", "")
    base = environ.get("JUPYTERHUB_BASE_URL", "/").rstrip("/")
    named = f"/{quote(server, safe='')}" if server else ""
    return {
        "stopUrl": f"{api_url.rstrip('/')}/users/{quote(user, safe='')}/" + (f"servers{named}" if server else "server"),
        # the cnbi service's page waits until the hub has stopped the server, then spawns it
        "nextUrl": f"{base}/services/cnbi/restarting/{quote(image, safe='')}?{urlencode({'server': server})}",
    }


class RestartHandler(ExtensionHandlerMixin, APIHandler):
    """POST {base_url}cnbi/restart: "Restart on it" when the image has a newer build. The answer
    (202, `nextUrl`) leaves first; then this server asks the hub to stop it, with its own token
    (configure() grants servers `delete:servers!server`: a server may stop itself, nothing else).
    The browser goes to `nextUrl`, from where the hub starts it again, on the image's current
    build, once it has stopped. The user's home is a volume: it is there again."""

    stop_delay = 0.5  # seconds: the answer reaches the browser before the server goes away

    @web.authenticated
    async def post(self) -> None:
        try:
            plan = restart_plan(dict(os.environ))
        except ValueError as e:
            self.set_status(409)
            self.finish(json.dumps({"message": str(e)}))
            return
        self.set_status(202)
        self.finish(json.dumps({"nextUrl": plan["nextUrl"]}))
        asyncio.get_running_loop().call_later(
            self.stop_delay, lambda: asyncio.ensure_future(self._stop(plan["stopUrl"])))

    async def _stop(self, url: str) -> None:
        request = HTTPRequest(url, method="DELETE",
                              headers={"Authorization": f"token {os.environ.get('JUPYTERHUB_API_TOKEN', '')}"})
        try:
            await AsyncHTTPClient().fetch(request)
            self.log.info("cnbi_hub: asked the hub to stop this server, to restart it on its image's current build")
        except Exception as e:  # the browser's spawn page says the server is still running
            self.log.error("cnbi_hub: the hub did not stop this server (%s): %s", url, e)


class EnvironmentHandler(ExtensionHandlerMixin, APIHandler):
    """GET {base_url}cnbi/environment: what the user installed into this running server since it
    started on its image, as pinned requirements for a new image on that image."""

    @web.authenticated
    async def get(self) -> None:
        app = self.extensionapp
        info = server_image_info(dict(os.environ))
        base_image = info["jupyterImage"]
        baseline, source = None, "startup"
        if info["cnbiImage"] and app.service_url:
            image = await self._image_from_service(info["cnbiImage"])
            if image is not None:
                status = image.get("status") or {}
                base_image = status.get("image") or base_image
                if status.get("packages"):
                    baseline, source = status["packages"], "manifest"
        if not base_image:
            raise web.HTTPError(409, "this server's image is not known (the spawner did not say which it is): "
                                     "there is nothing to build on")
        if baseline is None:
            try:
                baseline = await asyncio.wrap_future(app.startup_distributions)
            except Exception as e:
                raise web.HTTPError(500, f"the packages this server started with are not known: {e}")
        try:
            current = await asyncio.to_thread(list_distributions, app.environment_python)
        except (OSError, RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
            raise web.HTTPError(500, f"could not list this server's packages: {e}")
        difference = environment_difference(baseline, current)
        self.finish(json.dumps({"baseImage": base_image, "cnbiImage": info["cnbiImage"], "baseline": source,
                                **difference}))

    async def _image_from_service(self, name: str) -> dict | None:
        app = self.extensionapp
        request = HTTPRequest(
            app.service_url + "api/images/" + name,
            headers={"Authorization": f"token {app.api_token}", "Accept": "application/json"},
            connect_timeout=app.connect_timeout, request_timeout=30, validate_cert=app.validate_cert,
        )
        try:
            response = await SimpleAsyncHTTPClient().fetch(request)
            return json.loads(response.body)
        except Exception as e:  # the image was deleted, or the service is down: use the start-up list
            self.log.warning("cnbi_hub: could not read image %s from the service: %s", name, e)
            return None

    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = exc.log_message if isinstance(exc, web.HTTPError) and exc.log_message else self._reason
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"message": message}))


class CNBIServerExtension(ExtensionApp):
    """Serves the Image Builder's API gateway at ``{base_url}cnbi/api/``."""

    name = "cnbi_hub"
    description = "Image Builder gateway to the JupyterHub cnbi service"
    version = __version__
    load_other_extensions = True

    service_url = Unicode(
        help="""URL of the hub's cnbi service, ending in '/', e.g.
        'http://127.0.0.1:8000/services/cnbi/'. Calls to {base_url}cnbi/api/<path> go to
        {service_url}api/<path>.

        Default: the environment variable CNBI_SERVICE_URL if set, else JUPYTERHUB_API_URL with
        '/hub/api' replaced by '/services/cnbi/'. Empty outside JupyterHub, and then every
        route answers 503.
        """,
    ).tag(config=True)

    @default("service_url")
    def _default_service_url(self) -> str:
        return default_service_url(dict(os.environ))

    api_token = Unicode(
        help="""Token sent to the cnbi service as 'Authorization: token <api_token>'.

        Default: JUPYTERHUB_API_TOKEN, the single-user server's own hub token, so the service
        sees the request as coming from this server's user.
        """,
    ).tag(config=True)

    @default("api_token")
    def _default_api_token(self) -> str:
        return os.environ.get("JUPYTERHUB_API_TOKEN", "")

    connect_timeout = Float(
        10.0,
        help="Seconds to wait for a connection to the cnbi service before answering 502.",
    ).tag(config=True)

    validate_cert = Bool(
        True,
        help="""Whether to verify the cnbi service's TLS certificate. Turn off only for a hub
        using internal SSL with a self-signed CA that is not in the system bundle.
        """,
    ).tag(config=True)

    environment_python = Unicode(
        help="""The Python whose packages "Save this environment as an image" compares with the
        image's: where the user's `pip install` goes. Default: this server's own Python, which is
        the kernel's in notebook images (one environment for server, kernel and terminal).""",
    ).tag(config=True)

    @default("environment_python")
    def _default_environment_python(self) -> str:
        return sys.executable

    startup_distributions: Future

    def initialize_settings(self) -> None:
        # what the server started with: the baseline for servers on images that are not
        # CustomNBImages (those have a manifest); listed in a thread so start-up does not wait
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cnbi-startup")
        self.startup_distributions = pool.submit(list_distributions, self.environment_python)
        pool.shutdown(wait=False)
        if self.service_url and not self.service_url.endswith("/"):
            self.service_url += "/"
        if self.service_url:
            self.log.info("cnbi_hub: forwarding %scnbi/api/ to %sapi/", self.serverapp.base_url, self.service_url)
        else:
            self.log.info("cnbi_hub: %s", NOT_UNDER_HUB_MESSAGE)

    def initialize_handlers(self) -> None:
        self.handlers.append((r"/cnbi/api/(.*)", CNBIApiForwardHandler))
        self.handlers.append((r"/cnbi/server-info", ServerInfoHandler))
        self.handlers.append((r"/cnbi/environment", EnvironmentHandler))
        self.handlers.append((r"/cnbi/restart", RestartHandler))
