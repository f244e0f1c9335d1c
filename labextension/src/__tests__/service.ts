/**
 * A real HTTP server on 127.0.0.1 answering the routes of `{base}/cnbi/api/` the way the cnbi
 * service (through the server extension) does, per docs/object.md and the issue 8 contract:
 * JSON bodies, `{message, field, relatedField}` errors, the list newest first, sharing by PATCH,
 * cancel, check-image's `result`, and Server-Sent Events streams that the test pushes events
 * into; plus the server extension's own `{base}/cnbi/server-info` and `{base}/cnbi/environment`.
 * It stands in for the Python service, which cannot run inside jest; it keeps its images in
 * memory.
 */
import * as http from 'http';
import type { AddressInfo } from 'net';

import { compareNewestFirst } from '../model';
import type {
  ICustomNBImage,
  IEnvironment,
  IGeneration,
  IGitCredential,
  IServerInfo,
  IUserInfo
} from '../model';

/** An answer other than 200 with a JSON body. */
export interface ICannedAnswer {
  status: number;
  body: unknown;
}

/** PEP 503 name of a requirement, as the service compares them. */
function projectName(requirement: string): string {
  return (/^\s*([A-Za-z0-9._-]+)/.exec(requirement)?.[1] ?? requirement)
    .toLowerCase()
    .replace(/[-_.]+/g, '-');
}

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
  /** api/images/{name}/generations answers, by image name (none: 404, like an unknown image). */
  generations: Record<string, IGeneration[]> = {};
  /** Set by POST cnbi/restart: server-info then answers as a stopped server's. */
  stopped = false;
  /** The user's stored git credentials, as api/credentials lists them (no token). */
  credentials: IGitCredential[] = [];
  /** Status the next N event-stream requests answer with instead of a stream. */
  failNextStreams: number[] = [];
  streams = new Map<string, Set<http.ServerResponse>>();
  streamOpens = 0;
  /** api/settings `user`; null answers like an older service (no `user`). */
  user: IUserInfo | null = { name: 'alice', admin: false, groups: ['team-a'] };
  /** The error the next POST api/images answers with (after the package checks). */
  nextCreateError: ICannedAnswer | null = null;
  /** The error the next PATCH api/images/{name} answers with. */
  nextPatchError: ICannedAnswer | null = null;
  /** {base}cnbi/server-info */
  serverInfo: IServerInfo = { cnbiImage: null, jupyterImage: 'localhost:5000/notebook:1', serverName: '' };
  /** {base}cnbi/environment: the object, or another status (409) with its body. */
  environment: IEnvironment | ICannedAnswer = {
    baseImage: 'localhost:5000/notebook:1',
    cnbiImage: null,
    baseline: 'startup',
    added: [],
    changed: [],
    removed: [],
    requirements: []
  };
  private clock = Date.parse('2026-11-23T09:00:00Z');

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

  /** Store a new version of an object and tell its watchers, as the service does. */
  replace(old: ICustomNBImage, next: ICustomNBImage): void {
    this.images = this.images.map(i => (i === old ? next : i));
    this.push(next.metadata.name!, 'object', next);
  }

  private nextVersion(obj: ICustomNBImage): string {
    return String(Number(obj.metadata.resourceVersion ?? 0) + 1);
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
      if (url.pathname === '/user/alice/cnbi/server-info') {
        // once asked to restart, the server goes away: the hub answers for it
        return this.stopped
          ? this.json(res, 503, { message: 'server not running' })
          : this.json(res, 200, this.serverInfo);
      }
      if (url.pathname === '/user/alice/cnbi/restart' && req.method === 'POST') {
        const name = this.serverInfo.cnbiImage;
        if (!name) {
          return this.json(res, 409, { message: 'this server does not run on an Image Builder image' });
        }
        this.stopped = true;
        const server = encodeURIComponent(this.serverInfo.serverName);
        return this.json(res, 202, { nextUrl: `/services/cnbi/restarting/${name}?server=${server}` });
      }
      if (url.pathname === '/user/alice/cnbi/environment') {
        const env = this.environment;
        return 'status' in env ? this.json(res, env.status, env.body) : this.json(res, 200, env);
      }
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
    if (path === 'credentials' && method === 'GET') {
      return this.json(res, 200, { items: this.credentials });
    }
    if (parts[0] === 'credentials' && parts.length === 2 && method === 'PUT') {
      const sent = JSON.parse(body) as { host: string; token: string; username?: string };
      if (sent.host.includes('://')) {
        return this.json(res, 422, {
          message: `host is a host name (and port), such as github.com, not a URL: '${sent.host}'`,
          field: 'host'
        });
      }
      const stored = { name: parts[1], host: sent.host, username: sent.username ?? 'oauth2' };
      const existed = this.credentials.some(c => c.name === parts[1]);
      this.credentials = [...this.credentials.filter(c => c.name !== parts[1]), stored];
      return this.json(res, existed ? 200 : 201, stored);
    }
    if (parts[0] === 'credentials' && parts.length === 2 && method === 'DELETE') {
      this.credentials = this.credentials.filter(c => c.name !== parts[1]);
      res.writeHead(204);
      return void res.end();
    }
    if (path === 'images' && method === 'GET') {
      return this.json(res, 200, { items: [...this.images].sort(compareNewestFirst) });
    }
    if (path === 'images' && method === 'POST') {
      const obj = JSON.parse(body) as ICustomNBImage;
      const packages = obj.spec.packageVersions ?? [];
      const seen = new Map<string, number>();
      for (let i = 0; i < packages.length; i++) {
        const dangling = /(==|>=|<=|~=|!=|<|>)\s*$/.exec(packages[i]);
        if (dangling) {
          return this.json(res, 422, {
            message: `a version is missing after ${dangling[1]}`,
            field: `spec.packageVersions[${i}]`
          });
        }
        if (!/^[A-Za-z0-9][A-Za-z0-9._-]*\s*((==|>=|<=|~=|!=|<|>)\s*[\w.*]+)?$/.test(packages[i])) {
          return this.json(res, 422, {
            message: `not a valid requirement: ${packages[i]}`,
            field: `spec.packageVersions[${i}]`
          });
        }
        const name = projectName(packages[i]);
        if (seen.has(name)) {
          return this.json(res, 422, {
            message: `${/^[A-Za-z0-9._-]+/.exec(packages[i])![0]} is already listed`,
            field: `spec.packageVersions[${i}]`,
            relatedField: `spec.packageVersions[${seen.get(name)}]`
          });
        }
        seen.set(name, i);
      }
      if (url.searchParams.get('dryRun') === 'true') {
        return this.json(res, 200, obj);
      }
      if (this.nextCreateError) {
        const answer = this.nextCreateError;
        this.nextCreateError = null;
        return this.json(res, answer.status, answer.body);
      }
      const created: ICustomNBImage = {
        ...obj,
        metadata: {
          ...obj.metadata,
          name: `image-${this.images.length + 1}`,
          resourceVersion: '1',
          creationTimestamp: new Date((this.clock += 1000)).toISOString(),
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
      return this.json(res, 200, this.user ? { namedServers: true, user: this.user } : { namedServers: true });
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
      if (ref === 'localhost:5000/exists:1') {
        return this.json(res, 200, {
          result: 'found',
          exists: true,
          digest: 'sha256:abc',
          platforms: ['linux/amd64'],
          message: 'found'
        });
      }
      if (ref?.startsWith('quay.io/private/')) {
        return this.json(res, 200, {
          result: 'private',
          exists: null,
          digest: null,
          platforms: [],
          message: 'quay.io wants credentials to read this image'
        });
      }
      if (ref === 'bad ref') {
        return this.json(res, 422, { message: 'not an image reference', field: 'image' });
      }
      return this.json(res, 200, { result: 'notFound', exists: false, digest: null, platforms: [], message: '' });
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
      if (sub === 'generations' && method === 'GET') {
        return this.json(res, 200, { items: this.generations[parts[1]] ?? [] });
      }
      if (sub === 'rollback' && method === 'POST') {
        const { run, rebuild } = JSON.parse(body) as { run: number; rebuild?: boolean };
        if (rebuild) {
          const next = (obj.status?.run ?? 1) + 1;
          const again: ICustomNBImage = {
            ...obj,
            metadata: { ...obj.metadata, resourceVersion: this.nextVersion(obj) },
            status: {
              ...obj.status,
              phase: 'Pending',
              run: next,
              triggers: [...(obj.status?.triggers ?? []), { kind: 'restore', by: 'alice', toRun: run, run: next }]
            }
          };
          this.replace(obj, again);
          return this.json(res, 200, again);
        }
        const kept = (this.generations[parts[1]] ?? []).find(g => g.run === run && !g.current);
        if (!kept) {
          return this.json(res, 422, { message: `cannot go back to run ${run}`, field: 'run' });
        }
        const next = (obj.status?.run ?? 1) + 1;
        const back: ICustomNBImage = {
          ...obj,
          metadata: { ...obj.metadata, resourceVersion: this.nextVersion(obj) },
          status: {
            ...obj.status,
            phase: 'Ready',
            run: next,
            image: kept.image,
            triggers: [...(obj.status?.triggers ?? []), { kind: 'rollback', by: 'alice', toRun: run, run: next }]
          }
        };
        const current = this.generations[parts[1]].find(g => g.current)!;
        this.generations[parts[1]] = [
          { ...kept, run: next, current: true },
          { ...current, current: false },
          ...this.generations[parts[1]].filter(g => !g.current && g.run !== run)
        ];
        this.replace(obj, back);
        return this.json(res, 200, back);
      }
      if (sub === 'rebuild' && method === 'POST') {
        const rebuilt: ICustomNBImage = {
          ...obj,
          metadata: { ...obj.metadata, resourceVersion: this.nextVersion(obj) },
          status: { phase: 'Pending', run: (obj.status?.run ?? 1) + 1 }
        };
        this.replace(obj, rebuilt);
        return this.json(res, 201, rebuilt);
      }
      if (sub === 'cancel' && method === 'POST') {
        const phase = obj.status?.phase ?? 'Pending';
        if (phase === 'Ready' || phase === 'Failed') {
          return this.json(res, 409, { message: `the build of ${parts[1]} already finished (${phase})` });
        }
        const cancelled: ICustomNBImage = {
          ...obj,
          metadata: { ...obj.metadata, resourceVersion: this.nextVersion(obj) },
          status: {
            ...obj.status,
            phase: 'Failed',
            failedPhase: phase,
            completionTime: new Date(this.clock).toISOString(),
            conditions: [
              ...(obj.status?.conditions ?? []),
              {
                type: 'Cancelled',
                status: 'True',
                reason: 'Cancelled',
                message: `cancelled by ${this.user?.name ?? 'alice'}`,
                lastTransitionTime: new Date(this.clock).toISOString()
              }
            ]
          }
        };
        this.replace(obj, cancelled);
        return this.json(res, 200, cancelled);
      }
      if (!sub && method === 'PATCH') {
        if (this.nextPatchError) {
          const answer = this.nextPatchError;
          this.nextPatchError = null;
          return this.json(res, answer.status, answer.body);
        }
        const patch = JSON.parse(body || '{}');
        const user = this.user ?? { name: 'alice', admin: false, groups: [] };
        const annotations = { ...obj.metadata.annotations };
        if ('shared' in patch) {
          if (!user.admin) {
            return this.json(res, 403, { message: 'only an admin can share an image with everyone', field: 'shared' });
          }
          if (patch.shared) {
            annotations['cnbi-hub.io/shared'] = 'true';
          } else {
            delete annotations['cnbi-hub.io/shared'];
          }
        }
        if ('sharedWithGroups' in patch) {
          const groups: string[] = patch.sharedWithGroups;
          const foreign = groups.filter(g => !user.groups.includes(g));
          if (!user.admin && foreign.length) {
            return this.json(res, 403, {
              message: `you are not a member of ${foreign.join(', ')}`,
              field: 'sharedWithGroups'
            });
          }
          if (groups.length) {
            annotations['cnbi-hub.io/shared-with-groups'] = [...groups].sort().join(',');
          } else {
            delete annotations['cnbi-hub.io/shared-with-groups'];
          }
        }
        const patched: ICustomNBImage = {
          ...obj,
          metadata: { ...obj.metadata, annotations, resourceVersion: this.nextVersion(obj) }
        };
        this.replace(obj, patched);
        return this.json(res, 200, patched);
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
