// A real SSE server and a real EventSource implementation (the `eventsource` package, which
// follows the same WHATWG rules as the browser's: no retry after an HTTP error status).
import EventSource from 'eventsource';

import type { ICustomNBImage } from '../model';
import { ImageEventStream, StreamState } from '../stream';
import { TestCnbiService } from './service';

const image = (phase: string, rv: string): ICustomNBImage =>
  ({
    metadata: { name: 'img', resourceVersion: rv },
    spec: { buildType: 'PackageList' },
    status: { phase }
  }) as ICustomNBImage;

describe('ImageEventStream', () => {
  let service: TestCnbiService;
  let stream: ImageEventStream | null = null;

  beforeEach(async () => {
    service = new TestCnbiService();
    service.images = [image('Prepare', '1')];
    await service.start();
  });

  afterEach(async () => {
    stream?.close();
    stream = null;
    await service.stop();
  });

  const open = (handlers: ConstructorParameters<typeof ImageEventStream>[0]['handlers']) =>
    new ImageEventStream({
      url: `${service.baseUrl}cnbi/api/images/img/events`,
      eventSourceFactory: url => new EventSource(url) as any,
      initialRetryMs: 20,
      maxRetryMs: 100,
      handlers
    });

  it('delivers objects and log lines as they arrive', async () => {
    const phases: string[] = [];
    const lines: string[] = [];
    stream = open({ object: o => phases.push(o.status!.phase!), log: l => lines.push(l) });
    await service.waitFor(() => phases.length === 1 && service.watchers('img') === 1);
    expect(phases).toEqual(['Prepare']);
    expect(stream.state).toBe('open');
    service.push('img', 'log', { line: 'Resolving pandas' });
    service.push('img', 'object', image('Resolving', '2'));
    await service.waitFor(() => phases.length === 2);
    expect(lines).toEqual(['Resolving pandas']);
    expect(phases).toEqual(['Prepare', 'Resolving']);
  });

  it('closes for good on `deleted`', async () => {
    let deleted = 0;
    stream = open({ deleted: () => deleted++ });
    await service.waitFor(() => service.watchers('img') === 1);
    service.push('img', 'deleted', { name: 'img' });
    await service.waitFor(() => deleted === 1);
    expect(stream.state).toBe('closed');
    await service.waitFor(() => service.watchers('img') === 0);
    await new Promise(r => setTimeout(r, 150));
    expect(service.streamOpens).toBe(1);
  });

  it('reconnects with backoff after HTTP errors, which EventSource never retries', async () => {
    // 4xx: neither browsers nor the `eventsource` package retry these (the package, unlike
    // browsers, does retry 5xx itself, so a 5xx would not exercise our reconnect here).
    service.failNextStreams = [404, 403];
    const states: [StreamState, boolean][] = [];
    const phases: string[] = [];
    stream = open({ state: (s, again) => states.push([s, again]), object: o => phases.push(o.status!.phase!) });
    await service.waitFor(() => phases.length === 1, 5000);
    expect(service.streamOpens).toBe(3);
    expect(stream.reconnects).toBe(2);
    expect(states[states.length - 1]).toEqual(['open', false]);
    expect(states.map(s => s[0])).toContain('reconnecting');
  });

  it('resyncs after the server ends the stream: the object comes again on reopen', async () => {
    const states: [StreamState, boolean][] = [];
    const phases: string[] = [];
    stream = open({ state: (s, again) => states.push([s, again]), object: o => phases.push(o.status!.phase!) });
    await service.waitFor(() => phases.length === 1 && service.watchers('img') === 1);
    service.images = [image('Building', '3')];
    service.dropStreams('img');
    await service.waitFor(() => phases.length === 2, 8000);
    expect(phases).toEqual(['Prepare', 'Building']);
    expect(states.filter(s => s[0] === 'open')).toEqual([
      ['open', false],
      ['open', true]
    ]);
  }, 10000);

  it('fires nothing after close()', async () => {
    const phases: string[] = [];
    stream = open({ object: o => phases.push(o.status!.phase!) });
    await service.waitFor(() => service.watchers('img') === 1);
    stream.close();
    service.push('img', 'object', image('Ready', '9'));
    await new Promise(r => setTimeout(r, 100));
    expect(phases).toEqual(['Prepare']);
    await service.waitFor(() => service.watchers('img') === 0);
  });
});
