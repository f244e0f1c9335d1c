"""Pytest plugin: a private git host on 127.0.0.1 — smart HTTP (`git http-backend`) that asks
for a token, as GitHub or GitLab do for a private repository.

- ``private_git_server`` (session): the server; ``make_repo`` as for the git daemon, ``token``
  the one it accepts (any user name), ``requests`` what it was asked, with or without a token.
"""

from __future__ import annotations

import base64
import gzip
import hmac
import secrets
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.infra_podman import GitServer, git_environ

REALM = "cnbi-test-private-git"


class TokenGitServer(GitServer):
    """Bare repositories under ``root`` served over smart HTTP; every request needs the token."""

    def __init__(self, root: Path, token: str):
        self.root = root
        self.token = token
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, authorized)
        # repositories whose branch moves on after each fetch, as a busy repository's does:
        # every build of them builds a new commit (name -> the GitRepo)
        self.moving: dict[str, "object"] = {}
        self.authorization_headers: list[str] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}.git"

    def start(self) -> "TokenGitServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _authorized(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            _user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False
        return hmac.compare_digest(password.encode(), self.token.encode())

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet: the test reads `requests`
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _serve(self):
                body = self._body() if self.command == "POST" else b""
                header = self.headers.get("Authorization")
                if header:
                    server.authorization_headers.append(header)
                authorized = server._authorized(header)
                path, _, query = self.path.partition("?")
                server.requests.append((self.command, path, authorized))
                if not authorized:
                    message = b"a token is required\n"
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", f'Basic realm="{REALM}"')
                    self.send_header("Content-Length", str(len(message)))
                    self.end_headers()
                    self.wfile.write(message)
                    return
                env = dict(git_environ(), GIT_PROJECT_ROOT=str(server.root), GIT_HTTP_EXPORT_ALL="1",
                           REQUEST_METHOD=self.command, PATH_INFO=path, QUERY_STRING=query,
                           CONTENT_TYPE=self.headers.get("Content-Type", ""), REMOTE_USER="token",
                           REMOTE_ADDR="127.0.0.1", CONTENT_LENGTH=str(len(body)))
                if self.headers.get("Git-Protocol"):
                    env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
                if self.headers.get("Content-Encoding"):
                    env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
                done = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True,
                                      timeout=60)
                head, _, payload = done.stdout.partition(b"\r\n\r\n")
                if not _:
                    head, _, payload = done.stdout.partition(b"\n\n")
                status, headers = 200, []
                for line in head.decode(errors="replace").splitlines():
                    key, _, value = line.partition(":")
                    if key.lower() == "status":
                        status = int(value.strip().split()[0])
                    elif key:
                        headers.append((key, value.strip()))
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                self.wfile.flush()
                repo = server.moving.get(path.split("/")[1].removesuffix(".git")) if path.count("/") > 1 else None
                plain = gzip.decompress(body) if self.headers.get("Content-Encoding") == "gzip" else body
                if repo is not None and path.endswith("/git-upload-pack") and b"command=fetch" in plain:
                    from tests.infra_podman import push_commit

                    push_commit(repo, {"README.md": f"moved on after fetch {len(server.requests)}\n"})

            do_GET = _serve
            do_POST = _serve

        return Handler


@pytest.fixture(scope="session")
def private_git_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("private-git")
    # the shape of a GitHub fine-grained token, so a leak check looks for something real
    server = TokenGitServer(root, "github_pat_" + secrets.token_urlsafe(40)).start()
    try:
        yield server
    finally:
        server.stop()
