"""Git credentials a user stores with the service, for GitRepository builds of private repositories.

A credential is a token for one git host (`github.com`, `gitlab.example.org:8443`), stored per
user under a name the user picks; an image names it in `spec.gitCredential`. The token (and the
user name sent with it) is sealed with Fernet (`cryptography`, the library JupyterHub's own
`JUPYTERHUB_CRYPT_KEY` encryption uses) before it reaches the store, so it is encrypted at rest
in SQLite and in Kubernetes Secrets alike. The API never returns it; the engine opens it only to
hand it to git, through a credential helper that reads it from the environment (never from a
command line, a URL, a file in the checkout or a log line).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from traitlets import List, Unicode, default
from traitlets.config import LoggingConfigurable

from .model import MAX_NAME_LENGTH, InvalidObject, now_iso

__all__ = [
    "CredentialVault",
    "CredentialUnreadable",
    "GitCredential",
    "check_credential_input",
    "check_credential_for_repository",
    "public_view",
]

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_HOST = re.compile(r"^(?:[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*|\[[0-9a-f:.]+\])"
                   r"(?::[0-9]{1,5})?$")
# tokens of GitHub, GitLab, Gitea, Bitbucket are printable ASCII; nothing else may reach git's
# credential protocol, where a newline would start another attribute
_TOKEN = re.compile(r"^[\x21-\x7e]{1,4096}$")
_USERNAME = re.compile(r"^[\x21-\x39\x3b-\x7e]{1,256}$")  # printable ASCII without ':'
DEFAULT_USERNAME = "oauth2"  # GitLab wants it for OAuth tokens; GitHub and Gitea take any name
INPUT_FIELDS = {"host", "token", "username"}


class CredentialUnreadable(Exception):
    """A stored credential cannot be opened with the configured keys (the key was changed)."""


@dataclass(frozen=True)
class GitCredential:
    """What git sends to `host`: a user name and a token. The token never shows in a repr."""

    host: str
    username: str
    token: str = field(repr=False)


def check_credential_input(name: str, body) -> dict:
    """A client's PUT body for credential `name`: {"host", "token", "username"?} → the clean
    fields, or InvalidObject naming the field at fault."""
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > MAX_NAME_LENGTH:
        raise InvalidObject(f"a credential's name is lowercase letters, digits and '-', at most "
                            f"{MAX_NAME_LENGTH} characters", "name")
    if not isinstance(body, dict):
        raise InvalidObject("the request body must be a JSON object with host and token", None)
    unknown = sorted(set(body) - INPUT_FIELDS)
    if unknown:
        raise InvalidObject(f"unknown field {unknown[0]}; a credential has host, token and username",
                            unknown[0])
    host = body.get("host")
    if not isinstance(host, str) or not host.strip():
        raise InvalidObject("name the git host the token is for, e.g. github.com", "host")
    host = host.strip().lower()
    if "://" in host or "/" in host or "@" in host:
        raise InvalidObject(f"host is a host name (and port), such as github.com, not a URL: {host!r}", "host")
    if not _HOST.match(host) or len(host) > 255:
        raise InvalidObject(f"{host!r} is not a host name such as github.com or git.example.org:8443", "host")
    token = body.get("token")
    if not isinstance(token, str) or not token:
        raise InvalidObject("the token is missing", "token")
    if not _TOKEN.match(token):
        raise InvalidObject("a token is at most 4096 printable ASCII characters, without spaces or line breaks",
                            "token")
    username = body.get("username", DEFAULT_USERNAME)
    if username in (None, ""):
        username = DEFAULT_USERNAME
    if not isinstance(username, str) or not _USERNAME.match(username):
        raise InvalidObject("the user name is printable ASCII without spaces or ':', at most 256 characters",
                            "username")
    return {"host": host, "token": token, "username": username}


def _is_loopback(hostname: str) -> bool:
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def url_host(url: str) -> str:
    """`host[:port]` of a repository URL, lowercase, the port only when the URL names one."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{parts.port}" if parts.port else host


