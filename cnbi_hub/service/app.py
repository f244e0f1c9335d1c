"""The `cnbi` JupyterHub service: a traitlets Application serving the image API.

Run by the hub as a managed service (`python -m cnbi_hub.service`), it reads the hub's
environment (JUPYTERHUB_SERVICE_URL, JUPYTERHUB_SERVICE_PREFIX, JUPYTERHUB_API_TOKEN) and
listens on 127.0.0.1 behind the hub's proxy.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
from urllib.parse import urlparse

from jupyterhub.services.auth import HubOAuth
from jupyterhub.utils import url_path_join
from tornado import web
from tornado.httpserver import HTTPServer
from traitlets import Any, Bool, Dict, Float, Integer, List, Type, Unicode, default, validate
from traitlets.config import Application, catch_config_error

from .. import __version__, model
from ..appconfig import load_layered_config
from ..controller.builders.base import Builder
from ..credentials import CredentialVault
from ..controller.imageaccess import ImageAccess
from ..controller.phases import PhaseWork
from ..controller.inuse import hub_servers_in_use
from ..controller.runner import EmbeddedRunner
from ..imageref import parse_image_reference
from ..store.base import ChangeBroadcaster
from . import handlers, pages

# Options that lived on the `Reconciler` section before it became PhaseWork + EmbeddedRunner
_LEGACY_RECONCILER_OPTIONS = {
    "max_concurrent_builds": "EmbeddedRunner",
    "keep_failed_contexts": "PodmanBuilder",
    "insecure_registries": "ImageAccess", "auth_file": "ImageAccess", "pull_secrets_dir": "ImageAccess",
}


def _service_url():
    return urlparse(os.environ.get("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:10101"))


class CNBIService(Application):
    name = "cnbi-service"
    description = "The cnbi JupyterHub service: build custom notebook images and spawn servers on them."
    version = __version__

    aliases = {
        "config": "CNBIService.config_file",
        "db-url": "CNBIService.db_url",
        "data-dir": "CNBIService.data_dir",
        "port": "CNBIService.port",
        "log-level": "Application.log_level",
    }
    flags = {
        "generate-config": (
            {"CNBIService": {"generate_config": True}},
            "Write a default config file (cnbi_config.py) with every option and its help, then exit.",
        ),
    }

    config_file = Unicode(
        "cnbi_config.py",
        help="The config file to load (Python, `c.CNBIService.<option> = ...`), if it exists.",
    ).tag(config=True)

    generate_config = Bool(False, help="Write the default config file and exit.").tag(config=True)

    ip = Unicode(
        help="""The address to listen on. Default: the host of $JUPYTERHUB_SERVICE_URL (127.0.0.1).

        Keep it on a loopback address: the hub's proxy is the only client that needs to reach it.
        """
    ).tag(config=True)

    @default("ip")
    def _default_ip(self):
        return _service_url().hostname or "127.0.0.1"

    port = Integer(help="The port to listen on. Default: the port of $JUPYTERHUB_SERVICE_URL.").tag(config=True)

    @default("port")
    def _default_port(self):
        return _service_url().port or 10101

    service_prefix = Unicode(
        help="The URL prefix the hub's proxy routes to this service. Default: $JUPYTERHUB_SERVICE_PREFIX."
    ).tag(config=True)

    @default("service_prefix")
    def _default_service_prefix(self):
        return os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/cnbi/")

    data_dir = Unicode(
        help="""Directory for the service's state: the SQLite database, build contexts and caches.

        Default: $CNBI_DATA_DIR, else `cnbi-data` in the working directory.
        """
    ).tag(config=True)

    @default("data_dir")
    def _default_data_dir(self):
        return os.environ.get("CNBI_DATA_DIR") or os.path.abspath("cnbi-data")

    db_url = Unicode(
        help="""SQLAlchemy URL of the image database (embedded mode).

        Default: a SQLite file `cnbi.sqlite` in `data_dir`. Postgres works too, e.g.
        `postgresql+psycopg://cnbi:secret@127.0.0.1/cnbi` (install the driver).
        """
    ).tag(config=True)

    @default("db_url")
    def _default_db_url(self):
        return "sqlite:///" + os.path.join(self.data_dir, "cnbi.sqlite")

    namespace = Unicode(
        "default", help="The namespace objects live in (the Kubernetes namespace in cluster mode)."
    ).tag(config=True)

    imagestream_namespaces = List(
        Unicode(),
        help="""Namespaces whose Open Data Hub notebook ImageStreams (`opendatahub.io/notebook-image:
        "true"`, e.g. images imported in the dashboard) are offered on the spawn form beside
        CustomNBImages, where the cluster serves `image.openshift.io/v1`. Open Data Hub keeps
        them in its applications namespace, e.g. `["opendatahub"]`. Default: `[namespace]` in
        cluster mode, none in embedded mode.""",
    ).tag(config=True)

    @default("imagestream_namespaces")
    def _default_imagestream_namespaces(self):
        # by name: importing the Kubernetes store needs the client, which embedded mode lacks
        in_cluster = any(f"{c.__module__}.{c.__name__}" == "cnbi_hub.store.kubernetes.KubernetesImageStore"
                         for c in self.store_class.__mro__)
        return [self.namespace] if in_cluster else []

    base_images = List(
        Dict(),
        help="""The base images users choose from for PackageList builds, shown in the Lab panel.

        Each entry: `{"image": "quay.io/jupyter/minimal-notebook:2024-10-07",
        "displayName": "Minimal notebook", "description": "Python 3.11, JupyterLab 4"}`.
        Optionally `"pythonVersion": "3.11"` so a `runtimeEnvironment` request can pick it.
        """,
    ).tag(config=True)

    @validate("base_images")
    def _check_base_images(self, proposal):
        checked = []
        for i, entry in enumerate(proposal["value"]):
            if "image" not in entry:
                raise ValueError(f"base_images[{i}] needs an 'image'")
            parse_image_reference(entry["image"])  # raises ValueError naming what is wrong
            checked.append(
                {
                    "image": entry["image"],
                    "displayName": entry.get("displayName") or entry["image"],
                    "description": entry.get("description", ""),
                    **({"pythonVersion": entry["pythonVersion"]} if "pythonVersion" in entry else {}),
                }
            )
        return checked

    named_servers = Bool(
        False,
        help="""Whether the hub allows named servers (`c.JupyterHub.allow_named_servers`).

        The Lab panel then starts a new server named after the image, leaving the one it runs
        in alone. `cnbi_hub.hubconfig.configure` copies the hub's setting here.""",
    ).tag(config=True)

    max_images_per_user = Integer(
        20, help="How many images one user may have at once; creating more answers 409."
    ).tag(config=True)

    max_bytes_per_user = Integer(
        0,
        help="""How many bytes one user's images may take, their current builds and the earlier
        builds kept (each build's own size, as `GET api/usage` sums them). At or over it, creating
        or rebuilding an image answers 409 saying how much is used. 0: no limit.""",
    ).tag(config=True)

    allowed_git_schemes = List(
        Unicode(),
        ["https"],
        help="""URL schemes allowed for GitRepository builds.

        https only by default: `ssh`, `git` and `file` reach places the admin may not expect
        (internal hosts, the service's own disk). Add them deliberately, e.g. ["https", "git"].
        """,
    ).tag(config=True)

    allow_package_urls = Bool(
        False,
        help="Allow direct URL requirements (`name @ https://...`) in packageVersions.",
    ).tag(config=True)

    heartbeat_interval = Float(
        15.0, help="Seconds between heartbeat comments on the events stream (keeps proxies from timing out)."
    ).tag(config=True)

    github_webhook_secret = Unicode(
        help="""The secret of this hub's GitHub push webhooks (the hook's "Secret"; payload URL
        `https://<hub>/services/cnbi/api/webhooks/github`, content type application/json). A push
        rebuilds every GitRepository image that tracks the pushed branch. Each delivery must be
        signed with it (`X-Hub-Signature-256`); unsigned or wrongly signed ones are refused with
        401. Empty: GitHub webhooks are off. Default: $CNBI_GITHUB_WEBHOOK_SECRET.""",
    ).tag(config=True)

    @default("github_webhook_secret")
    def _default_github_webhook_secret(self):
        return os.environ.get("CNBI_GITHUB_WEBHOOK_SECRET", "")

    gitlab_webhook_token = Unicode(
        help="""The secret token of this hub's GitLab push webhooks (`.../api/webhooks/gitlab`),
        sent by GitLab as `X-Gitlab-Token`; deliveries without it are refused with 401. Empty:
        GitLab webhooks are off. Default: $CNBI_GITLAB_WEBHOOK_TOKEN.""",
    ).tag(config=True)

    @default("gitlab_webhook_token")
    def _default_gitlab_webhook_token(self):
        return os.environ.get("CNBI_GITLAB_WEBHOOK_TOKEN", "")

    webhook_deliveries_remembered = Integer(
        10000,
        help="""How many webhook delivery ids are remembered, so a redelivered push (the same id)
        starts nothing. Kept in memory: a delivery repeated after a restart is recognised by its
        commit instead (an image already built at the pushed commit is not rebuilt).""",
    ).tag(config=True)

    restart_wait_seconds = Float(
        120.0,
        help="""How long the "restarting" page (where the Lab panel's "Restart on it" goes) waits
        for the hub to stop the user's server before it sends the browser to the spawn page.""",
    ).tag(config=True)

    restart_poll_seconds = Float(1.0, help="Seconds between the restarting page's questions to the hub.").tag(
        config=True)

    log_poll_interval = Float(
        2.0,
        help="""Cluster mode: seconds between reads of a building image's log (the operator
        writes it to the store) for the live log lines of `api/images/{name}/events`.""",
    ).tag(config=True)

    reconcile = Bool(
        True,
        help="""Run the reconciler (and so the builds) inside this service: embedded mode.
        In cluster mode the operator (`python -m cnbi_hub.controller`) does it: set False.""",
    ).tag(config=True)

    store_class = Type(
        "cnbi_hub.store.sqlite.SQLImageStore",
        klass=object,  # any class with the ImageStore methods (a Protocol cannot be a klass)
        help="""Where CustomNBImage objects live. Embedded mode: `cnbi_hub.store.sqlite.SQLImageStore`
        (SQLAlchemy, `db_url`). Cluster mode: `cnbi_hub.store.kubernetes.KubernetesImageStore`
        (custom resources in `namespace`; set `reconcile = False`, the operator builds).""",
    ).tag(config=True)

    builder_class = Type(
        "cnbi_hub.controller.builders.podman.PodmanBuilder",
        klass=Builder,
        help="""What builds images when this service reconciles (embedded mode): podman on this
        machine. Like BinderHub's `build_class`.""",
    ).tag(config=True)

    store = Any(allow_none=True)

    @property
    def validation_policy(self) -> model.ValidationPolicy:
        return model.ValidationPolicy(
            allowed_git_schemes=tuple(self.allowed_git_schemes),
            allow_package_urls=self.allow_package_urls,
        )

    @catch_config_error
    def initialize(self, argv=None):
        super().initialize(argv)
        if self.generate_config:
            return
        # $CNBI_SERVICE_CONFIG is set by cnbi_hub.hubconfig.configure(service_config=...)
        load_layered_config(self, "CNBI_SERVICE_CONFIG", upgrade_sections=_upgrade_legacy_sections)
        os.makedirs(self.data_dir, exist_ok=True)
        self.store = self.make_store()
        self.events = ChangeBroadcaster()
        self.builder = self.builder_class(parent=self)
        # check-image asks the registries (and, for localhost/ images, the builder) itself
        self.image_access = ImageAccess(parent=self, builder=self.builder)
        # embedded: a key of its own in data_dir; cluster: the admin gives the service and the
        # operator the same key ($CNBI_CRYPT_KEY), or credentials are refused (503)
        self.credential_vault = CredentialVault(parent=self)
        if self.reconcile and not self.credential_vault.key_file:
            self.credential_vault.key_file = os.path.join(self.data_dir, "credential.key")
        self.phases = PhaseWork(
            parent=self,
            vault=self.credential_vault,
            store=self.store,
            builder=self.builder,
            access=self.image_access,
            base_images=self.base_images,
            allowed_git_schemes=self.allowed_git_schemes,
            work_dir=os.path.join(self.data_dir, "builds"),
        )
        self.runner = EmbeddedRunner(parent=self, store=self.store, phases=self.phases, publish=self.events.publish)
        if not self.runner.max_bytes_per_user:
            self.runner.max_bytes_per_user = self.max_bytes_per_user
        # retention asks the hub which builds running servers use (the service's role grants
        # list:users and read:servers); without a hub to ask it removes nothing
        hub_api_url, hub_token = os.environ.get("JUPYTERHUB_API_URL"), os.environ.get("JUPYTERHUB_API_TOKEN")
        if hub_api_url and hub_token:
            self.runner.images_in_use = functools.partial(hub_servers_in_use, hub_api_url, hub_token)
        self.imagestreams = None
        if self.imagestream_namespaces:
            # cluster mode only: the demo's install has no Kubernetes client
            from ..imagestreams import ImageStreams

            self.imagestreams = ImageStreams(parent=self)
        self.hub_auth = HubOAuth(
            api_token=os.environ.get("JUPYTERHUB_API_TOKEN", ""),
            cache_max_age=60,
        )

    def make_store(self):
        """The store, given the options its class takes (db_url for SQL; namespace for both)."""
        from ..store.sqlite import SQLImageStore

        if issubclass(self.store_class, SQLImageStore):
            return self.store_class(self.db_url, namespace=self.namespace)
        return self.store_class(parent=self, namespace=self.namespace)

    def make_tornado_app(self) -> web.Application:
        def route(path):
            return url_path_join(self.service_prefix, path)

        name = r"(?P<name>[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)"
        routes = [
            (route("api/images"), handlers.ImagesHandler),
            (route(rf"api/images/{name}"), handlers.ImageHandler),
            (route(rf"api/images/{name}/events"), handlers.ImageEventsHandler),
            (route(rf"api/images/{name}/logs"), handlers.ImageArtifactHandler, {"kind": "log"}),
            (route(rf"api/images/{name}/lock"), handlers.ImageArtifactHandler, {"kind": "lock"}),
            (route(rf"api/images/{name}/rebuild"), handlers.RebuildHandler),
            (route(rf"api/images/{name}/generations"), handlers.GenerationsHandler),
            (route(rf"api/images/{name}/rollback"), handlers.RollbackHandler),
            (route(rf"api/images/{name}/started"), handlers.StartedHandler),
            (route("api/usage"), handlers.UsageHandler),
            (route("api/retention"), handlers.RetentionHandler),
            (route(rf"api/images/{name}/cancel"), handlers.CancelHandler),
            (route("api/base-images"), handlers.BaseImagesHandler),
            (route("api/credentials"), handlers.CredentialsHandler),
            (route(rf"api/credentials/{name}"), handlers.CredentialHandler),
            (route("api/imagestreams"), handlers.ImageStreamsHandler),
            (route(r"api/webhooks/(?P<provider>[a-z]+)"), handlers.WebhookHandler),
            (route("api/settings"), handlers.SettingsHandler),
            (route("api/check-image"), handlers.CheckImageHandler),
            (route("metrics"), handlers.MetricsHandler),
            (route("api/openapi.yaml"), handlers.OpenAPIHandler),
            (route("health"), handlers.HealthHandler),
            (route("oauth_callback"), handlers.OAuthCallbackHandler),
            (route(rf"images/{name}"), pages.ImagePage),
            (route(rf"restarting/{name}"), pages.RestartingPage),
            (self.service_prefix.rstrip("/") + r"/?", pages.ImageListPage),
        ]
        return web.Application(
            routes,
            cnbi_app=self,
            hub_auth=self.hub_auth,
            cookie_secret=os.urandom(32),
            default_handler_class=handlers.NotFoundHandler,
            login_url=self.hub_auth.login_url,
            log_function=self._log_request,
        )

    def _log_request(self, handler):
        status = handler.get_status()
        level = self.log.info if status < 400 else self.log.warning
        if handler.request.path.endswith("/health") and status < 400:
            level = self.log.debug
        level("%d %s %s %.1fms", status, handler.request.method, handlers.scrub_uri(handler.request.uri),
              1000 * handler.request.request_time())

    async def forward_store_events(self) -> None:
        """Copy the store's change feed onto the app's event bus (which also carries log lines)."""
        with self.store.watch() as changes:
            while True:
                event = await changes.get()
                self.events.publish((event.type, event.object))

    async def run(self) -> None:
        self.tornado_app = self.make_tornado_app()
        server = HTTPServer(self.tornado_app, xheaders=True)
        server.listen(self.port, self.ip)
        self.log.info("cnbi service %s listening on http://%s:%d%s", __version__, self.ip, self.port, self.service_prefix)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.store.start()
        forwarder = asyncio.create_task(self.forward_store_events())
        await asyncio.sleep(0)  # let the forwarder subscribe before builds start publishing
        if self.reconcile:
            await self.runner.start()
        await stop.wait()
        self.log.info("cnbi service stopping")
        await self.runner.stop()
        forwarder.cancel()
        server.stop()
        self.store.close()

    def start(self):
        if self.generate_config:
            self.write_default_config()
            return
        asyncio.run(self.run())

    def write_default_config(self) -> None:
        with open(self.config_file, "w") as f:
            f.write(self.generate_config_file())
        print(f"Wrote default config to {self.config_file}")


def _upgrade_legacy_sections(sections: dict, log) -> dict:
    """Config written for the `Reconciler` section (before it became PhaseWork and
    EmbeddedRunner) keeps working: each option goes to the class that has it now."""
    legacy = sections.pop("Reconciler", None)
    if not legacy:
        return sections
    log.warning("the Reconciler config section is now PhaseWork (builds), EmbeddedRunner (the queue) and "
                "ImageAccess (registries); moving %s", ", ".join(sorted(legacy)))
    for key, value in legacy.items():
        section = _LEGACY_RECONCILER_OPTIONS.get(key, "PhaseWork")
        sections.setdefault(section, {}).setdefault(key, value)
    return sections


def main(argv=None):
    app = CNBIService.instance()
    app.initialize(argv)
    app.start()
