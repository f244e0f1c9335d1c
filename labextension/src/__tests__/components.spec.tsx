// The panel's React views against a real HTTP server (TestCnbiService) through the real
// ServerConnection and a real EventSource implementation (the `eventsource` package).
import { ServerConnection } from '@jupyterlab/services';
import { act, fireEvent, render, screen, waitFor, within } from '@testing-library/react';
import EventSource from 'eventsource';
import * as React from 'react';

import { CnbiApi } from '../api';
import { CreateForm, withoutField } from '../components/CreateForm';
import { ImageBuilder } from '../components/ImageBuilder';
import { IPanelActions, spawnUrl } from '../components/ImageDetail';
import type { ICustomNBImage } from '../model';
import { TestCnbiService } from './service';

const esFactory = (url: string) => new EventSource(url) as any;

function image(name: string, phase: string, extra: Partial<ICustomNBImage['status']> = {}, creator = 'alice'): ICustomNBImage {
  return {
    metadata: {
      name,
      resourceVersion: '1',
      annotations: {
        'opendatahub.io/notebook-image-name': `Display ${name}`,
        'opendatahub.io/notebook-image-creator': creator
      }
    },
    spec: { buildType: 'PackageList', baseImage: 'localhost:5000/notebook:1', packageVersions: ['pandas'] },
    status: { phase: phase as any, ...extra }
  };
}

