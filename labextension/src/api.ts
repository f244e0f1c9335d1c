/**
 * Calls to the user's own server at `{baseUrl}cnbi/api/...`, which the cnbi_hub server
 * extension forwards to the hub's cnbi service.
 */

import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import type {
  IBaseImage,
  ICheckImageResult,
  ICustomNBImage,
  IEnvironment,
  IGeneration,
  IGitCredential,
  IServerInfo,
  IUserInfo
} from './model';

/** GET api/settings: how the hub is set up, as far as the panel needs to know. */
export interface IServiceSettings {
  /** The hub allows named servers: start a new one per image, keep the running one. */
  namedServers: boolean;
  /** Who the panel works for; missing from an older service. */
  user?: IUserInfo;
}

/** PATCH api/images/{name}: what may change. */
export interface IImagePatch {
  displayName?: string;
  description?: string;
  /** Admins only: shared with everyone. */
  shared?: boolean;
  /** Admins: any group; owners: groups they are in. [] unshares from all groups. */
  sharedWithGroups?: string[];
}

/** An answer of the service that is not a success: `{message, field, relatedField}` with its status. */
export class CnbiApiError extends Error {
  constructor(status: number, message: string, field?: string, relatedField?: string) {
    super(message);
    this.name = 'CnbiApiError';
    this.status = status;
    this.field = field;
    this.relatedField = relatedField;
  }
  readonly status: number;
  readonly field?: string;
  /** The earlier entry a package error refers to (a duplicate's first listing). */
  readonly relatedField?: string;
}

/** A cookie of this page, as JupyterLab's ServerConnection reads `_xsrf`. */
export function readCookie(name: string): string | undefined {
  let cookie = '';
  try {
    cookie = typeof document === 'undefined' ? '' : document.cookie;
  } catch {
    return undefined; // e.g. a sandboxed frame
  }
  const match = cookie.match('\\b' + name + '=([^;]*)\\b');
  return match ? match[1] : undefined;
}

export class CnbiApi {
  constructor(settings?: ServerConnection.ISettings) {
    this.settings = settings ?? ServerConnection.makeSettings();
  }

  readonly settings: ServerConnection.ISettings;

  url(path: string, query?: Record<string, string>): string {
    let url = URLExt.join(this.settings.baseUrl, 'cnbi/api', path);
    if (query && Object.keys(query).length) {
      url += URLExt.objectToQueryString(query);
    }
    return url;
  }

  /** A route of this server's own extension (`{baseUrl}cnbi/...`, not forwarded to the service). */
  localUrl(path: string): string {
    return URLExt.join(this.settings.baseUrl, 'cnbi', path);
  }

  /**
   * URL of an image's event stream, for EventSource. EventSource sends no custom headers, so
   * what ServerConnection puts in headers goes in the query: the `_xsrf` cookie's value (under
   * JupyterHub a cookie-authenticated request in `cors` fetch mode, as EventSource's is, is
   * refused with 403 without it) and, where websockets get it too, the server's token.
   */
  eventsUrl(name: string): string {
    const query: Record<string, string> = {};
    const xsrf = readCookie('_xsrf');
    if (xsrf) {
      query._xsrf = xsrf;
    }
    if (this.settings.token && this.settings.appendToken) {
      query.token = this.settings.token;
    }
    return this.url(`images/${encodeURIComponent(name)}/events`, query);
  }

  logsUrl(name: string): string {
    return this.url(`images/${encodeURIComponent(name)}/logs`);
  }

  request(
    path: string,
    init: RequestInit = {},
    query?: Record<string, string>
  ): Promise<Response> {
    return this.fetch(this.url(path, query), init);
  }

  /** A request to a full URL; a 4xx/5xx answer becomes a CnbiApiError with its message. */
  async fetch(url: string, init: RequestInit = {}): Promise<Response> {
    let response: Response;
    try {
      response = await ServerConnection.makeRequest(url, init, this.settings);
    } catch (error) {
      throw new CnbiApiError(0, `the server did not answer: ${error}`);
    }
    if (!response.ok) {
      let message = response.statusText || `HTTP ${response.status}`;
      let field: string | undefined;
      let relatedField: string | undefined;
      try {
        const body = await response.json();
        message = body.message ?? message;
        field = body.field ?? undefined;
        relatedField = body.relatedField ?? undefined;
      } catch {
        // not JSON: keep the status text
      }
      throw new CnbiApiError(response.status, message, field, relatedField);
    }
    return response;
  }

  async json<T>(
    path: string,
    init: RequestInit = {},
    query?: Record<string, string>
  ): Promise<T> {
    const response = await this.request(path, init, query);
    return (await response.json()) as T;
  }

