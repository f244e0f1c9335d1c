"""An async client for container registries (the OCI distribution / Docker registry v2 API).

It answers one question: what exactly is behind an image reference — its manifest digest, media
type and platforms. Prepare uses it to pin base images; ``GET api/check-image`` uses ``exists``.

Authentication follows what registries actually do: try anonymously, and on a 401 answer the
``WWW-Authenticate`` challenge — Bearer (fetch a token from the realm, with basic credentials if
we have any) or Basic. Credentials come from containers-auth.json / docker config.json shaped
dicts (a Kubernetes ``.dockerconfigjson`` pull secret has the same shape); see
``credentials_for``.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import ssl
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple
from urllib.parse import urlencode, urljoin, urlsplit

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse
from traitlets import Float, List, Unicode
from traitlets.config import LoggingConfigurable

from ..imageref import (
    DOCKER_HUB_API_REGISTRY,
    DOCKER_HUB_REGISTRY,
    ImageReference,
    parse_image_reference,
)

__all__ = [
    "ImageNotFound",
    "ImageUnauthorized",
    "RegistryClient",
    "RegistryCredentials",
    "RegistryError",
    "RegistryUnreachable",
    "ResolvedImage",
    "credentials_for",
    "parse_www_authenticate",
]

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_MANIFEST_V1 = "application/vnd.docker.distribution.manifest.v1+json"
INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
IMAGE_MANIFEST_MEDIA_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST])

# Registry error codes (distribution spec) that mean "there is no such image".
_NOT_FOUND_CODES = frozenset({"MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN"})
_DENIED_CODES = frozenset({"UNAUTHORIZED", "DENIED"})


class RegistryError(Exception):
    """A registry could not answer a question about an image."""

    def __init__(self, message: str, *, image: str | None = None, registry: str | None = None):
        super().__init__(message)
        self.image = image
        self.registry = registry


class ImageNotFound(RegistryError):
    """The registry says the repository or the tag/digest does not exist."""


class ImageUnauthorized(RegistryError):
    """The registry refused access (401/403), with or without the credentials we had."""


class RegistryUnreachable(RegistryError):
    """The registry could not be reached: connection refused, DNS, TLS or timeout."""


class RegistryCredentials(NamedTuple):
    username: str
    password: str


@dataclasses.dataclass(frozen=True)
class ResolvedImage:
    """What a registry said an image reference points at."""

    reference: ImageReference
    digest: str
    media_type: str
    platforms: list[str]

    @property
    def pinned(self) -> ImageReference:
        """The reference pinned to the resolved digest (``registry/repository@sha256:...``)."""
        return self.reference.with_digest(self.digest)


# -- credentials -------------------------------------------------------------------------------


def _auth_key_location(key: str) -> tuple[str, str]:
    """Split an auths key into (registry, repository path), forgiving docker's URL-style keys."""
    key = key.strip()
    if "://" in key:
        parts = urlsplit(key)
        host, path = parts.netloc, parts.path
    else:
        host, _, path = key.partition("/")
    path = path.strip("/")
    # docker login writes "https://index.docker.io/v1/"; the path is the API version.
    if re.fullmatch(r"v[12]", path):
        path = ""
    if host in {"index.docker.io", DOCKER_HUB_API_REGISTRY}:
        host = DOCKER_HUB_REGISTRY
    return host, path


def _decode_auth_entry(entry: Any) -> RegistryCredentials | None:
    if not isinstance(entry, Mapping):
        return None
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(entry["auth"], validate=False).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return None
        username, sep, password = decoded.partition(":")
        if sep:
            return RegistryCredentials(username, password)
        return None
    if entry.get("username") and "password" in entry:
        return RegistryCredentials(str(entry["username"]), str(entry["password"]))
    return None


