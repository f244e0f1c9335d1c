"""`python -m cnbi_hub.controller`: cluster mode's operator.

The same engine as embedded mode — the embedded runner's queue driving `PhaseWork` — over the
Kubernetes store (CustomNBImage resources) with the Tekton builder, so one PipelineRun runs per
build. kopf runs it as an operator: it logs in, owns the process's lifecycle and health probe,
and holds a finalizer on each image in work, so deleting one cancels its running PipelineRun
before the object goes (the PipelineRun, its plan, artifacts and ImageStream are owned by the
image and are collected with it).

Settings are traitlets options (`--generate-config`, a `cnbi_operator_config.py`, or JSON in
$CNBI_OPERATOR_CONFIG), like the service's.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os

import kopf
from traitlets import Bool, Dict, Float, Integer, List, Type, Unicode, default
from traitlets.config import Application, catch_config_error

from .. import __version__, model
from ..appconfig import load_layered_config
from ..credentials import CredentialVault
from ..imagestreams import ImageStreams
from ..store.kubernetes import KubernetesImageStore
from .builders.base import Builder
from .imageaccess import ImageAccess
from .inuse import pods_in_use
from .phases import PhaseWork
from .runner import EmbeddedRunner


class CNBIOperator(Application):
    name = "cnbi-operator"
    description = "Drive CustomNBImage resources to Ready with Tekton PipelineRuns (cluster mode)."
    version = __version__

    aliases = {
        "namespace": "CNBIOperator.namespace",
        "kubeconfig": "CNBIOperator.kubeconfig",
        "config": "CNBIOperator.config_file",
        "log-level": "Application.log_level",
    }
    flags = {
        "generate-config": (
            {"CNBIOperator": {"generate_config": True}},
            "Write a default config file (cnbi_operator_config.py) with every option, then exit.",
        ),
    }

    config_file = Unicode("cnbi_operator_config.py", help="The config file to load, if it exists.").tag(config=True)
    generate_config = Bool(False, help="Write the default config file and exit.").tag(config=True)

    namespace = Unicode(
        help="The namespace whose CustomNBImages this operator drives. Default: $POD_NAMESPACE, else 'default'."
    ).tag(config=True)

    @default("namespace")
    def _default_namespace(self):
        return os.environ.get("POD_NAMESPACE", "default")

    kubeconfig = Unicode(
        help="kubeconfig file to reach the apiserver. Default: $KUBECONFIG, else the pod's ServiceAccount."
    ).tag(config=True)

    @default("kubeconfig")
    def _default_kubeconfig(self):
        return os.environ.get("KUBECONFIG", "")

    builder_class = Type(
        "cnbi_hub.controller.builders.tekton.TektonBuilder",
        klass=Builder,
        help="What builds the images: Tekton PipelineRuns.",
    ).tag(config=True)

    push_registry = Unicode(
        help="""Registry (and namespace) built images are pushed to, e.g. `registry.example.org/notebooks`;
        required (a cluster keeps images in a registry). Pull with KubeSpawner from there.""",
    ).tag(config=True)

    base_images = List(
        Dict(), help="The service's base_images, for runtimeEnvironment requests (as CNBIService.base_images)."
    ).tag(config=True)

    allowed_git_schemes = List(Unicode(), ["https"], help="URL schemes allowed for GitRepository builds.").tag(
        config=True)

    max_concurrent_builds = Integer(
        10,
        help="""How many images are prepared, resolved or built at once (PipelineRuns at a time);
        the rest wait in Pending with a queue position. Keep it to what the nodes can run.""",
    ).tag(config=True)

    publish_imagestreams = Bool(
        True,
        help="""Publish each Ready image as an ImageStream tag labelled for Open Data Hub
        (`opendatahub.io/notebook-image`), where the cluster serves `image.openshift.io/v1`
        (OpenShift). Elsewhere nothing is published: `status.image` names the image.""",
    ).tag(config=True)

    publish_retry_seconds = Float(30.0, help="Seconds before an ImageStream that could not be written is tried again.").tag(
        config=True)

    server_namespaces = List(
        Unicode(),
        help="""Namespaces whose pods retention looks at before it deletes a kept build's image
        from the registry: never one a pod there runs (KubeSpawner's namespace, when it is not
        the operator's; the operator needs `list pods` there). Default: the operator's own.""",
    ).tag(config=True)

    work_dir = Unicode("/tmp/cnbi-operator", help="Where repository checkouts live while Prepare reads them.").tag(
        config=True)

    @catch_config_error
    def initialize(self, argv=None):
        super().initialize(argv)
        if self.generate_config:
            return
        load_layered_config(self, "CNBI_OPERATOR_CONFIG")
        if not self.push_registry:
            raise ValueError("CNBIOperator.push_registry is required: built images go to a registry")

    def make_engine(self) -> EmbeddedRunner:
        """The store, builder, image access, phase work and queue, wired as in embedded mode."""
        self.store = KubernetesImageStore(parent=self, namespace=self.namespace, kubeconfig=self.kubeconfig)
        self.builder = self.builder_class(parent=self, namespace=self.namespace, kubeconfig=self.kubeconfig)
        access = ImageAccess(parent=self, builder=self.builder)
        self.phases = PhaseWork(
            parent=self, store=self.store, vault=CredentialVault(parent=self), builder=self.builder, access=access, push_registry=self.push_registry,
            base_images=self.base_images, allowed_git_schemes=self.allowed_git_schemes, work_dir=self.work_dir,
        )
        self.runner = EmbeddedRunner(parent=self, store=self.store, phases=self.phases,
                                     max_concurrent_builds=self.max_concurrent_builds)
        # retention deletes no image a pod runs (hub servers or any other)
        self.runner.images_in_use = functools.partial(pods_in_use, self.kubeconfig,
                                                      list(self.server_namespaces) or [self.namespace])
        self.imagestreams = ImageStreams(parent=self, kubeconfig=self.kubeconfig)
        return self.runner

    async def publish_ready_images(self) -> None:
        """Keep each Ready image's ImageStream current (where the cluster has the image API):
        every Ready image at start, then each that becomes Ready; a failed write is retried."""
        if not self.publish_imagestreams:
            return
        try:
            served = await self.imagestreams.available()
        except Exception as e:  # discovery refused: say so, the engine goes on without streams
            self.log.error("could not ask the apiserver for image.openshift.io: %s", e)
            return
        if not served:
            self.log.info("no image.openshift.io API here: Ready images are not published as ImageStreams")
            return
        published: set[tuple] = set()
        waiting: dict[str, dict] = {}

        def publication(obj: dict) -> tuple:
            return obj["metadata"].get("uid"), obj["metadata"].get("generation"), (obj.get("status") or {}).get("image")

        def consider(obj: dict) -> None:
            if model.phase_of(obj) == model.PHASE_READY and publication(obj)[2] and publication(obj) not in published:
                waiting[model.name_of(obj)] = obj

        changes = self.store.watch()
        with changes:
            for obj in await self.store.list():
                consider(obj)
            while True:
                for name, obj in list(waiting.items()):
                    try:
                        await self.imagestreams.publish(obj)
                    except Exception as e:  # the apiserver's answer; the next round tries again
                        self.log.warning("could not publish %s as an ImageStream: %s", name, e)
                        continue
                    published.add(publication(obj))
                    del waiting[name]
                    self.log.info("published %s as ImageStream tag %s", name, publication(obj)[2])
                try:
                    event = await changes.get(timeout=self.publish_retry_seconds if waiting else None)
                except asyncio.TimeoutError:
                    continue
                if event.type == "DELETED":
                    waiting.pop(model.name_of(event.object), None)
                else:
                    consider(event.object)

    async def run(self, stop: asyncio.Event | None = None, ready: asyncio.Event | None = None) -> None:
        """Run until `stop` is set (or SIGTERM): the engine plus kopf's finalizer handling."""
        runner = self.make_engine()
        await self.store.start()
        await runner.start()
        publisher = asyncio.create_task(self.publish_ready_images())
        registry = kopf.OperatorRegistry()
        _register_handlers(registry, self)
        stop = stop or asyncio.Event()
        try:
            await kopf.operator(registry=registry, namespaces=[self.namespace], standalone=True,
                                stop_flag=stop, ready_flag=ready, clusterwide=False)
        finally:
            publisher.cancel()
            await runner.stop()
            await asyncio.gather(publisher, return_exceptions=True)
            await self.imagestreams.close()
            await self.store.aclose()
            if hasattr(self.builder, "close"):
                await self.builder.close()

    def start(self):
        if self.generate_config:
            with open(self.config_file, "w") as f:
                f.write(self.generate_config_file())
            print(f"Wrote default config to {self.config_file}")
            return
        logging.basicConfig(level=self.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        asyncio.run(self.run())


def _register_handlers(registry: kopf.OperatorRegistry, app: CNBIOperator) -> None:
    group, version, plural = model.GROUP, model.VERSION, model.PLURAL

    @kopf.on.login(registry=registry)
    def login(**kwargs):
        if app.kubeconfig:
            os.environ["KUBECONFIG"] = app.kubeconfig
            return kopf.login_with_kubeconfig(**kwargs)
        return kopf.login_with_service_account(**kwargs)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_):
        settings.posting.level = logging.WARNING  # Kubernetes events only for what goes wrong
        settings.persistence.finalizer = f"{model.PREFIX}/operator"
        settings.watching.server_timeout = 300

    def in_work(status, **_) -> bool:
        # only an image in work holds the finalizer: a Ready image's ImageStream, PipelineRun and
        # artifacts are owned by it and go with it (the garbage collector), so finished images
        # cost no finalizer write and never keep a namespace Terminating without an operator
        return (status or {}).get("phase") in (model.PHASE_PREPARE, model.PHASE_RESOLVING, model.PHASE_BUILDING)

    @kopf.on.delete(group, version, plural, registry=registry, optional=False, when=in_work)
    async def cancel_build_of_deleted_image(body, logger, **_):
        """A deleted image's PipelineRun stops now, not when the garbage collector gets to it."""
        obj = json.loads(json.dumps(dict(body)))
        if model.phase_of(obj) not in model.TERMINAL_PHASES:
            await app.builder.cancel_build(obj)
            logger.info("cancelled the running build of %s", model.name_of(obj))
        if app.publish_imagestreams:
            await app.imagestreams.unpublish(obj)  # its tags go now, not when the collector gets to it


def main(argv=None):
    app = CNBIOperator.instance()
    app.initialize(argv)
    app.start()
