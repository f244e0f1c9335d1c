"""Pytest plugin: real local container registries with real test content.

Load with ``-p tests.infra_registry``. Fixtures (all session-scoped):

- ``local_registry``: Debian's ``docker-registry`` (distribution 2.8) on 127.0.0.1, plain http,
  no auth, filesystem storage in a temp dir.
- ``auth_registry``: the same with htpasswd (bcrypt) Basic auth; ``.credentials``.
- ``token_registry``: the same with Docker token (Bearer) auth. Its token service is a small
  in-process HTTP server written here, because no standalone token server (docker_auth,
  Harbor, Quay) is packaged for this machine. It behaves like docker_auth: HTTP Basic login
  at the realm, an RS256 JWT with an ``x5c`` chain that the real registry verifies against
  ``rootcertbundle``; anonymous callers get a token with no access.
- ``scratch_images``: tiny images built with ``buildah from scratch`` + ``copy`` + ``commit`` in
  a private buildah storage (vfs, temp dir — shared podman storage is never touched), one per
  architecture, with helpers to push them (single manifests and indexes) to a registry.
- ``registry_images``: ``local_registry`` populated with ``TEST_IMAGES`` (see there); maps
  "repository:tag" to the digest buildah reported on push.

Nothing here needs the internet; everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import http.server
import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

DOCKER_REGISTRY_BINARY = "/usr/bin/docker-registry"
REGISTRY_START_TIMEOUT = 30.0

TEST_USERNAME = "cnbi-tester"
TEST_PASSWORD = "s3cret-" + secrets.token_hex(8)

# "repository:tag" -> (architectures, push format). One arch is a single image manifest; more
# make an index (OCI image index / Docker manifest list).
TEST_IMAGES = {
    "cnbi-test/hello:v1": (("amd64",), "oci"),
    "cnbi-test/hello:docker": (("amd64",), "v2s2"),
    "cnbi-test/arm:v1": (("arm64",), "oci"),
    "cnbi-test/multi:v1": (("amd64", "arm64"), "oci"),
    "cnbi-test/multi:docker": (("amd64", "arm64"), "v2s2"),
}


class InfraError(RuntimeError):
    """A piece of test infrastructure (registry, buildah) could not be set up."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run argv (never a shell line); on failure raise with its stderr."""
    result = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise InfraError(
            f"{argv[0]} failed ({result.returncode}): {' '.join(argv)}\n{result.stderr}"
        )
    return result


def end_process(process: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM a process this test run started, then SIGKILL it if it does not exit in time."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


# -- registries ---------------------------------------------------------------------------------


@dataclasses.dataclass
class LocalRegistry:
    """A running docker-registry process on 127.0.0.1."""

    host: str  # "127.0.0.1:PORT", as written in image references
    root: Path  # config, storage, logs
    process: subprocess.Popen
    credentials: tuple[str, str] | None = None
    images: dict[str, str] = dataclasses.field(default_factory=dict)
    token_service: TokenService | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def auth_json(self) -> dict:
        """A containers-auth.json / .dockerconfigjson dict holding this registry's credentials."""
        if not self.credentials:
            return {"auths": {}}
        token = base64.b64encode(":".join(self.credentials).encode()).decode()
        return {"auths": {self.host: {"auth": token}}}

    def authfile(self) -> Path | None:
        """The auth JSON written to a file for buildah/skopeo ``--authfile``."""
        if not self.credentials:
            return None
        path = self.root / "auth.json"
        path.write_text(json.dumps(self.auth_json))
        return path

    def skopeo_inspect(self, reference: str, raw: bool = False) -> dict:
        """``skopeo inspect`` of docker://HOST/reference: an independent view of the registry."""
        argv = ["skopeo", "inspect", "--tls-verify=false"]
        authfile = self.authfile()
        argv += [f"--authfile={authfile}"] if authfile else ["--no-creds"]
        if raw:
            argv.append("--raw")
        argv.append(f"docker://{self.host}/{reference}")
        return json.loads(run(argv, timeout=60).stdout)

    def stop(self) -> None:
        end_process(self.process)


def _wait_for_registry(host: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + REGISTRY_START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise InfraError(
                f"docker-registry exited with {process.returncode}:\n{log_path.read_text()}"
            )
        try:
            with urllib.request.urlopen(f"http://{host}/v2/", timeout=2) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as error:
            if error.code == 401:  # auth-protected registries answer /v2/ with a challenge
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise InfraError(
        f"docker-registry on {host} did not answer /v2/ within {REGISTRY_START_TIMEOUT}s"
    )


def start_registry(root: Path, auth_config: dict | None = None) -> LocalRegistry:
    """Start docker-registry with its storage under ``root``; wait until /v2/ answers."""
    if not os.access(DOCKER_REGISTRY_BINARY, os.X_OK):
        raise InfraError(f"{DOCKER_REGISTRY_BINARY} is missing: apt-get install docker-registry")
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    host = f"127.0.0.1:{port}"
    config = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(root / "storage")},
            "delete": {"enabled": True},
        },
        "http": {"addr": host, "secret": secrets.token_hex(16)},
    }
    if auth_config:
        config["auth"] = auth_config
    config_path = root / "config.yml"
    # JSON is YAML; the registry reads it as its config.yml.
    config_path.write_text(json.dumps(config, indent=2))
    log_path = root / "registry.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [DOCKER_REGISTRY_BINARY, "serve", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    registry = LocalRegistry(host=host, root=root, process=process)
    try:
        _wait_for_registry(host, process, log_path)
    except BaseException:
        registry.stop()
        raise
    return registry