def credentials_for(
    registry: str,
    auth_json_dicts: Iterable[Mapping[str, Any]],
    repository: str | None = None,
) -> RegistryCredentials | None:
    """Find credentials for ``registry`` in containers-auth/docker-config shaped dicts.

    Each dict looks like ``{"auths": {"host[:port]": {"auth": base64("user:pass")}}}`` — an
    ``auth.json``, a ``~/.docker/config.json`` or a Kubernetes ``.dockerconfigjson`` secret.
    Dicts earlier in ``auth_json_dicts`` win. As in containers-auth.json, a key may name a
    repository namespace (``quay.io/org``); with ``repository`` given, the longest matching
    namespace wins over the bare host. Returns None when nothing matches.
    """
    if registry in {"index.docker.io", DOCKER_HUB_API_REGISTRY}:
        registry = DOCKER_HUB_REGISTRY
    for auth_json in auth_json_dicts:
        auths = auth_json.get("auths") if isinstance(auth_json, Mapping) else None
        if not isinstance(auths, Mapping):
            continue
        best: tuple[int, RegistryCredentials] | None = None
        for key, entry in auths.items():
            host, path = _auth_key_location(str(key))
            if host != registry:
                continue
            if path and not (
                repository and (repository == path or repository.startswith(path + "/"))
            ):
                continue
            credentials = _decode_auth_entry(entry)
            if credentials and (best is None or len(path) > best[0]):
                best = (len(path), credentials)
        if best:
            return best[1]
    return None


# -- WWW-Authenticate ---------------------------------------------------------------------------

_CHALLENGE_PARAM_RE = re.compile(
    r'\s*([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?'
)