describe('ImageBuilder panel', () => {
  let service: TestCnbiService;
  let api: CnbiApi;
  let actions: IPanelActions & { opened: string[]; copied: string[]; confirms: string[] };

  beforeEach(async () => {
    service = new TestCnbiService();
    await service.start();
    api = new CnbiApi(ServerConnection.makeSettings({ baseUrl: service.baseUrl }));
    const opened: string[] = [];
    const copied: string[] = [];
    const confirms: string[] = [];
    actions = {
      opened,
      copied,
      confirms,
      confirmDelete: async name => {
        confirms.push(name);
        return true;
      },
      copyToClipboard: text => copied.push(text),
      openUrl: url => opened.push(url)
    };
  });

  afterEach(async () => {
    await service.stop();
  });

  const renderPanel = () =>
    render(
      <ImageBuilder api={api} hubPrefix="/hub/" currentUser="alice" actions={actions} eventSourceFactory={esFactory} />
    );

  it('lists my images and shared ones, with phase, progress and failure text', async () => {
    service.images = [
      image('a-ready', 'Ready', { startTime: '2026-01-01T00:00:00Z', completionTime: '2026-01-01T00:01:30Z' }),
      image('b-failed', 'Failed', {
        conditions: [{ type: 'ErrorBuildingImage', status: 'True', message: 'pip could not install numpy' }]
      }),
      image('c-shared', 'Ready', {}, 'bob')
    ];
    const view = renderPanel();
    const rows = await screen.findAllByTestId('cnbi-image-row');
    expect(rows.map(r => r.dataset.name)).toEqual(['a-ready', 'b-failed', 'c-shared']);
    expect(within(rows[0]).getByTestId('cnbi-phase-badge').textContent).toBe('Ready');
    expect(within(rows[0]).getByTestId('cnbi-duration').textContent).toContain('1m 30s');
    expect(within(rows[1]).getByTestId('cnbi-failure').textContent).toBe('pip could not install numpy');
    expect(within(rows[2]).getByRole('button').textContent).toContain('by bob');
    expect(view.container.querySelectorAll('h3')[1].textContent).toBe('Shared with everyone');
    // finished images need no stream
    expect(service.streamOpens).toBe(0);
    view.unmount();
  });

  it('moves a row live from its event stream, without polling', async () => {
    service.images = [image('live', 'Prepare')];
    const view = renderPanel();
    const row = await screen.findByTestId('cnbi-image-row');
    expect(row.dataset.phase).toBe('Prepare');
    await act(() => service.waitFor(() => service.watchers('live') === 1));
    const listRequests = service.requests.filter(r => r.url.endsWith('/cnbi/api/images')).length;
    const next = { ...image('live', 'Building'), metadata: { ...image('live', 'x').metadata, resourceVersion: '2' } };
    act(() => service.push('live', 'object', next));
    await waitFor(() => expect(screen.getByTestId('cnbi-image-row').dataset.phase).toBe('Building'));
    expect(screen.getByRole('progressbar').getAttribute('aria-valuenow')).toBe('63');
    expect(service.requests.filter(r => r.url.endsWith('/cnbi/api/images')).length).toBe(listRequests);
    view.unmount();
    await service.waitFor(() => service.watchers('live') === 0);
  });

  it('shows a dry-run package error next to the line at fault', async () => {
    const view = render(
      <ImageBuilder api={api} hubPrefix="/hub/" currentUser="alice" actions={actions} eventSourceFactory={esFactory} />
    );
    const select = (await screen.findByLabelText('Base image')) as HTMLSelectElement;
    await waitFor(() => expect(select.options.length).toBe(2));
    fireEvent.change(screen.getByLabelText(/one per line/), {
      target: { value: 'pandas>=2\n\n# comment\nnumpy\nnot a package!\n' }
    });
    const error = await screen.findByTestId('cnbi-package-error', {}, { timeout: 3000 });
    expect(error.dataset.line).toBe('5');
    expect(error.textContent).toContain('not a valid requirement: not a package!');
    const dryRuns = service.requests.filter(r => r.url.includes('dryRun=true'));
    expect(JSON.parse(dryRuns[dryRuns.length - 1].body).spec.packageVersions).toEqual([
      'pandas>=2',
      'numpy',
      'not a package!'
    ]);
    fireEvent.change(screen.getByLabelText(/one per line/), { target: { value: 'pandas>=2\nnumpy\n' } });
    await waitFor(() => expect(screen.queryByTestId('cnbi-package-error')).toBeNull(), { timeout: 3000 });
    view.unmount();
  });

  it('clears the line error of a refused submit once the packages are edited', async () => {
    // No dry run while typing here, so only the submit's answer can mark the line.
    const view = render(<CreateForm api={api} onCreated={() => undefined} dryRunDelayMs={600000} />);
    const select = (await screen.findByLabelText('Base image')) as HTMLSelectElement;
    await waitFor(() => expect(select.value).toBe('localhost:5000/notebook:1'));
    fireEvent.change(screen.getByLabelText('Name'), { target: { value: 'x' } });
    fireEvent.change(screen.getByLabelText(/one per line/), { target: { value: 'six\nnot a package!' } });
    fireEvent.click(screen.getByTestId('cnbi-submit'));
    const error = await screen.findByTestId('cnbi-package-error');
    expect(error.dataset.line).toBe('2');
    fireEvent.change(screen.getByLabelText(/one per line/), { target: { value: 'six\nnumpy' } });
    expect(screen.queryByTestId('cnbi-package-error')).toBeNull();
    view.unmount();
  });

  it('drops the field name the message starts with', () => {
    expect(withoutField("spec.packageVersions[1]: 'x;' is not valid", 'spec.packageVersions[1]')).toBe("'x;' is not valid");
    expect(withoutField('not valid', 'spec.packageVersions[1]')).toBe('not valid');
  });

  it('creates an image that shows at once in the list, selected', async () => {
    const view = renderPanel();
    await screen.findByText('No images yet: create one.');
    const select = screen.getByLabelText('Base image') as HTMLSelectElement;
    await waitFor(() => expect(select.value).toBe('localhost:5000/notebook:1'));
    fireEvent.change(screen.getByLabelText('Name'), { target: { value: 'My image' } });
    fireEvent.change(screen.getByLabelText(/one per line/), { target: { value: 'pandas\n' } });
    fireEvent.click(screen.getByTestId('cnbi-submit'));
    const row = await screen.findByTestId('cnbi-image-row');
    expect(row.dataset.name).toBe('image-1');
    expect(row.dataset.phase).toBe('Pending');
    const created = service.requests.find(r => r.method === 'POST' && !r.url.includes('dryRun'))!;
    expect(JSON.parse(created.body).spec).toEqual({
      buildType: 'PackageList',
      baseImage: 'localhost:5000/notebook:1',
      packageVersions: ['pandas']
    });
    expect((await screen.findByTestId('cnbi-detail')).dataset.name).toBe('image-1');
    view.unmount();
  });

  it('checks whether an image to import exists', async () => {
    const view = renderPanel();
    fireEvent.click(await screen.findByTestId('cnbi-tab-ImageImport'));
    fireEvent.change(screen.getByLabelText('Image reference'), { target: { value: 'localhost:5000/exists:1' } });
    fireEvent.click(screen.getByTestId('cnbi-check-image'));
    expect((await screen.findByTestId('cnbi-check-result')).textContent).toBe('Found: sha256:abc (linux/amd64)');
    fireEvent.change(screen.getByLabelText('Image reference'), { target: { value: 'localhost:5000/nope:1' } });
    fireEvent.click(screen.getByTestId('cnbi-check-image'));
    expect((await screen.findByTestId('cnbi-check-result')).textContent).toBe('Not found');
    view.unmount();
  });

  it('detail: live log, manifest, lock, copy, spawn and delete', async () => {
    service.images = [
      image('built', 'Ready', {
        image: 'localhost:5000/cnbi/alice/built@sha256:def',
        packages: [{ name: 'pandas', version: '2.2.3', visible: true }],
        lockHash: 'sha256:1'
      })
    ];
    service.logs.built = 'STEP 1/3\nSTEP 2/3\n';
    service.locks.built = 'pandas==2.2.3 --hash=sha256:aa\n';
    const view = renderPanel();
    fireEvent.click(within(await screen.findByTestId('cnbi-image-row')).getByRole('button'));
    const log = await screen.findByTestId('cnbi-log');
    await waitFor(() => expect(log.textContent).toBe('STEP 1/3\nSTEP 2/3\n'));
    act(() => {
      for (let i = 0; i < 2000; i++) {
        service.push('built', 'log', { line: `line ${i}` });
      }
    });
    await waitFor(() => expect(log.textContent!.endsWith('line 1999\n')).toBe(true));
    expect(log.textContent!.split('\n').length).toBe(2 + 2000 + 1);
    expect(screen.getByTestId('cnbi-packages-table').textContent).toContain('2.2.3');
    expect((await screen.findByTestId('cnbi-lock')).textContent).toContain('--hash=sha256:aa');
    fireEvent.click(screen.getByTestId('cnbi-copy-ref'));
    expect(actions.copied).toEqual(['localhost:5000/cnbi/alice/built@sha256:def']);
    fireEvent.click(screen.getByTestId('cnbi-spawn'));
    // the service says the hub allows named servers: a new server named after the image
    expect(actions.opened).toEqual(['/hub/spawn/alice/built?cnbi_image=built']);
    fireEvent.click(screen.getByTestId('cnbi-delete'));
    await waitFor(() => expect(screen.queryByTestId('cnbi-image-row')).toBeNull());
    expect(actions.confirms).toEqual(['Display built']);
    expect(service.images).toEqual([]);
    view.unmount();
  });

  it('builds the hub spawn URL', () => {
    expect(spawnUrl('/hub', 'a b')).toBe('/hub/spawn?cnbi_image=a%20b');
    expect(spawnUrl('/hub/', 'img-1', 'alice', true)).toBe('/hub/spawn/alice/img-1?cnbi_image=img-1');
    expect(spawnUrl('/hub/', 'img-1', 'alice', false)).toBe('/hub/spawn?cnbi_image=img-1');
  });
});