def check_credential_for_repository(record: dict, url: str) -> None:
    """The credential may be sent to this repository: it is for the repository's host, and the
    URL is https (plain http only to this machine itself). InvalidObject otherwise."""
    host = url_host(url)
    if record["host"] != host:
        raise InvalidObject(
            f"credential {record['name']} is for {record['host']}; the repository is on {host or 'no host'}",
            "spec.gitCredential", "spec.repository")
    scheme = urlsplit(url).scheme.lower()
    if scheme != "https" and not (scheme == "http" and _is_loopback(urlsplit(url).hostname or "")):
        raise InvalidObject(f"a credential is sent over https only, not {scheme}://", "spec.gitCredential",
                            "spec.repository")


def public_view(record: dict) -> dict:
    """What the API shows of a stored credential: never the token."""
    return {key: record[key] for key in ("name", "host", "username", "created", "updated") if key in record}


class CredentialVault(LoggingConfigurable):
    """Seals and opens credentials with Fernet keys (MultiFernet: the first key seals, any opens,
    so keys can be rotated by putting a new one first)."""

    keys = List(
        Unicode(),
        help="""Fernet keys (32 url-safe base64-encoded bytes, `cryptography.fernet.Fernet.generate_key()`)
        that seal users' git credentials at rest. The first seals; all open (put a new key first to
        rotate). The service and, in cluster mode, the operator need the same keys. Default:
        $CNBI_CRYPT_KEY (keys separated by ';'), else a key kept in `key_file`.""",
    ).tag(config=True)

    @default("keys")
    def _default_keys(self):
        return [k for k in os.environ.get("CNBI_CRYPT_KEY", "").split(";") if k.strip()]

    key_file = Unicode(
        "",
        help="""Embedded mode: a file holding the key when `keys` is empty, made (mode 0600) on first
        use. Empty: no key, and storing credentials is refused until one is configured.""",
    ).tag(config=True)

    def _fernet(self, create: bool) -> MultiFernet | None:
        keys = [k.strip() for k in self.keys if k.strip()]
        if not keys and self.key_file:
            if not os.path.exists(self.key_file) and create:
                # O_EXCL: two processes starting at once keep one key
                try:
                    fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:
                    pass
                else:
                    with os.fdopen(fd, "wb") as f:
                        f.write(Fernet.generate_key())
            if os.path.exists(self.key_file):
                with open(self.key_file, "rb") as f:
                    keys = [f.read().decode().strip()]
        if not keys:
            return None
        try:
            return MultiFernet([Fernet(k.encode()) for k in keys])
        except (ValueError, TypeError) as e:
            raise ValueError(f"a credential key is not a Fernet key: {e}") from None

    @property
    def available(self) -> bool:
        return bool([k for k in self.keys if k.strip()] or self.key_file)

    def seal(self, username: str, token: str) -> str:
        fernet = self._fernet(create=True)
        if fernet is None:
            raise CredentialUnreadable("no credential key is configured (CredentialVault.keys or $CNBI_CRYPT_KEY)")
        return fernet.encrypt(json.dumps({"username": username, "token": token}).encode()).decode()

    def open(self, record: dict) -> GitCredential:
        fernet = self._fernet(create=False)
        if fernet is None:
            raise CredentialUnreadable("no credential key is configured here (CredentialVault.keys or "
                                       "$CNBI_CRYPT_KEY), so stored credentials cannot be read")
        try:
            inner = json.loads(fernet.decrypt(record["sealed"].encode()))
        except (InvalidToken, ValueError, KeyError):
            raise CredentialUnreadable(f"credential {record.get('name')} was sealed with a key this service no "
                                       "longer has; store it again") from None
        return GitCredential(host=record["host"], username=inner["username"], token=inner["token"])


def new_record(owner: str, name: str, clean: dict, sealed: str, previous: dict | None = None) -> dict:
    """The stored form of a credential: plain host and name (for listing), sealed user and token."""
    now = now_iso()
    return {"owner": owner, "name": name, "host": clean["host"], "username": clean["username"],
            "sealed": sealed, "created": (previous or {}).get("created", now), "updated": now}


def secret_name(owner: str, name: str) -> str:
    """A Kubernetes Secret name for (owner, name): hub user names need not be DNS names."""
    digest = base64.b32encode(hashlib.sha256(f"{owner}\0{name}".encode()).digest())
    return "cnbi-git-credential-" + digest.decode().lower().rstrip("=")[:24]