def parse_www_authenticate(header: str) -> tuple[str, dict[str, str]]:
    """Parse ``Bearer realm="...",service="...",scope="..."`` into ("bearer", {params})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    for match in _CHALLENGE_PARAM_RE.finditer(rest):
        quoted, bare = match.group(2), match.group(3)
        value = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
        params[match.group(1).lower()] = value
    return scheme.lower(), params


def _basic_header(credentials: RegistryCredentials) -> str:
    token = base64.b64encode(f"{credentials.username}:{credentials.password}".encode()).decode()
    return f"Basic {token}"


def _registry_error_codes(body: bytes) -> set[str]:
    try:
        errors = json.loads(body or b"{}").get("errors") or []
        return {str(error.get("code", "")) for error in errors if isinstance(error, dict)}
    except (ValueError, AttributeError):
        return set()


def _platform_string(platform: Mapping[str, Any]) -> str | None:
    os_name, architecture = platform.get("os"), platform.get("architecture")
    if not os_name or not architecture:
        return None
    parts = [str(os_name), str(architecture)]
    if platform.get("variant"):
        parts.append(str(platform["variant"]))
    return "/".join(parts)


def _platforms_of_index(index: Mapping[str, Any]) -> list[str]:
    platforms: list[str] = []
    for descriptor in index.get("manifests") or []:
        platform = _platform_string(descriptor.get("platform") or {})
        # BuildKit stores attestations as "unknown/unknown" entries; they are not runnable.
        if platform and platform != "unknown/unknown" and platform not in platforms:
            platforms.append(platform)
    return platforms


class _Session:
    """Per-resolve state: the Authorization header that the registry accepted."""

    def __init__(self, ref: ImageReference, credentials: RegistryCredentials | None):
        self.ref = ref
        self.credentials = credentials
        self.authorization: str | None = None


class RegistryClient(LoggingConfigurable):
    """Resolve image references against registries that speak the distribution v2 API."""

    insecure_registries = List(
        Unicode(),
        help="""
        Registries (host[:port], as written in image references) reached over plain http
        instead of https, e.g. ``["127.0.0.1:5000", "localhost:5000"]`` for a local registry.
        Every other registry is reached over https with certificate verification.
        """,
    ).tag(config=True)

    timeout = Float(
        10.0,
        help="Seconds to wait for a registry to connect and answer one request.",
    ).tag(config=True)

    ca_certs = Unicode(
        None,
        allow_none=True,
        help="""
        PEM bundle of CA certificates for https registries (e.g. a corporate mirror's CA).
        None uses the system's trust store.
        """,
    ).tag(config=True)

    user_agent = Unicode("cnbi-hub", help="User-Agent sent to registries.").tag(config=True)

    # -- public API ----------------------------------------------------------------------------

    async def resolve(
        self,
        ref: ImageReference | str,
        auth: RegistryCredentials | tuple[str, str] | None = None,
    ) -> ResolvedImage:
        """Look ``ref`` up: its manifest digest, media type and platforms ("linux/amd64").

        ``auth`` is (username, password), e.g. from ``credentials_for``; None is anonymous.
        Raises ImageNotFound, ImageUnauthorized, RegistryUnreachable or RegistryError.
        """
        if isinstance(ref, str):
            ref = parse_image_reference(ref)
        credentials = RegistryCredentials(*auth) if auth else None
        session = _Session(ref, credentials)

        manifest_url = self._api_url(ref, f"manifests/{ref.manifest_reference}")
        response = await self._fetch(session, manifest_url, {"Accept": MANIFEST_ACCEPT})
        body = response.body or b""
        digest = self._manifest_digest(ref, response, body)
        try:
            manifest = json.loads(body)
        except ValueError as error:
            raise self._error(
                RegistryError, ref, f"returned a manifest that is not JSON ({error})"
            ) from error
        if not isinstance(manifest, dict):
            raise self._error(RegistryError, ref, "returned a manifest that is not a JSON object")
        media_type = (
            manifest.get("mediaType")
            or response.headers.get("Content-Type", "").split(";")[0].strip()
        )

        if media_type in INDEX_MEDIA_TYPES or (
            not media_type and isinstance(manifest.get("manifests"), list)
        ):
            platforms = _platforms_of_index(manifest)
            media_type = media_type or OCI_INDEX
        elif media_type in {DOCKER_MANIFEST_V1, DOCKER_MANIFEST_V1_SIGNED}:
            # Schema 1 carries its architecture inline and predates multi-OS registries.
            architecture = manifest.get("architecture")
            platforms = [f"linux/{architecture}"] if architecture else []
        else:
            platforms = await self._platforms_of_image_manifest(session, manifest)
            media_type = media_type or OCI_MANIFEST
        return ResolvedImage(
            reference=ref, digest=digest, media_type=media_type, platforms=platforms
        )

    async def digest_of(
        self,
        ref: ImageReference | str,
        auth: RegistryCredentials | tuple[str, str] | None = None,
    ) -> str:
        """``ref``'s manifest digest, from a HEAD request's ``Docker-Content-Digest`` (as
        ``crane digest`` and ``skopeo`` do: one small request, which registries do not count
        against pull limits); a registry that does not say, or refuses, is asked with ``resolve``,
        whose errors say exactly what is wrong."""
        if isinstance(ref, str):
            ref = parse_image_reference(ref)
        session = _Session(ref, RegistryCredentials(*auth) if auth else None)
        url = self._api_url(ref, f"manifests/{ref.manifest_reference}")
        try:
            response = await self._fetch(session, url, {"Accept": MANIFEST_ACCEPT}, method="HEAD")
        except RegistryUnreachable:
            raise
        except RegistryError:
            response = None
        digest = response.headers.get("Docker-Content-Digest", "") if response is not None else ""
        if re.fullmatch(r"sha256:[a-f0-9]{64}", digest) and (not ref.digest or digest == ref.digest):
            return digest
        return (await self.resolve(ref, auth=auth)).digest

    async def exists(
        self,
        ref: ImageReference | str,
        auth: RegistryCredentials | tuple[str, str] | None = None,
    ) -> dict[str, Any]:
        """``{"exists", "digest", "platforms"}`` for ``GET api/check-image``.

        Only "not found" becomes ``exists: False``; unauthorized and unreachable registries
        still raise, because then we do not know.
        """
        try:
            resolved = await self.resolve(ref, auth=auth)
        except ImageNotFound:
            return {"exists": False, "digest": None, "platforms": []}
        return {"exists": True, "digest": resolved.digest, "platforms": resolved.platforms}

    async def delete(
        self,
        ref: ImageReference | str,
        auth: RegistryCredentials | tuple[str, str] | None = None,
    ) -> bool:
        """Delete the manifest ``ref`` pins by digest (the distribution API's DELETE; the
        registry frees its layers at its next garbage collection). True when deleted, False
        when the registry had no such manifest. A registry that does not allow deleting
        (docker's registry without ``storage.delete.enabled``) raises RegistryError saying so."""
        if isinstance(ref, str):
            ref = parse_image_reference(ref)
        if not ref.digest:
            raise ValueError(f"only an image pinned by digest is deleted, not {ref}")
        session = _Session(ref, RegistryCredentials(*auth) if auth else None)
        url = self._api_url(ref, f"manifests/{ref.digest}")
        try:
            await self._fetch(session, url, {"Accept": MANIFEST_ACCEPT}, method="DELETE", accept=(200, 202))
        except ImageNotFound:
            return False
        except RegistryError as error:
            if "HTTP 405" in str(error) or "UNSUPPORTED" in str(error):
                raise self._error(RegistryError, ref, "does not allow deleting images (a docker registry "
                                  "needs storage.delete.enabled)") from error
            raise
        return True

    # -- internals -----------------------------------------------------------------------------

    def _scheme(self, ref: ImageReference) -> str:
        insecure = (
            ref.registry in self.insecure_registries or ref.api_registry in self.insecure_registries
        )
        return "http" if insecure else "https"

    def _api_url(self, ref: ImageReference, tail: str) -> str:
        return f"{self._scheme(ref)}://{ref.api_registry}/v2/{ref.repository}/{tail}"

    def _error(self, cls: type[RegistryError], ref: ImageReference, what: str) -> RegistryError:
        return cls(
            f"registry {ref.registry} {what} (image {ref})", image=str(ref), registry=ref.registry
        )

    def _request(
        self, url: str, headers: Mapping[str, str], *, follow_redirects: bool = True, method: str = "GET"
    ) -> HTTPRequest:
        return HTTPRequest(
            url,
            method=method,
            headers={"User-Agent": self.user_agent, **headers},
            connect_timeout=self.timeout,
            request_timeout=self.timeout,
            follow_redirects=follow_redirects,
            ca_certs=self.ca_certs,
        )

    async def _send(self, ref: ImageReference, request: HTTPRequest) -> HTTPResponse:
        """One HTTP exchange; transport failures become RegistryUnreachable."""
        host = urlsplit(request.url).netloc
        try:
            return await AsyncHTTPClient().fetch(request, raise_error=False)
        except HTTPClientError as error:
            # raise_error=False leaves only transport errors here (599: timeout, reset).
            raise self._error(
                RegistryUnreachable, ref, f"could not be reached at {host}: {error}"
            ) from error
        except ssl.SSLError as error:
            hint = ""
            if self._scheme(ref) == "https":
                hint = (
                    f"; if {ref.registry} serves plain http, add it to"
                    " RegistryClient.insecure_registries, or set ca_certs for a private CA"
                )
            raise self._error(
                RegistryUnreachable, ref, f"TLS with {host} failed: {error}{hint}"
            ) from error
        except OSError as error:
            # ConnectionRefusedError, socket.gaierror (DNS), StreamClosedError, ...
            raise self._error(
                RegistryUnreachable, ref, f"could not be reached at {host}: {error}"
            ) from error

    async def _fetch(
        self, session: _Session, url: str, headers: Mapping[str, str], method: str = "GET",
        accept: tuple[int, ...] = (200,),
    ) -> HTTPResponse:
        """GET (or HEAD) ``url`` from the image's registry, answering an auth challenge once."""
        ref = session.ref
        request_headers = dict(headers)
        if session.authorization:
            request_headers["Authorization"] = session.authorization
        # Redirects are followed by hand so Authorization never goes to a blob-storage host.
        response = await self._send(
            ref, self._request(url, request_headers, follow_redirects=False, method=method)
        )
        if response.code == 401 and not session.authorization:
            session.authorization = await self._authorize(session, response)
            request_headers["Authorization"] = session.authorization
            response = await self._send(
                ref, self._request(url, request_headers, follow_redirects=False, method=method)
            )
        if response.code in (301, 302, 303, 307, 308) and response.headers.get("Location"):
            location = urljoin(url, response.headers["Location"])
            same_host = urlsplit(location).netloc == urlsplit(url).netloc
            redirect_headers = dict(headers)
            if same_host and session.authorization:
                redirect_headers["Authorization"] = session.authorization
            response = await self._send(ref, self._request(location, redirect_headers, method=method))
        self._raise_for_status(session, response, accept)
        return response

    async def _authorize(self, session: _Session, challenge_response: HTTPResponse) -> str:
        """Turn a 401 challenge into an Authorization header value."""
        ref, credentials = session.ref, session.credentials
        header = challenge_response.headers.get("WWW-Authenticate", "")
        scheme, params = parse_www_authenticate(header)
        if scheme == "basic":
            if not credentials:
                raise self._error(
                    ImageUnauthorized,
                    ref,
                    "requires a user name and password; add the registry's credentials"
                    " as an image pull secret",
                )
            return _basic_header(credentials)
        if scheme == "bearer" and params.get("realm"):
            return f"Bearer {await self._fetch_token(session, params)}"
        raise self._error(
            ImageUnauthorized,
            ref,
            f"refused access with an authentication scheme this client does not support"
            f" ({header or 'no WWW-Authenticate header'})",
        )

    async def _fetch_token(self, session: _Session, params: Mapping[str, str]) -> str:
        """The Docker token flow: GET realm?service=..&scope=.. (with Basic credentials)."""
        ref, credentials = session.ref, session.credentials
        query = {}
        if params.get("service"):
            query["service"] = params["service"]
        # The challenge's scope may be missing (e.g. on /v2/) or name another action set.
        query["scope"] = params.get("scope") or f"repository:{ref.repository}:pull"
        realm = params["realm"]
        token_url = f"{realm}{'&' if '?' in realm else '?'}{urlencode(query)}"
        if urlsplit(token_url).scheme not in ("http", "https"):
            raise self._error(
                RegistryError, ref, f"sent a token realm that is not http(s): {realm}"
            )
        headers = {"Accept": "application/json"}
        if credentials:
            headers["Authorization"] = _basic_header(credentials)
        response = await self._send(ref, self._request(token_url, headers))
        if response.code in (401, 403):
            detail = "rejected the credentials" if credentials else "refused an anonymous token"
            raise self._error(
                ImageUnauthorized,
                ref,
                f"token service {urlsplit(token_url).netloc} {detail} (HTTP {response.code});"
                " check the image pull secret",
            )
        if response.code != 200:
            raise self._error(
                RegistryError,
                ref,
                f"token service {urlsplit(token_url).netloc} answered HTTP {response.code}",
            )
        try:
            payload = json.loads(response.body)
            token = payload.get("token") or payload.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not token or not isinstance(token, str):
            raise self._error(
                RegistryError, ref, f"token service {urlsplit(token_url).netloc} sent no token"
            )
        return token

    def _raise_for_status(self, session: _Session, response: HTTPResponse, accept: tuple[int, ...] = (200,)) -> None:
        if response.code in accept:
            return
        ref = session.ref
        codes = _registry_error_codes(response.body)
        if response.code == 404 or codes & _NOT_FOUND_CODES:
            which = "repository" if "NAME_UNKNOWN" in codes else "image"
            raise self._error(ImageNotFound, ref, f"has no such {which}")
        if response.code in (401, 403) or codes & _DENIED_CODES:
            if session.credentials:
                detail = f"refused access with the given credentials (HTTP {response.code})"
            else:
                detail = (
                    f"refused anonymous access (HTTP {response.code}); the image may be"
                    " private — add the registry's credentials as an image pull secret"
                )
            raise self._error(ImageUnauthorized, ref, detail)
        if response.code == 429:
            raise self._error(RegistryError, ref, "is rate limiting requests (HTTP 429); try later")
        raise self._error(
            RegistryError,
            ref,
            f"answered HTTP {response.code} {response.reason or ''}".rstrip()
            + (f" ({', '.join(sorted(codes))})" if codes else ""),
        )

    def _manifest_digest(self, ref: ImageReference, response: HTTPResponse, body: bytes) -> str:
        body_digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if ref.digest:
            # Asked by digest: the content must hash to it, whatever the headers say.
            algorithm = ref.digest.split(":", 1)[0]
            actual = f"{algorithm}:" + hashlib.new(algorithm, body).hexdigest()
            if actual != ref.digest:
                raise self._error(
                    RegistryError, ref, f"returned a manifest whose digest is {actual}"
                )
            return ref.digest
        return response.headers.get("Docker-Content-Digest") or body_digest

    async def _platforms_of_image_manifest(
        self, session: _Session, manifest: Mapping[str, Any]
    ) -> list[str]:
        """A single image's platform is in its config blob (os / architecture / variant)."""
        config_digest = (manifest.get("config") or {}).get("digest")
        if not isinstance(config_digest, str) or not re.fullmatch(
            r"[a-z0-9]+:[a-f0-9]+", config_digest
        ):
            return []
        response = await self._fetch(
            session, self._api_url(session.ref, f"blobs/{config_digest}"), {}
        )
        try:
            config = json.loads(response.body)
        except ValueError:
            return []
        platform = _platform_string(config) if isinstance(config, Mapping) else None
        return [platform] if platform else []
