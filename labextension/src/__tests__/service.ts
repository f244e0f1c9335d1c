/**
 * A real HTTP server on 127.0.0.1 answering the routes of `{base}/cnbi/api/` the way the cnbi
 * service (through the server extension) does, per docs/object.md: JSON bodies, `{message,
 * field}` errors, and Server-Sent Events streams that the test pushes events into. It stands in
 * for the Python service, which cannot run inside jest; it keeps its images in memory.
 */
import * as http from 'http';
import type { AddressInfo } from 'net';

import type { ICustomNBImage } from '../model';

export interface IRecordedRequest {
  method: string;
  url: string;
  body: string;
}

export class TestCnbiService {
  images: ICustomNBImage[] = [];
  logs: Record<string, string> = {};
  locks: Record<string, string> = {};
  requests: IRecordedRequest[] = [];
  /** Status the next N event-stream requests answer with instead of a stream. */
  failNextStreams: number[] = [];
  streams = new Map<string, Set<http.ServerResponse>>();
  streamOpens = 0;

  baseUrl = '';
  private server = http.createServer((req, res) => this.handle(req, res));

  async start(): Promise<void> {
    await new Promise<void>(resolve => this.server.listen(0, '127.0.0.1', resolve));
    const port = (this.server.address() as AddressInfo).port;
    this.baseUrl = `http://127.0.0.1:${port}/user/alice/`;
  }

  async stop(): Promise<void> {
    for (const set of this.streams.values()) {
      set.forEach(res => res.destroy());
    }
    this.server.closeAllConnections();
    await new Promise<void>(resolve => this.server.close(() => resolve()));
  }

  /** Send one SSE event to everyone watching `name`. */
  push(name: string, event: string, data: unknown): void {
    for (const res of this.streams.get(name) ?? []) {
      res.write(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
    }
  }

  /** Close (server side) every open stream of `name`. */
  dropStreams(name: string): void {
    for (const res of this.streams.get(name) ?? []) {
      res.end();
    }
    this.streams.get(name)?.clear();
  }

  watchers(name: string): number {
    return this.streams.get(name)?.size ?? 0;
  }

  async waitFor(predicate: () => boolean, timeoutMs = 5000): Promise<void> {
    const start = Date.now();
    while (!predicate()) {
      if (Date.now() - start > timeoutMs) {
        throw new Error('timed out waiting for the test service');
      }
      await new Promise(r => setTimeout(r, 10));
    }
  }

  private json(res: http.ServerResponse, status: number, body: unknown): void {
    res.writeHead(status, { 'Content-Type': 'application/json' });
    res.end(JSON.stringify(body));
  }

  private handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    let body = '';
    req.on('data', chunk => (body += chunk));
    req.on('end', () => {
      this.requests.push({ method: req.method!, url: req.url!, body });
      const url = new URL(req.url!, 'http://127.0.0.1');
      const prefix = '/user/alice/cnbi/api/';
      if (!url.pathname.startsWith(prefix)) {
        return this.json(res, 404, { message: 'not found' });
      }
      this.route(req.method!, url.pathname.slice(prefix.length), url, body, res);
    });
  }

  private route(
    method: string,
    path: string,
    url: URL,
    body: string,
    res: http.ServerResponse
  ): void {
    const parts = path.split('/').map(decodeURIComponent);
    const find = (name: string) => this.images.find(i => i.metadata.name === name);
    if (path === 'images' && method === 'GET') {
      return this.json(res, 200, { items: this.images });
    }
    if (path === 'images' && method === 'POST') {
      const obj = JSON.parse(body) as ICustomNBImage;
      const packages = obj.spec.packageVersions ?? [];
      const bad = packages.findIndex(p => !/^[A-Za-z0-9][A-Za-z0-9._-]*\s*((==|>=|<=|~=|!=|<|>)\s*[\w.*]+)?$/.test(p));
      if (bad >= 0) {
        return this.json(res, 422, {
          message: `not a valid requirement: ${packages[bad]}`,
          field: `spec.packageVersions[${bad}]`
        });
      }
      if (url.searchParams.get('dryRun') === 'true') {
        return this.json(res, 200, obj);
      }
      const created: ICustomNBImage = {
        ...obj,
        metadata: {
          ...obj.metadata,
          name: `image-${this.images.length + 1}`,
          resourceVersion: '1',
          annotations: {
            ...obj.metadata.annotations,
            'opendatahub.io/notebook-image-creator': 'alice'
          }
        },
        status: { phase: 'Pending' }
      };
      this.images.unshift(created);
      return this.json(res, 201, created);
    }
    if (path === 'settings') {
      return this.json(res, 200, { namedServers: true });
    }
    if (path === 'base-images') {
      return this.json(res, 200, {
        items: [
          { image: 'localhost:5000/notebook:1', displayName: 'Notebook 1' },
          { image: 'localhost:5000/notebook:2', displayName: 'Notebook 2' }
        ]
      });
    }
    if (path === 'check-image') {
      const ref = url.searchParams.get('image');
      return ref === 'localhost:5000/exists:1'
        ? this.json(res, 200, { exists: true, digest: 'sha256:abc', platforms: ['linux/amd64'] })
        : this.json(res, 200, { exists: false });
    }
    if (parts[0] === 'images' && parts.length >= 2) {
      const obj = find(parts[1]);
      if (!obj) {
        return this.json(res, 404, { message: `image ${parts[1]} not found`, field: 'metadata.name' });
      }
      const sub = parts[2] ?? '';
      if (sub === 'events') {
        this.streamOpens++;
        const fail = this.failNextStreams.shift();
        if (fail) {
          return this.json(res, fail, { message: 'the hub is restarting' });
        }
        res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache' });
        res.write(`event: object\ndata: ${JSON.stringify(obj)}\n\n`);
        const set = this.streams.get(parts[1]) ?? new Set();
        set.add(res);
        this.streams.set(parts[1], set);
        res.on('close', () => set.delete(res));
        return;
      }
      if (sub === 'logs') {
        res.writeHead(200, { 'Content-Type': 'text/plain' });
        return void res.end(this.logs[parts[1]] ?? '');
      }
      if (sub === 'lock') {
        if (!(parts[1] in this.locks)) {
          return this.json(res, 404, { message: 'no lock yet' });
        }
        res.writeHead(200, { 'Content-Type': 'text/plain' });
        return void res.end(this.locks[parts[1]]);
      }
      if (sub === 'rebuild' && method === 'POST') {
        const rebuilt = { ...obj, status: { phase: 'Pending' as const } };
        this.images = this.images.map(i => (i === obj ? rebuilt : i));
        return this.json(res, 201, rebuilt);
      }
      if (!sub && method === 'DELETE') {
        this.images = this.images.filter(i => i !== obj);
        res.writeHead(204);
        return void res.end();
      }
      if (!sub && method === 'GET') {
        return this.json(res, 200, obj);
      }
    }
    this.json(res, 404, { message: `no route ${method} ${path}` });
  }
}