  async text(path: string): Promise<string> {
    return (await this.request(path)).text();
  }

  listImages(): Promise<{ items: ICustomNBImage[] }> {
    return this.json('images');
  }

  getImage(name: string): Promise<ICustomNBImage> {
    return this.json(`images/${encodeURIComponent(name)}`);
  }

  /** Create an image, or with `dryRun` only validate it (422/400 name the field at fault). */
  createImage(image: ICustomNBImage, dryRun = false): Promise<ICustomNBImage> {
    return this.json(
      'images',
      {
        method: 'POST',
        body: JSON.stringify(image),
        headers: { 'Content-Type': 'application/json' }
      },
      dryRun ? { dryRun: 'true' } : undefined
    );
  }

  /** Change what may change of an image (sharing, display name, description). */
  patchImage(name: string, patch: IImagePatch): Promise<ICustomNBImage> {
    return this.json(`images/${encodeURIComponent(name)}`, {
      method: 'PATCH',
      body: JSON.stringify(patch),
      headers: { 'Content-Type': 'application/json' }
    });
  }

  /** Stop an unfinished build: the image turns Failed ("cancelled by …"); 409 once finished. */
  cancelImage(name: string): Promise<ICustomNBImage> {
    return this.json(`images/${encodeURIComponent(name)}/cancel`, {
      method: 'POST',
      body: '{}',
      headers: { 'Content-Type': 'application/json' }
    });
  }

  rebuildImage(name: string): Promise<ICustomNBImage> {
    return this.json(`images/${encodeURIComponent(name)}/rebuild`, {
      method: 'POST',
      body: '{}',
      headers: { 'Content-Type': 'application/json' }
    });
  }

  /** The image's current build and the earlier ones kept, newest first, with what changed. */
  generations(name: string): Promise<{ items: IGeneration[] }> {
    return this.json(`images/${encodeURIComponent(name)}/generations`);
  }

  /** Make run `run`'s kept build current again, without a build; with `rebuild`, build it
   * again from its commit, base and lock (its image was removed by retention). */
  rollback(name: string, run: number, rebuild = false): Promise<ICustomNBImage> {
    return this.json(`images/${encodeURIComponent(name)}/rollback`, {
      method: 'POST',
      body: JSON.stringify(rebuild ? { run, rebuild } : { run }),
      headers: { 'Content-Type': 'application/json' }
    });
  }

  async deleteImage(name: string): Promise<void> {
    await this.request(`images/${encodeURIComponent(name)}`, {
      method: 'DELETE'
    });
  }

  getLock(name: string): Promise<string> {
    return this.text(`images/${encodeURIComponent(name)}/lock`);
  }

  getLogs(name: string): Promise<string> {
    return this.text(`images/${encodeURIComponent(name)}/logs`);
  }

  /** The user's own git credentials (names and hosts; the service never returns a token). */
  listCredentials(): Promise<{ items: IGitCredential[] }> {
    return this.json('credentials');
  }

  /** Store (or replace) a token for one git host under `name`; 422 names the field at fault. */
  putCredential(
    name: string,
    credential: { host: string; token: string; username?: string }
  ): Promise<IGitCredential> {
    return this.json(`credentials/${encodeURIComponent(name)}`, {
      method: 'PUT',
      body: JSON.stringify(credential),
      headers: { 'Content-Type': 'application/json' }
    });
  }

  async deleteCredential(name: string): Promise<void> {
    await this.request(`credentials/${encodeURIComponent(name)}`, { method: 'DELETE' });
  }

  baseImages(): Promise<{ items: IBaseImage[] }> {
    return this.json('base-images');
  }

  /** How the hub is set up, as far as the panel needs to know. */
  serviceSettings(): Promise<IServiceSettings> {
    return this.json('settings');
  }

  checkImage(image: string): Promise<ICheckImageResult> {
    return this.json('check-image', {}, { image });
  }

  /** What this server runs on (local route of the server extension). */
  async serverInfo(): Promise<IServerInfo> {
    return (await this.fetch(this.localUrl('server-info'))).json();
  }

  /**
   * Stop this server (the hub does, asked by the server extension) so that it starts again on
   * its image's current build from `nextUrl` (the cnbi service's page that waits for the stop);
   * 409 when the server is not on an Image Builder image.
   */
  async restartServer(): Promise<{ nextUrl: string }> {
    return (await this.fetch(this.localUrl('restart'), { method: 'POST', body: '{}' })).json();
  }

  /** What the user installed into this running server; 409 when its image is not known. */
  async environment(): Promise<IEnvironment> {
    return (await this.fetch(this.localUrl('environment'))).json();
  }
}
