"""OCI image references: parse, normalise and print them.

The grammar is the one of docker/distribution's ``reference`` package (which podman, buildah,
skopeo, Kubernetes and every registry accept)::

    reference  := name [ ":" tag ] [ "@" digest ]
    name       := [ domain "/" ] component ( "/" component )*
    domain     := host [ ":" port ]
    component  := [a-z0-9]+ ( ( [._] | "__" | "-"* ) [a-z0-9]+ )*
    tag        := [\\w][\\w.-]{0,127}
    digest     := algorithm ":" hex

Normalisation follows Docker's: a first path element that has no ``.`` or ``:`` and is not
``localhost`` is a repository path element on ``docker.io``, and one-element Docker Hub names live
under ``library/``. So ``python`` is ``docker.io/library/python:latest``.

A reference that parses here contains only ``[A-Za-z0-9._:/@\\[\\]-]``, never starts with ``-``,
and so is safe as one argv element of podman/skopeo.
"""

from __future__ import annotations

import dataclasses
import re

__all__ = [
    "DOCKER_HUB_API_REGISTRY",
    "DOCKER_HUB_REGISTRY",
    "ImageReference",
    "parse_image_reference",
    "validate_digest",
]

DOCKER_HUB_REGISTRY = "docker.io"
# docker.io is a name, not a host: the v2 API of Docker Hub answers on this host.
DOCKER_HUB_API_REGISTRY = "registry-1.docker.io"
# Names Docker has used for its hub over the years; all mean docker.io.
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

NAME_TOTAL_LENGTH_MAX = 255

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_IPV6_ADDRESS = r"\[[a-fA-F0-9:]+\]"
_DOMAIN_RE = re.compile(rf"(?:{_DOMAIN_NAME}|{_IPV6_ADDRESS})(?::[0-9]+)?", re.ASCII)
_PATH_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*", re.ASCII)
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DIGEST_RE = re.compile(
    r"(?P<algorithm>[a-z0-9]+(?:[.+_-][a-z0-9]+)*):(?P<encoded>[a-zA-Z0-9=_-]+)", re.ASCII
)
# Lengths of the hex-encoded digests the OCI image spec registers.
_DIGEST_HEX_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}
_HEX_64_RE = re.compile(r"[a-f0-9]{64}", re.ASCII)
_ALLOWED_CHARACTERS_RE = re.compile(r"[A-Za-z0-9._:/@\[\]-]+", re.ASCII)


def validate_digest(digest: str) -> str:
    """Return ``digest`` if it is ``sha256:<64 lowercase hex>`` (or sha384/512), else ValueError."""
    match = _DIGEST_RE.fullmatch(digest)
    if not match:
        raise ValueError(
            f"invalid digest {digest!r}: expected ALGORITHM:HEX, for example sha256:<64 hex digits>"
        )
    algorithm, encoded = match.group("algorithm"), match.group("encoded")
    if algorithm not in _DIGEST_HEX_LENGTHS:
        raise ValueError(
            f"invalid digest {digest!r}: unsupported algorithm {algorithm!r}"
            f" (supported: {', '.join(sorted(_DIGEST_HEX_LENGTHS))})"
        )
    length = _DIGEST_HEX_LENGTHS[algorithm]
    if len(encoded) != length or not re.fullmatch(r"[a-f0-9]+", encoded):
        raise ValueError(
            f"invalid digest {digest!r}: {algorithm} needs exactly {length} lowercase hex digits"
        )
    return digest


@dataclasses.dataclass(frozen=True)
class ImageReference:
    """A normalised image reference: ``registry/repository[:tag][@digest]``.

    ``tag`` and ``digest`` may both be set (``name:tag@digest``); the digest then decides
    which image is meant and the tag is informative only.
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """``registry/repository``, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_registry(self) -> str:
        """The host[:port] whose ``/v2/`` API serves this image."""
        if self.registry == DOCKER_HUB_REGISTRY:
            return DOCKER_HUB_API_REGISTRY
        return self.registry

    @property
    def manifest_reference(self) -> str:
        """What goes after ``/manifests/`` in the API: the digest if known, else the tag."""
        return self.digest or self.tag or "latest"

    def with_digest(self, digest: str) -> ImageReference:
        """The same image pinned to ``digest`` (``registry/repository@digest``).

        The tag is dropped: containers/image (skopeo, older podman) refuses references that
        carry both a tag and a digest, and the digest alone names the image exactly.
        """
        return dataclasses.replace(self, tag=None, digest=validate_digest(digest))

    def with_tag(self, tag: str) -> ImageReference:
        """The same repository at ``tag`` (any digest is dropped)."""
        if not _TAG_RE.fullmatch(tag):
            raise ValueError(f"invalid tag {tag!r}: {_TAG_RULE}")
        return dataclasses.replace(self, tag=tag, digest=None)

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


