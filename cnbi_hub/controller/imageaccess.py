"""Reaching images: credentials, registries, pinning a reference to its digest.

Prepare pins base and imported images here, and the service's `check-image` route asks here
whether an image exists; both go through the same credentials and insecure-registry rules.
Images under `localhost/` live only in the builder's own storage (podman's namespace for
images built on this machine), so the builder answers for them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

from traitlets import Instance, List, Unicode
from traitlets.config import LoggingConfigurable

from ..imageref import ImageReference, parse_image_reference
from .builders.base import Builder, PullAccess
from .registry import ImageNotFound, RegistryClient, credentials_for

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class ImageAccess(LoggingConfigurable):
    """Which registries are plain http, where credentials come from, and pinning."""

    insecure_registries = List(
        Unicode(),
        help="""Registries (host:port) reached over plain http. Loopback registries (127.0.0.1, localhost)
        always are, as with docker and podman.""",
    ).tag(config=True)

    auth_file = Unicode(
        "", help="A containers auth.json / docker config.json with credentials for pulling base images."
    ).tag(config=True)

    pull_secrets_dir = Unicode(
        "",
        help="""Embedded mode's stand-in for Kubernetes Secrets: `spec.imagePullSecret.name` refers to
        `<pull_secrets_dir>/<name>.json`, a `.dockerconfigjson` document.""",
    ).tag(config=True)

    builder = Instance(Builder, allow_none=True, help="The builder, which answers for localhost/ images.")
    registry = Instance(RegistryClient, allow_none=True)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.registry is None:
            self.registry = RegistryClient(parent=self)
        self._digests_in_flight: dict[tuple, asyncio.Future] = {}
        self._insecure_clients: dict[str, RegistryClient] = {}

    def auth_documents(self, obj: dict | None) -> list[dict]:
        """Credentials documents for pulling: the object's pull secret first, then the auth file."""
        documents = []
        secret = ((obj or {}).get("spec", {}).get("imagePullSecret") or {}).get("name")
        if secret:
            # a DNS name, as Secret names are: never a path that could leave the directory
            if not _SECRET_NAME.match(secret) or not self.pull_secrets_dir:
                raise LookupError(f"pull secret {secret} does not exist")
            path = Path(self.pull_secrets_dir) / f"{secret}.json"
            if not path.is_file():
                raise LookupError(f"pull secret {secret} does not exist")
            documents.append(json.loads(path.read_text()))
        if self.auth_file and os.path.isfile(self.auth_file):
            documents.append(json.loads(Path(self.auth_file).read_text()))
        return documents

    def is_insecure(self, ref: ImageReference) -> bool:
        host = ref.registry.rsplit(":", 1)[0] if not ref.registry.startswith("[") else ref.registry.split("]")[0] + "]"
        return host in LOOPBACK_HOSTS or ref.registry in self.insecure_registries

    def _client_and_credentials(self, ref: ImageReference, documents: list[dict]):
        client = self.registry
        if self.is_insecure(ref) and ref.registry not in client.insecure_registries:
            # one client per such registry, kept: making one per pin cost more than the pin
            client = self._insecure_clients.get(ref.registry)
            if client is None:
                client = self._insecure_clients[ref.registry] = RegistryClient(
                    parent=self, insecure_registries=[*self.registry.insecure_registries, ref.registry])
        credentials = credentials_for(ref.registry, documents, ref.repository) if documents else None
        return client, credentials

    async def pin(self, text: str, obj: dict | None) -> tuple[str, str, PullAccess | None]:
        """`text` -> (name@digest, digest, how the builder may fetch it). Raises ImageNotFound,
        ImageUnauthorized, RegistryUnreachable, RegistryError or LookupError with a message
        that says what is wrong."""
        ref = parse_image_reference(text)
        if ref.registry == "localhost":
            stored = await self.builder.stored_image(str(ref))
            if not stored:
                raise ImageNotFound(f"image {text} does not exist in this machine's image storage")
            return str(ref.with_digest(stored.digest)), stored.digest, None
        client, credentials = self._client_and_credentials(ref, self.auth_documents(obj))
        digest = await self._digest_shared(client, ref, credentials)
        access = PullAccess(
            username=credentials.username if credentials else None,
            password=credentials.password if credentials else None,
            tls_verify=not self.is_insecure(ref),
        )
        return str(ref.with_digest(digest)), digest, access

    async def _digest_shared(self, client: RegistryClient, ref: ImageReference, credentials) -> str:
        """Pins of the same reference with the same credentials that overlap share one request:
        a burst of identical imports asks the registry once, not once each (nothing is kept
        after the answer: the next pin asks again)."""
        key = (str(ref), tuple(client.insecure_registries), credentials)
        running = self._digests_in_flight.get(key)
        if running is None:
            running = asyncio.ensure_future(
                client.digest_of(ref, auth=credentials and (credentials.username, credentials.password)))
            self._digests_in_flight[key] = running

            def forget(done: asyncio.Future) -> None:
                self._digests_in_flight.pop(key, None)
                if not done.cancelled():
                    done.exception()  # retrieved here too: its waiters may all have gone

            running.add_done_callback(forget)
        return await asyncio.shield(running)

    async def delete(self, text: str) -> bool:
        """Delete an image pinned by digest from its registry (retention), with the credentials
        of `auth_file`; False when the registry had no such image. Raises RegistryError."""
        ref = parse_image_reference(text)
        client, credentials = self._client_and_credentials(ref, self.auth_documents(None))
        return await client.delete(ref, auth=credentials and (credentials.username, credentials.password))

    async def check(self, text: str) -> dict:
        """`GET api/check-image`: {exists, digest, platforms}; raises ImageUnauthorized for an
        image the registry keeps private, RegistryUnreachable / RegistryError otherwise."""
        ref = parse_image_reference(text)
        if ref.registry == "localhost":
            stored = await self.builder.stored_image(str(ref))
            if not stored:
                return {"exists": False, "digest": None, "platforms": []}
            return {"exists": True, "digest": stored.digest, "platforms": [stored.platform]}
        client, credentials = self._client_and_credentials(ref, self.auth_documents(None))
        return await client.exists(ref, auth=credentials and (credentials.username, credentials.password))