def bcrypt_htpasswd_line(username: str, password: str) -> str:
    """An htpasswd line with a bcrypt hash, the only format docker-registry accepts."""
    import bcrypt  # installed into the venv for this purpose

    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=6)).decode()
    return f"{username}:{hashed}\n"


# -- token service ------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenService:
    """Docker token service stand-in (see the module docstring); RS256 JWTs with x5c."""

    issuer = "cnbi-test-issuer"
    service = "cnbi-test-registry"

    def __init__(self, root: Path, credentials: tuple[str, str]):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.credentials = credentials
        self.requests: list[dict] = []
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cnbi test token signer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_path = root / "token-signer.pem"
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()

        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                service._handle(self)

            def log_message(self, *args):  # keep pytest output clean
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self._server.server_address[1]}/token"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def sign(self, subject: str, access: list[dict]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        )
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"

    def _handle(self, request: http.server.BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(request.path)
        query = urllib.parse.parse_qs(url.query)
        authorization = request.headers.get("Authorization", "")
        user = None
        if authorization.startswith("Basic "):
            try:
                decoded = base64.b64decode(authorization[6:]).decode()
            except ValueError:
                decoded = ""
            if tuple(decoded.split(":", 1)) != self.credentials:
                self._reply(request, 401, {"details": "incorrect username or password"})
                return
            user = self.credentials[0]
        self.requests.append(
            {"user": user, "service": query.get("service"), "scope": query.get("scope")}
        )
        if url.path != "/token" or query.get("service") != [self.service]:
            self._reply(request, 400, {"details": "unknown service"})
            return
        access = []
        if user:  # like docker_auth with an ACL of "authenticated users may pull and push"
            for scope in query.get("scope", []):
                kind, _, rest = scope.partition(":")
                name, _, actions = rest.rpartition(":")
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
        token = self.sign(user or "", access)
        self._reply(request, 200, {"token": token, "access_token": token, "expires_in": 300})

    @staticmethod
    def _reply(request, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# -- test images --------------------------------------------------------------------------------


class ScratchImages:
    """Tiny images built from scratch in a private buildah storage, pushable to registries."""

    def __init__(self, root: Path):
        if not shutil.which("buildah"):
            raise InfraError("buildah is missing: apt-get install buildah")
        self.root = root
        self.images: dict[str, str] = {}  # architecture -> local image name

    def buildah(self, *args: str, timeout: float = 120) -> str:
        argv = [
            "buildah",
            f"--root={self.root / 'storage'}",
            f"--runroot={self.root / 'run'}",
            "--storage-driver=vfs",
            *args,
        ]
        return run(argv, timeout=timeout).stdout.strip()

    def build(self, architecture: str) -> str:
        """Build (once) a one-file linux/<architecture> image; return its local name."""
        if architecture in self.images:
            return self.images[architecture]
        content = self.root / f"hello-{architecture}.txt"
        content.write_text(f"hello from cnbi_hub tests, {architecture}\n")
        container = self.buildah("from", "scratch")
        try:
            self.buildah("copy", container, str(content), "/hello.txt")
            self.buildah("config", "--os=linux", f"--arch={architecture}", container)
            name = f"localhost/cnbi-test/scratch:{architecture}"
            self.buildah("commit", "--quiet", container, name)
        finally:
            self.buildah("rm", container)
        self.images[architecture] = name
        return name

    def _push_args(self, registry: LocalRegistry, push_format: str) -> list[str]:
        args = ["--tls-verify=false", f"--format={push_format}"]
        authfile = registry.authfile()
        if authfile:
            args.append(f"--authfile={authfile}")
        return args

    def push(
        self,
        registry: LocalRegistry,
        reference: str,
        architectures: tuple[str, ...] = ("amd64",),
        push_format: str = "oci",
    ) -> str:
        """Push to ``registry.host/reference``; an index when several architectures.

        Returns the manifest digest buildah reports (records it in ``registry.images``).
        """
        digest_file = self.root / "digest"
        destination = f"docker://{registry.host}/{reference}"
        if len(architectures) == 1:
            image = self.build(architectures[0])
            self.buildah(
                "push",
                *self._push_args(registry, push_format),
                f"--digestfile={digest_file}",
                image,
                destination,
            )
        else:
            index_name = f"localhost/cnbi-test/index-{secrets.token_hex(4)}"
            self.buildah("manifest", "create", index_name)
            try:
                for architecture in architectures:
                    self.buildah("manifest", "add", index_name, self.build(architecture))
                self.buildah(
                    "manifest",
                    "push",
                    "--all",
                    *self._push_args(registry, push_format),
                    f"--digestfile={digest_file}",
                    index_name,
                    destination,
                )
            finally:
                self.buildah("manifest", "rm", index_name)
        digest = digest_file.read_text().strip()
        registry.images[reference] = digest
        return digest


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def scratch_images(tmp_path_factory) -> ScratchImages:
    return ScratchImages(tmp_path_factory.mktemp("scratch-images"))


@pytest.fixture(scope="session")
def local_registry(tmp_path_factory):
    registry = start_registry(tmp_path_factory.mktemp("registry"))
    yield registry
    registry.stop()


@pytest.fixture(scope="session")
def registry_images(local_registry, scratch_images) -> dict[str, str]:
    """``local_registry`` holding every image in TEST_IMAGES: {"repo:tag": digest}."""
    for reference, (architectures, push_format) in TEST_IMAGES.items():
        scratch_images.push(local_registry, reference, architectures, push_format)
    return dict(local_registry.images)


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory, scratch_images):
    """A registry with htpasswd Basic auth holding ``cnbi-test/hello:v1``."""
    root = tmp_path_factory.mktemp("auth-registry")
    htpasswd = root / "htpasswd"
    htpasswd.write_text(bcrypt_htpasswd_line(TEST_USERNAME, TEST_PASSWORD))
    registry = start_registry(root, {"htpasswd": {"realm": "cnbi-test", "path": str(htpasswd)}})
    registry.credentials = (TEST_USERNAME, TEST_PASSWORD)
    try:
        scratch_images.push(registry, "cnbi-test/hello:v1")
        yield registry
    finally:
        registry.stop()


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory, scratch_images):
    """A registry with Docker token (Bearer) auth holding ``cnbi-test/hello:v1``.

    ``.token_service`` is the TokenService; its ``requests`` list records each token request.
    """
    root = tmp_path_factory.mktemp("token-registry")
    token_service = TokenService(root, (TEST_USERNAME, TEST_PASSWORD))
    try:
        registry = start_registry(
            root,
            {
                "token": {
                    "realm": token_service.realm,
                    "service": token_service.service,
                    "issuer": token_service.issuer,
                    "rootcertbundle": str(token_service.cert_path),
                }
            },
        )
        registry.credentials = (TEST_USERNAME, TEST_PASSWORD)
        registry.token_service = token_service
        try:
            scratch_images.push(registry, "cnbi-test/hello:v1")
            yield registry
        finally:
            registry.stop()
    finally:
        token_service.stop()