_TAG_RULE = (
    "a tag is 1 to 128 characters of letters, digits, '_', '.' and '-' and cannot start with"
    " '.' or '-'"
)
_COMPONENT_RULE = (
    "each part of a repository path is lowercase letters and digits, separated inside by"
    " '.', '_', '__' or dashes"
)


def _looks_like_domain(first: str) -> bool:
    # Docker's rule: only a first element with '.' or ':' (or 'localhost') names a registry.
    return "." in first or ":" in first or first == "localhost"


def parse_image_reference(text: str) -> ImageReference:
    """Parse and normalise an image reference; ValueError says what is wrong with it.

    >>> str(parse_image_reference("python:3.11"))
    'docker.io/library/python:3.11'
    """
    if not isinstance(text, str):
        raise ValueError(f"an image reference must be a string, not {type(text).__name__}")
    if not text:
        raise ValueError("image reference is empty")
    if text != text.strip() or any(c.isspace() for c in text):
        raise ValueError(f"invalid image reference {text!r}: it must not contain whitespace")
    if text.startswith("-"):
        raise ValueError(f"invalid image reference {text!r}: it must not start with '-'")
    if not _ALLOWED_CHARACTERS_RE.fullmatch(text):
        bad = sorted({c for c in text if not _ALLOWED_CHARACTERS_RE.fullmatch(c)})
        raise ValueError(
            f"invalid image reference {text!r}: characters {''.join(bad)!r} are not allowed"
        )

    name, at, digest = text.partition("@")
    if at:
        if "@" in digest:
            raise ValueError(f"invalid image reference {text!r}: more than one '@'")
        validate_digest(digest)
    else:
        digest = None

    tag = None
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            raise ValueError(f"invalid tag {tag!r} in image reference {text!r}: {_TAG_RULE}")

    if not name:
        raise ValueError(f"invalid image reference {text!r}: the repository name is missing")

    first, slash, rest = name.partition("/")
    if slash and _looks_like_domain(first):
        registry, path = first, rest
        if not _DOMAIN_RE.fullmatch(registry):
            raise ValueError(
                f"invalid registry {registry!r} in image reference {text!r}: expected a host"
                " name or IP address with an optional :port"
            )
        if registry in _DOCKER_HUB_ALIASES:
            registry = DOCKER_HUB_REGISTRY
    else:
        registry, path = DOCKER_HUB_REGISTRY, name

    if not path:
        raise ValueError(f"invalid image reference {text!r}: the repository name is missing")
    for component in path.split("/"):
        if not component:
            raise ValueError(f"invalid image reference {text!r}: empty path element ('//')")
        if component != component.lower():
            raise ValueError(
                f"invalid image reference {text!r}: repository name must be lowercase"
                f" ({component!r})"
            )
        if not _PATH_COMPONENT_RE.fullmatch(component):
            raise ValueError(
                f"invalid repository path element {component!r} in image reference {text!r}:"
                f" {_COMPONENT_RULE}"
            )

    if registry == DOCKER_HUB_REGISTRY and "/" not in path:
        if _HEX_64_RE.fullmatch(path):
            # Docker reserves these for image IDs, so as a name they are ambiguous.
            raise ValueError(
                f"invalid image reference {text!r}: a 64-hex-digit name looks like an image"
                " ID; use the full registry/repository name"
            )
        path = f"library/{path}"

    full_name = f"{registry}/{path}"
    if len(full_name) > NAME_TOTAL_LENGTH_MAX:
        raise ValueError(
            f"invalid image reference {text!r}: the name {full_name!r} is {len(full_name)}"
            f" characters long, more than the {NAME_TOTAL_LENGTH_MAX} allowed"
        )

    if tag is None and digest is None:
        tag = "latest"
    return ImageReference(registry=registry, repository=path, tag=tag, digest=digest)
