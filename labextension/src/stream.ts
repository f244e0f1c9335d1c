/**
 * A client for one image's event stream (`GET cnbi/api/images/{name}/events`, Server-Sent
 * Events): typed callbacks for `object`, `log` and `deleted`, and reconnection with backoff when
 * the browser's EventSource gives up (it retries by itself only after network errors, never
 * after an HTTP error such as a 502 while the hub restarts).
 */

import type { ICustomNBImage } from './model';

/** The part of the DOM EventSource this client uses (so Node's `eventsource` fits too). */
export interface IEventSourceLike {
  readonly readyState: number;
  onopen: ((ev: any) => any) | null;
  onerror: ((ev: any) => any) | null;
  addEventListener(type: string, listener: (ev: any) => void): void;
  close(): void;
}

export type EventSourceFactory = (url: string) => IEventSourceLike;

export type StreamState = 'connecting' | 'open' | 'reconnecting' | 'closed';

export interface IImageEventHandlers {
  /** The whole object: first on every (re)connect, then on every change. */
  object?: (image: ICustomNBImage) => void;
  /** One build log line. */
  log?: (line: string) => void;
  /** The image is gone; the stream is closed for good. */
  deleted?: () => void;
  /** Connection state changes; `reconnected` is true on every open after the first. */
  state?: (state: StreamState, reconnected: boolean) => void;
}

export interface IImageEventStreamOptions {
  url: string;
  handlers: IImageEventHandlers;
  /** Defaults to the browser's EventSource. */
  eventSourceFactory?: EventSourceFactory;
  /** First retry delay after the EventSource closed, doubled on every failure. */
  initialRetryMs?: number;
  maxRetryMs?: number;
}

const OPEN = 1;
const CLOSED = 2;

function defaultFactory(url: string): IEventSourceLike {
  // Same origin: the cookie authenticates, with the _xsrf value CnbiApi.eventsUrl puts in the URL.
  return new EventSource(url, { withCredentials: false });
}

export class ImageEventStream {
  constructor(options: IImageEventStreamOptions) {
    this._url = options.url;
    this._handlers = options.handlers;
    this._factory = options.eventSourceFactory ?? defaultFactory;
    this._initialRetryMs = options.initialRetryMs ?? 1000;
    this._maxRetryMs = options.maxRetryMs ?? 30000;
    this._retryMs = this._initialRetryMs;
    this._connect();
  }

  get state(): StreamState {
    return this._state;
  }

  /** How many times the stream has been re-opened after the browser gave up. */
  get reconnects(): number {
    return this._reconnects;
  }

  /** Stop for good; no callback fires after this. */
  close(): void {
    if (this._state === 'closed') {
      return;
    }
    this._setState('closed');
    if (this._timer !== null) {
      clearTimeout(this._timer);
      this._timer = null;
    }
    this._source?.close();
    this._source = null;
  }

  private _connect(): void {
    const source = this._factory(this._url);
    this._source = source;
    source.onopen = () => {
      if (this._source !== source) {
        return;
      }
      this._retryMs = this._initialRetryMs;
      this._setState('open');
    };
    source.onerror = () => {
      // Browsers set readyState before firing `error`; some implementations (Node's
      // `eventsource`) only right after, so look once the current task is done.
      setTimeout(() => {
        if (this._source !== source || this._state === 'closed') {
          return;
        }
        if (source.readyState === CLOSED) {
          // EventSource will not retry (HTTP error status, wrong type): we do, with backoff.
          source.close();
          this._source = null;
          this._scheduleReconnect();
        } else if (source.readyState !== OPEN) {
          // EventSource is retrying by itself (network error, stream ended).
          this._setState('reconnecting');
        }
      }, 0);
    };
    source.addEventListener('object', (ev: MessageEvent) => {
      if (this._source !== source || this._state === 'closed') {
        return;
      }
      let image: ICustomNBImage;
      try {
        image = JSON.parse(ev.data);
      } catch {
        return; // a torn event is not worth breaking the stream for
      }
      this._handlers.object?.(image);
    });
    source.addEventListener('log', (ev: MessageEvent) => {
      if (this._source !== source || this._state === 'closed') {
        return;
      }
      try {
        this._handlers.log?.(JSON.parse(ev.data).line ?? '');
      } catch {
        this._handlers.log?.(String(ev.data));
      }
    });
    source.addEventListener('deleted', () => {
      if (this._source !== source || this._state === 'closed') {
        return;
      }
      this.close();
      this._handlers.deleted?.();
    });
  }

  private _scheduleReconnect(): void {
    this._setState('reconnecting');
    const delay = this._retryMs;
    this._retryMs = Math.min(this._retryMs * 2, this._maxRetryMs);
    this._timer = setTimeout(() => {
      this._timer = null;
      if (this._state === 'closed') {
        return;
      }
      this._reconnects++;
      this._connect();
    }, delay);
  }

  private _setState(state: StreamState): void {
    if (state === this._state) {
      return;
    }
    this._state = state;
    if (state === 'open') {
      this._handlers.state?.(state, this._opened);
      this._opened = true;
    } else {
      this._handlers.state?.(state, this._opened);
    }
  }

  private _url: string;
  private _handlers: IImageEventHandlers;
  private _factory: EventSourceFactory;
  private _initialRetryMs: number;
  private _maxRetryMs: number;
  private _retryMs: number;
  private _source: IEventSourceLike | null = null;
  private _timer: ReturnType<typeof setTimeout> | null = null;
  private _state: StreamState = 'connecting';
  private _opened = false;
  private _reconnects = 0;
}
