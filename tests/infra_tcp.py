"""TCP passthroughs on 127.0.0.1: one whose connections can be cut (a network that drops a
client's connections, a watch or a request, mid-stream while the server itself stays up), and
an HTTP CONNECT proxy (what $HTTPS_PROXY names)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import urlparse

import yaml


class CuttableProxy:
    """Forwards each connection to `host:port` byte for byte (TLS passes through untouched);
    `cut()` aborts every connection it carries now, and new ones are accepted as before."""

    @classmethod
    async def in_front_of(cls, kubeconfig: Path, written: Path) -> "CuttableProxy":
        """A proxy in front of `kubeconfig`'s apiserver, and the same kubeconfig through it at
        `written` (TLS passes through: the server's certificate names 127.0.0.1, any port)."""
        document = yaml.safe_load(Path(kubeconfig).read_text())
        server = urlparse(document["clusters"][0]["cluster"]["server"])
        proxy = await cls(server.hostname, server.port).start()
        for cluster in document["clusters"]:
            cluster["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
        Path(written).write_text(yaml.safe_dump(document))
        return proxy

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.port = 0
        self.connections = 0  # accepted so far
        self.cut_connections = 0  # aborted by cut()
        self._open: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> "CuttableProxy":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, client_reader, client_writer) -> None:
        self.connections += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            return
        pair = (client_writer, upstream_writer)
        self._open.add(pair)
        try:
            await asyncio.gather(_pipe(client_reader, upstream_writer), _pipe(upstream_reader, client_writer))
        finally:
            self._open.discard(pair)

    def cut(self) -> int:
        """Abort every open connection (no FIN: as a dropped network does); how many."""
        pairs = list(self._open)
        for client, upstream in pairs:
            client.transport.abort()
            upstream.transport.abort()
        self.cut_connections += len(pairs)
        return len(pairs)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self.cut()
            await self._server.wait_closed()


class ConnectProxy:
    """An HTTP CONNECT proxy: tunnels each connection to the host and port its CONNECT names,
    counting the tunnels it opened."""

    def __init__(self):
        self.tunnels = 0
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> str:
        """Start it; its address for $HTTPS_PROXY."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, client_reader, client_writer) -> None:
        request = await client_reader.readuntil(b"\r\n\r\n")
        method, target, _ = request.split(b"\r\n", 1)[0].split(b" ", 2)
        if method != b"CONNECT":
            client_writer.close()
            return
        host, port = target.decode().rsplit(":", 1)
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        self.tunnels += 1
        client_writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await client_writer.drain()
        await asyncio.gather(_pipe(client_reader, upstream_writer), _pipe(upstream_reader, client_writer))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
