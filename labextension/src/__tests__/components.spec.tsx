// The panel's React views against a real HTTP server (TestCnbiService) through the real
// ServerConnection and a real EventSource implementation (the `eventsource` package).
import { ServerConnection } from '@jupyterlab/services';
import { act, fireEvent, render, screen, waitFor, within } from '@testing-library/react';
import EventSource from 'eventsource';
import * as React from 'react';

import { CnbiApi } from '../api';
import { CreateForm, withoutField } from '../components/CreateForm';
import { ImageBuilder, PanelRequest } from '../components/ImageBuilder';
import { COPIED_MS, IPanelActions, IPanelNotice, spawnUrl } from '../components/ImageDetail';
import { ownerShareHint } from '../components/SharePanel';
import type { ICustomNBImage, IUserInfo } from '../model';
import { TestCnbiService } from './service';

const esFactory = (url: string) => new EventSource(url) as any;

function image(
  name: string,
  phase: string,
  extra: Partial<ICustomNBImage['status']> = {},
  creator = 'alice',
  more: { annotations?: Record<string, string>; created?: string; spec?: ICustomNBImage['spec'] } = {}
): ICustomNBImage {
  return {
    metadata: {
      name,
      resourceVersion: '1',
      creationTimestamp: more.created,
      annotations: {
        'opendatahub.io/notebook-image-name': `Display ${name}`,
        'opendatahub.io/notebook-image-creator': creator,
        ...more.annotations
      }
    },
    spec: more.spec ?? { buildType: 'PackageList', baseImage: 'localhost:5000/notebook:1', packageVersions: ['pandas'] },
    status: { phase: phase as any, ...extra }
  };
}

const ADMIN: IUserInfo = { name: 'root', admin: true, groups: ['team-a'] };

describe('ImageBuilder panel', () => {
  let service: TestCnbiService;
  let api: CnbiApi;
  let actions: IPanelActions & { opened: string[]; copied: string[]; confirms: string[]; notices: IPanelNotice[] };

  beforeEach(async () => {
    service = new TestCnbiService();
    await service.start();
    api = new CnbiApi(ServerConnection.makeSettings({ baseUrl: service.baseUrl }));
    const opened: string[] = [];
    const copied: string[] = [];
    const confirms: string[] = [];
    const notices: IPanelNotice[] = [];
    actions = {
      opened,
      copied,
      confirms,
      notices,
      notify: notice => notices.push(notice),
      confirmDelete: async (name, builtOnIt) => {
        confirms.push(builtOnIt?.length ? `${name} (built on it: ${builtOnIt.join(', ')})` : name);
        return true;
      },
      copyToClipboard: text => copied.push(text),
      openUrl: url => opened.push(url),
      confirmRestart: async (name, run) => {
        confirms.push(`restart ${name} on run ${run}`);
        return true;
      },
      navigate: url => opened.push(`navigate ${url}`)
    };
  });

  afterEach(async () => {
    await service.stop();
  });

  const renderPanel = (extra: { request?: PanelRequest; isVisible?: () => boolean } = {}) =>
    render(
      <ImageBuilder
        api={api}
        hubPrefix="/hub/"
        currentUser="alice"
        actions={actions}
        eventSourceFactory={esFactory}
        {...extra}
      />
    );

  /** Opens the detail of the row `name`. */
  const openDetail = async (name: string) => {
    const rows = await screen.findAllByTestId('cnbi-image-row');
    const row = rows.find(r => r.dataset.name === name)!;
    fireEvent.click(within(row).getByRole('button'));
    return waitFor(() => {
      const detail = screen.getByTestId('cnbi-detail');
      expect(detail.dataset.name).toBe(name);
      return detail;
    });
  };

  const baseImagesLoaded = async () => {
    const select = (await screen.findByLabelText('Base image')) as HTMLSelectElement;
    await waitFor(() => expect(select.value).toBe('localhost:5000/notebook:1'));
  };

  it('lists my images and shared ones, with phase, progress and failure text', async () => {
    service.images = [
      image('a-ready', 'Ready', { startTime: '2026-01-01T00:00:00Z', completionTime: '2026-01-01T00:01:30Z' }),
      image('b-failed', 'Failed', {
        conditions: [{ type: 'ErrorBuildingImage', status: 'True', message: 'pip could not install numpy' }]
      }),
      image('c-shared', 'Ready', {}, 'bob', { annotations: { 'cnbi-hub.io/shared': 'true' } })
    ];
    const view = renderPanel();
    const rows = await screen.findAllByTestId('cnbi-image-row');
    expect(rows.map(r => r.dataset.name)).toEqual(['a-ready', 'b-failed', 'c-shared']);
    expect(within(rows[0]).getByTestId('cnbi-phase-badge').textContent).toBe('Ready');
    expect(within(rows[0]).getByTestId('cnbi-duration').textContent).toContain('built in 1 min 30 s');
    expect(within(rows[1]).getByTestId('cnbi-failure').textContent).toBe('pip could not install numpy');
    expect(within(rows[2]).getByRole('button').textContent).toContain('by bob');
    // the parts of the meta line that read badly when broken stay whole
    const unbroken = (row: HTMLElement) => [...row.querySelectorAll('.cnbi-nowrap')].map(e => e.textContent);
    expect(unbroken(rows[0])).toEqual(['built in 1 min 30 s']);
    expect(unbroken(rows[2])).toEqual(['by bob', 'shared with everyone']);
    expect(view.container.querySelectorAll('h3')[1].textContent).toBe('Shared with me');
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
    expect(error.textContent).toBe('Line 5: not a valid requirement: not a package!');
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

  it('offers the Ready images as bases and sends cnbi:<name> for one', async () => {
    const image = (name: string, phase: string) =>
      ({
        metadata: { name, annotations: { 'opendatahub.io/notebook-image-name': `${name} shown` } },
        spec: { buildType: 'PackageList' },
        status: { phase }
      }) as any;
    const view = render(
      <CreateForm
        api={api}
        onCreated={() => undefined}
        dryRunDelayMs={600000}
        stackable={[image('team-base', 'Ready'), image('still-building', 'Building')]}
      />
    );
    const select = (await screen.findByLabelText('Base image')) as HTMLSelectElement;
    await waitFor(() => expect(select.value).toBe('localhost:5000/notebook:1'));
    const group = screen.getByTestId('cnbi-stack-bases') as HTMLOptGroupElement;
    expect(Array.from(group.querySelectorAll('option')).map(o => [o.value, o.textContent])).toEqual([
      ['cnbi:team-base', 'team-base shown']
    ]);
    fireEvent.change(select, { target: { value: 'cnbi:team-base' } });
    fireEvent.change(screen.getByLabelText('Name'), { target: { value: 'on team base' } });
    fireEvent.change(screen.getByLabelText(/one per line/), { target: { value: 'toolz\n' } });
    fireEvent.click(screen.getByTestId('cnbi-submit'));
    await waitFor(() =>
      expect(service.requests.some(r => r.method === 'POST' && !r.url.includes('dryRun'))).toBe(true)
    );
    const created = service.requests.find(r => r.method === 'POST' && !r.url.includes('dryRun'))!;
    expect(JSON.parse(created.body).spec.baseImage).toBe('cnbi:team-base');
    view.unmount();
  });

  it('drops the field name the message starts with', () => {
    expect(withoutField("spec.packageVersions[1]: 'x;' is not valid", 'spec.packageVersions[1]')).toBe("'x;' is not valid");
    expect(withoutField('spec.repository: spec.repository: must be https', 'spec.repository')).toBe('must be https');
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
    await waitFor(() => expect(screen.getByTestId('cnbi-check-result').textContent).toBe('Found: sha256:abc (linux/amd64)'));
    expect(screen.getByTestId('cnbi-check-result').dataset.result).toBe('found');
    expect((screen.getByTestId('cnbi-submit') as HTMLButtonElement).disabled).toBe(false);
    fireEvent.change(screen.getByLabelText('Image reference'), { target: { value: 'localhost:5000/nope:1' } });
    // the answer was about the other reference
    expect(screen.queryByTestId('cnbi-check-result')).toBeNull();
    fireEvent.click(screen.getByTestId('cnbi-check-image'));
    await waitFor(() => expect(screen.getByTestId('cnbi-check-result').textContent).toBe('Not found'));
    expect(screen.getByTestId('cnbi-check-result').dataset.result).toBe('notFound');
    // nothing to import: Build is disabled while that answer stands for this reference
    expect((screen.getByTestId('cnbi-submit') as HTMLButtonElement).disabled).toBe(true);
    fireEvent.change(screen.getByLabelText('Image reference'), { target: { value: 'quay.io/private/x:1' } });
    expect((screen.getByTestId('cnbi-submit') as HTMLButtonElement).disabled).toBe(false);
    fireEvent.click(screen.getByTestId('cnbi-check-image'));
    await waitFor(() => expect(screen.getByTestId('cnbi-check-result').dataset.result).toBe('private'));
    expect(screen.getByTestId('cnbi-check-result').textContent).toBe(
      'Private: quay.io wants credentials to read this image. Importing it needs an image pull secret.'
    );
    expect((screen.getByTestId('cnbi-submit') as HTMLButtonElement).disabled).toBe(false);
    fireEvent.change(screen.getByLabelText('Image reference'), { target: { value: 'bad ref' } });
    fireEvent.click(screen.getByTestId('cnbi-check-image'));
    await waitFor(() => expect(screen.getByTestId('cnbi-check-result').dataset.result).toBe('error'));
    expect(screen.getByTestId('cnbi-check-result').textContent).toBe('not an image reference');
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
    expect(actions.opened).toEqual(['/hub/spawn/alice/built?opt-cnbi_image=built']);
    fireEvent.click(screen.getByTestId('cnbi-delete'));
    await waitFor(() => expect(screen.queryByTestId('cnbi-image-row')).toBeNull());
    expect(actions.confirms).toEqual(['Display built']);
    expect(service.images).toEqual([]);
    view.unmount();
  });

  it('names the images built on one when deleting it', async () => {
    const onTop = image('on-top', 'Ready', { image: 'localhost:5000/cnbi/alice/on-top@sha256:abc' });
    onTop.spec.baseImage = 'cnbi:below';
    service.images = [image('below', 'Ready', { image: 'localhost:5000/cnbi/alice/below@sha256:def' }), onTop];
    const view = renderPanel();
    const rows = await screen.findAllByTestId('cnbi-image-row');
    const below = rows.find(r => r.dataset.name === 'below')!;
    fireEvent.click(within(below).getByRole('button'));
    await waitFor(() => expect(screen.getByTestId('cnbi-detail').dataset.name).toBe('below'));
    fireEvent.click(screen.getByTestId('cnbi-delete'));
    await waitFor(() => expect(actions.confirms).toEqual(['Display below (built on it: Display on-top)']));
    view.unmount();
  });

  it('builds the hub spawn URL with the opt- prefix', () => {
    expect(spawnUrl('/hub', 'a b')).toBe('/hub/spawn?opt-cnbi_image=a%20b');
    expect(spawnUrl('/hub/', 'img-1', 'alice', true)).toBe('/hub/spawn/alice/img-1?opt-cnbi_image=img-1');
    expect(spawnUrl('/hub/', 'img-1', 'alice', false)).toBe('/hub/spawn?opt-cnbi_image=img-1');
    expect(spawnUrl('/hub/', 'img-1', 'alice', true, 2)).toBe(
      '/hub/spawn/alice/img-1-run-2?opt-cnbi_image=img-1&opt-cnbi_build=2'
    );
  });
  describe('form messages', () => {
    it('shows a field’s message at that field, without its path, until the input changes', async () => {
      const view = renderPanel();
      fireEvent.click(await screen.findByTestId('cnbi-tab-GitRepository'));
      await baseImagesLoaded();
      fireEvent.change(screen.getByLabelText('Name'), { target: { value: 'repo' } });
      fireEvent.change(screen.getByLabelText('Repository URL'), { target: { value: 'http://example.org/r' } });
      service.nextCreateError = {
        status: 422,
        body: { message: 'spec.repository: the repository URL must use https', field: 'spec.repository' }
      };
      fireEvent.click(screen.getByTestId('cnbi-submit'));
      const error = await screen.findByTestId('cnbi-field-error');
      expect(error.dataset.field).toBe('repository');
      expect(error.textContent).toBe('the repository URL must use https');
      expect(screen.getByLabelText('Repository URL').getAttribute('aria-invalid')).toBe('true');
      expect(screen.queryByTestId('cnbi-submit-error')).toBeNull();
      // another input changes: the message stays with its own
      fireEvent.change(screen.getByLabelText('Name'), { target: { value: 'repo 2' } });
      expect(screen.getByTestId('cnbi-field-error').textContent).toBe('the repository URL must use https');
      fireEvent.change(screen.getByLabelText('Repository URL'), { target: { value: 'https://example.org/r' } });
      expect(screen.queryByTestId('cnbi-field-error')).toBeNull();
      view.unmount();
    });

    it('clears messages on another tab and never carries them into the next form', async () => {
      service.images = [image('one', 'Ready', {}, 'alice', { created: '2026-01-01T00:00:00Z' })];
      const view = renderPanel();
      await screen.findByTestId('cnbi-image-row');
      fireEvent.click(screen.getByTestId('cnbi-new-image'));
      await baseImagesLoaded();
      fireEvent.change(screen.getByLabelText('Name'), { target: { value: 'x' } });
      fireEvent.change(screen.getByLabelText(/one per line/), { target: { value: 'six' } });
      service.nextCreateError = { status: 422, body: { message: 'this base image is retired', field: 'spec.baseImage' } };
      fireEvent.click(screen.getByTestId('cnbi-submit'));
      expect((await screen.findByTestId('cnbi-field-error')).textContent).toBe('this base image is retired');
      fireEvent.click(screen.getByTestId('cnbi-tab-GitRepository'));
      expect(screen.queryByTestId('cnbi-field-error')).toBeNull();
      fireEvent.click(screen.getByTestId('cnbi-tab-PackageList'));
      expect(screen.queryByTestId('cnbi-field-error')).toBeNull();

      // a message about the whole request shows at the end, also without a path
      service.nextCreateError = { status: 403, body: { message: 'spec.buildType: you may not build', field: 'spec.buildType' } };
      fireEvent.click(screen.getByTestId('cnbi-submit'));
      expect((await screen.findByTestId('cnbi-submit-error')).textContent).toBe('you may not build');
      await openDetail('one');
      fireEvent.click(screen.getByTestId('cnbi-new-image'));
      const name = (await screen.findByLabelText('Name')) as HTMLInputElement;
      expect(name.value).toBe('');
      expect(screen.queryByTestId('cnbi-submit-error')).toBeNull();
      expect(screen.queryByTestId('cnbi-field-error')).toBeNull();
      // "New image" while the form is open: a fresh form as well
      fireEvent.change(name, { target: { value: 'y' } });
      service.nextCreateError = { status: 403, body: { message: 'no', field: 'spec.buildType' } };
      fireEvent.click(screen.getByTestId('cnbi-submit'));
      await screen.findByTestId('cnbi-submit-error');
      fireEvent.click(screen.getByTestId('cnbi-new-image'));
      await waitFor(() => expect(screen.queryByTestId('cnbi-submit-error')).toBeNull());
      expect((screen.getByLabelText('Name') as HTMLInputElement).value).toBe('');
      view.unmount();
    });

    it('says which lines a duplicate involves, mapped through blank and comment lines', async () => {
      const view = render(<CreateForm api={api} onCreated={() => undefined} dryRunDelayMs={600000} />);
      await baseImagesLoaded();
      fireEvent.change(screen.getByLabelText('Name'), { target: { value: 'x' } });
      // checked at once, in the service's words
      fireEvent.change(screen.getByLabelText(/one per line/), { target: { value: 'pandas\n\n# again\npandas>=2' } });
      expect(screen.getByTestId('cnbi-package-error').textContent).toBe('Line 4: pandas is already listed on line 1');
      expect(screen.getByTestId('cnbi-package-error').dataset.relatedLine).toBe('1');
      fireEvent.change(screen.getByLabelText(/one per line/), { target: { value: 'six\n\npandas==' } });
      expect(screen.getByTestId('cnbi-package-error').textContent).toBe('Line 3: a version is missing after ==');
      // the service's answer on submit: field and relatedField are entries, not lines
      fireEvent.change(screen.getByLabelText(/one per line/), { target: { value: 'numpy\n# plots\nmatplotlib\n\nscipy' } });
      expect(screen.queryByTestId('cnbi-package-error')).toBeNull();
      service.nextCreateError = {
        status: 422,
        body: {
          message: 'scipy is already listed',
          field: 'spec.packageVersions[2]',
          relatedField: 'spec.packageVersions[0]'
        }
      };
      fireEvent.click(screen.getByTestId('cnbi-submit'));
      const error = await screen.findByTestId('cnbi-package-error');
      expect(error.textContent).toBe('Line 5: scipy is already listed on line 1');
      expect(error.dataset.line).toBe('5');
      view.unmount();
    });

    it('stores a token for the repository’s host in place, never keeps it, and names it in the image', async () => {
      const view = renderPanel();
      fireEvent.click(await screen.findByTestId('cnbi-tab-GitRepository'));
      await baseImagesLoaded();
      fireEvent.change(screen.getByLabelText('Name'), { target: { value: 'private' } });
      fireEvent.change(screen.getByLabelText('Repository URL'), {
        target: { value: 'https://git.example.org:8443/team/private.git' }
      });
      const select = screen.getByTestId('cnbi-git-credential-select') as HTMLSelectElement;
      expect(select.value).toBe('');
      const add = within(select).getByText('Add a token for git.example.org:8443…') as HTMLOptionElement;
      fireEvent.change(select, { target: { value: add.value } });
      const box = await screen.findByTestId('cnbi-add-token');
      expect((within(box).getByTestId('cnbi-token-host') as HTMLInputElement).value).toBe('git.example.org:8443');
      expect((within(box).getByTestId('cnbi-token-name') as HTMLInputElement).value).toBe('git-example-org-8443');
      expect(within(box).getByTestId('cnbi-token').getAttribute('type')).toBe('password');
      expect((within(box).getByTestId('cnbi-token-save') as HTMLButtonElement).disabled).toBe(true);

      // a URL where a host belongs: the service's message at the host input
      fireEvent.change(within(box).getByTestId('cnbi-token-host'), { target: { value: 'https://git.example.org' } });
      fireEvent.change(within(box).getByTestId('cnbi-token'), { target: { value: 'glpat-secret' } });
      fireEvent.click(within(box).getByTestId('cnbi-token-save'));
      expect((await within(box).findByRole('alert')).dataset.field).toBe('host');
      fireEvent.change(within(box).getByTestId('cnbi-token-host'), { target: { value: 'git.example.org:8443' } });
      fireEvent.click(within(box).getByTestId('cnbi-token-save'));
      await waitFor(() => expect(screen.queryByTestId('cnbi-add-token')).toBeNull());
      const put = service.requests.filter(r => r.method === 'PUT').pop()!;
      expect(put.url.split('?')[0]).toMatch(/\/api\/credentials\/git-example-org-8443$/);
      expect(JSON.parse(put.body)).toEqual({ host: 'git.example.org:8443', token: 'glpat-secret' });
      await waitFor(() => expect(select.value).toBe('git-example-org-8443'));
      expect(within(select).getByText('Token git-example-org-8443 for git.example.org:8443')).toBeTruthy();
      // the token is nowhere on the page once stored
      expect(document.body.innerHTML).not.toContain('glpat-secret');

      // another host in the URL: said at once
      fireEvent.change(screen.getByLabelText('Repository URL'), { target: { value: 'https://github.com/team/x' } });
      expect(screen.getByTestId('cnbi-credential-host').textContent).toBe(
        'This token is for git.example.org:8443; the repository is on github.com.'
      );
      fireEvent.change(screen.getByLabelText('Repository URL'), {
        target: { value: 'https://git.example.org:8443/team/private.git' }
      });
      expect(screen.queryByTestId('cnbi-credential-host')).toBeNull();
      fireEvent.click(screen.getByTestId('cnbi-submit'));
      await waitFor(() => expect(service.images).toHaveLength(1));
      expect(service.images[0].spec.gitCredential).toBe('git-example-org-8443');
      view.unmount();
    });

    it('forgets a stored token and shows a refusal of the credential at its select', async () => {
      service.credentials = [{ name: 'gh', host: 'github.com', username: 'oauth2' }];
      const view = renderPanel();
      fireEvent.click(await screen.findByTestId('cnbi-tab-GitRepository'));
      await baseImagesLoaded();
      fireEvent.change(screen.getByLabelText('Name'), { target: { value: 'x' } });
      fireEvent.change(screen.getByLabelText('Repository URL'), { target: { value: 'https://github.com/o/r' } });
      const select = screen.getByTestId('cnbi-git-credential-select') as HTMLSelectElement;
      await within(select).findByText('Token gh for github.com');
      fireEvent.change(select, { target: { value: 'gh' } });
      service.nextCreateError = {
        status: 422,
        body: { message: 'you have no git credential named gh; add it first', field: 'spec.gitCredential' }
      };
      fireEvent.click(screen.getByTestId('cnbi-submit'));
      const error = await screen.findByTestId('cnbi-field-error');
      expect(error.dataset.field).toBe('gitCredential');
      expect(select.getAttribute('aria-invalid')).toBe('true');
      fireEvent.click(screen.getByTestId('cnbi-git-credential-forget'));
      await waitFor(() => expect(service.credentials).toEqual([]));
      await waitFor(() => expect(select.value).toBe(''));
      expect(service.requests.some(r => r.method === 'DELETE' && r.url.split('?')[0].endsWith('/api/credentials/gh'))).toBe(true);
      view.unmount();
    });

    it('explains what a git repository may hold', async () => {
      const view = renderPanel();
      fireEvent.click(await screen.findByTestId('cnbi-tab-GitRepository'));
      const help = screen.getByTestId('cnbi-git-help').textContent!;
      for (const part of ['Containerfile', 'Dockerfile', 'wins over everything', 'requirements.txt', 'environment.yml', 'pip', 'apt.txt', 'postBuild']) {
        expect(help).toContain(part);
      }
      fireEvent.click(screen.getByTestId('cnbi-tab-PackageList'));
      expect(screen.queryByTestId('cnbi-git-help')).toBeNull();
      view.unmount();
    });
  });

  it('lists the builds an image can go back to, with what changed, and makes one current', async () => {
    const none = { added: [], removed: [], changed: [], counts: { added: 0, removed: 0, changed: 0 } };
    service.images = [image('gen', 'Ready', { run: 2, image: 'reg/gen@sha256:2' })];
    service.generations.gen = [
      {
        run: 2,
        image: 'reg/gen@sha256:2',
        current: true,
        completionTime: '2026-11-23T10:00:00Z',
        comparedWith: 1,
        changes: {
          added: ['numpy 2.0.0'],
          removed: [],
          changed: ['tabulate 0.9.0 → 0.8.10'],
          counts: { added: 1, removed: 0, changed: 1 }
        }
      },
      { run: 1, image: 'reg/gen@sha256:1', current: false, completionTime: '2026-11-22T10:00:00Z', changes: none }
    ];
    const view = renderPanel();
    const detail = await openDetail('gen');
    const list = await within(detail).findByTestId('cnbi-generations');
    const items = within(list).getAllByRole('listitem');
    expect(items.map(i => i.dataset.run)).toEqual(['2', '1']);
    expect(items[0].textContent).toContain('current');
    expect(within(items[0]).getByTestId('cnbi-generation-changes').textContent).toBe(
      ' · tabulate 0.9.0 → 0.8.10 · added numpy 2.0.0 since run 1'
    );
    expect(within(items[0]).queryByTestId('cnbi-make-current')).toBeNull();
    expect(within(items[0]).queryByTestId('cnbi-start-build')).toBeNull();
    // a server pinned to the kept build
    fireEvent.click(within(items[1]).getByTestId('cnbi-start-build'));
    expect(actions.opened).toContain('/hub/spawn/alice/gen-run-1?opt-cnbi_image=gen&opt-cnbi_build=1');
    fireEvent.click(within(items[1]).getByTestId('cnbi-make-current'));
    await waitFor(() => expect(service.images[0].status?.image).toBe('reg/gen@sha256:1'));
    const rollback = service.requests.find(r => r.method === 'POST' && r.url.split('?')[0].endsWith('/rollback'))!;
    expect(JSON.parse(rollback.body)).toEqual({ run: 1 });
    // the list is asked again for the new run: run 3 is current, run 2 kept
    await waitFor(() =>
      expect(within(screen.getByTestId('cnbi-generations')).getAllByRole('listitem').map(i => i.dataset.run)).toEqual([
        '3',
        '2'
      ])
    );
    expect(screen.getByTestId('cnbi-triggers').textContent).toContain('Run 1’s build made current again by alice');
    view.unmount();
  });

  it('lists a kept build whose image retention removed, with why, and offers neither start nor rollback', async () => {
    const none = { added: [], removed: [], changed: [], counts: { added: 0, removed: 0, changed: 0 } };
    service.images = [image('pruned', 'Ready', { run: 3, image: 'reg/p@sha256:3' })];
    service.generations.pruned = [
      { run: 3, image: 'reg/p@sha256:3', current: true, changes: none, comparedWith: 2 },
      {
        run: 2,
        image: 'reg/p@sha256:2',
        current: false,
        changes: none,
        comparedWith: 1,
        savedAt: '2026-11-20T08:00:00Z',
        lastStartedAt: '2026-11-21T09:30:00Z'
      },
      {
        run: 1,
        image: 'reg/p@sha256:1',
        current: false,
        changes: none,
        removed: { at: '2026-11-24T03:00:00Z', reason: 'no server started on it for 30 days' }
      }
    ];
    const view = renderPanel();
    const detail = await openDetail('pruned');
    const items = within(await within(detail).findByTestId('cnbi-generations')).getAllByRole('listitem');
    expect(items.map(i => i.dataset.removed)).toEqual(['false', 'false', 'true']);
    expect(items[1].textContent).toContain('last started 2026-11-21 09:30 UTC');
    expect(within(items[1]).getByTestId('cnbi-make-current')).toBeTruthy();
    expect(within(items[2]).getByTestId('cnbi-generation-removed').textContent).toBe(
      ' · image removed 2026-11-24 03:00 UTC: no server started on it for 30 days'
    );
    expect(within(items[2]).queryByTestId('cnbi-make-current')).toBeNull();
    expect(within(items[2]).queryByTestId('cnbi-start-build')).toBeNull();
    expect(within(items[1]).queryByTestId('cnbi-build-again')).toBeNull();
    // its commit, base and lock are kept: the owner builds it again
    fireEvent.click(within(items[2]).getByTestId('cnbi-build-again'));
    await waitFor(() => expect(service.images[0].status?.phase).toBe('Pending'));
    const again = service.requests.find(r => r.method === 'POST' && r.url.split('?')[0].endsWith('/rollback'))!;
    expect(JSON.parse(again.body)).toEqual({ run: 1, rebuild: true });
    expect((await within(detail).findByTestId('cnbi-triggers')).textContent).toContain(
      'Run 1’s build built again from its lock by alice'
    );
    view.unmount();
  });

  it('offers no rollback on an image shared with me', async () => {
    service.images = [image('theirs', 'Ready', { run: 2, image: 'reg/t@sha256:2' }, 'bob')];
    service.generations.theirs = [
      { run: 2, image: 'reg/t@sha256:2', current: true, changes: { added: [], removed: [], changed: [], counts: { added: 0, removed: 0, changed: 0 } }, comparedWith: 1 },
      { run: 1, image: 'reg/t@sha256:1', current: false, changes: { added: [], removed: [], changed: [], counts: { added: 0, removed: 0, changed: 0 } } }
    ];
    const view = renderPanel();
    const detail = await openDetail('theirs');
    const list = await within(detail).findByTestId('cnbi-generations');
    expect(within(list).getByTestId('cnbi-generation-changes').textContent).toBe(' · same packages as run 1');
    expect(within(list).queryByTestId('cnbi-make-current')).toBeNull();
    // starting a kept build is for everyone who may start the image
    expect(within(list).getAllByTestId('cnbi-start-build')).toHaveLength(1);
    view.unmount();
  });

  it('says when the image this server runs has a newer build, and restarts the server on it', async () => {
    const running = 'reg/mine@sha256:1';
    service.serverInfo = { cnbiImage: 'mine', jupyterImage: running, serverName: 'mine' };
    service.images = [image('mine', 'Ready', { run: 1, image: running })];
    const view = renderPanel();
    await screen.findByTestId('cnbi-image-row');
    expect(screen.queryByTestId('cnbi-newer-build')).toBeNull();
    // a push rebuilt it meanwhile: the stream of the image this server runs brings run 2
    await service.waitFor(() => service.watchers('mine') > 0);
    const rebuilt = image('mine', 'Ready', { run: 2, image: 'reg/mine@sha256:2' });
    rebuilt.metadata.resourceVersion = '2';
    service.replace(service.images[0], rebuilt);
    const notice = await screen.findByTestId('cnbi-newer-build');
    expect(notice.textContent).toContain('A newer build of Display mine is ready (run 2)');
    fireEvent.click(within(notice).getByTestId('cnbi-restart-on-newer'));
    await waitFor(() => expect(actions.opened).toContain('navigate /services/cnbi/restarting/mine?server=mine'));
    expect(service.stopped).toBe(true);
    expect(actions.confirms).toContain('restart Display mine on run 2');
    expect(service.requests.some(r => r.method === 'POST' && r.url.split('?')[0] === '/user/alice/cnbi/restart')).toBe(
      true
    );
    view.unmount();
  });

  it('says nothing about an image it does not run, or one not Ready', async () => {
    service.serverInfo = { cnbiImage: 'mine', jupyterImage: 'reg/mine@sha256:1', serverName: '' };
    service.images = [
      image('mine', 'Building', { run: 2, image: 'reg/mine@sha256:2' }),
      image('other', 'Ready', { run: 3, image: 'reg/other@sha256:9' })
    ];
    const view = renderPanel();
    await screen.findAllByTestId('cnbi-image-row');
    await new Promise(r => setTimeout(r, 100));
    expect(screen.queryByTestId('cnbi-newer-build')).toBeNull();
    view.unmount();
  });

  it('keeps one order, newest first, as images load, are created and arrive', async () => {
    service.images = [
      image('older', 'Ready', {}, 'alice', { created: '2026-01-01T00:00:00Z' }),
      image('newer', 'Ready', {}, 'alice', { created: '2026-01-03T00:00:00Z' })
    ];
    const order = () => screen.getAllByTestId('cnbi-image-row').map(r => r.dataset.name);
    const view = renderPanel();
    await waitFor(() => expect(order()).toEqual(['newer', 'older']));
    await baseImagesLoaded();
    fireEvent.change(screen.getByLabelText('Name'), { target: { value: 'fresh' } });
    fireEvent.change(screen.getByLabelText(/one per line/), { target: { value: 'six' } });
    fireEvent.click(screen.getByTestId('cnbi-submit'));
    await waitFor(() => expect(order()).toEqual(['image-3', 'newer', 'older']));
    // an image the list did not hold yet (asked for by the status bar) takes its place by date
    service.images.push(image('middle', 'Ready', {}, 'alice', { created: '2026-01-02T00:00:00Z' }));
    view.rerender(
      <ImageBuilder
        api={api}
        hubPrefix="/hub/"
        currentUser="alice"
        actions={actions}
        eventSourceFactory={esFactory}
        request={{ seq: 1, kind: 'select', name: 'middle' }}
      />
    );
    await waitFor(() => expect(order()).toEqual(['image-3', 'newer', 'middle', 'older']));
    expect((await screen.findByTestId('cnbi-detail')).dataset.name).toBe('middle');
    view.unmount();
  });

  describe('sections', () => {
    const images = () => [
      image('mine', 'Ready', {}, 'alice', { created: '2026-01-06T00:00:00Z' }),
      image('root-own', 'Ready', {}, 'root', { created: '2026-01-05T00:00:00Z' }),
      image('bob-all', 'Ready', {}, 'bob', { created: '2026-01-04T00:00:00Z', annotations: { 'cnbi-hub.io/shared': 'true' } }),
      image('bob-team', 'Ready', {}, 'bob', {
        created: '2026-01-03T00:00:00Z',
        annotations: { 'cnbi-hub.io/shared-with-groups': 'ops,team-a' }
      }),
      image('carol-private', 'Ready', {}, 'carol', { created: '2026-01-02T00:00:00Z' })
    ];
    const rowsIn = (testid: string) =>
      within(screen.getByTestId(testid))
        .queryAllByTestId('cnbi-image-row')
        .map(r => r.dataset.name);

    it('for a user: mine, and shared with me labelled everyone or by group', async () => {
      service.images = images().filter(i => ['mine', 'bob-all', 'bob-team'].includes(i.metadata.name!));
      const view = renderPanel();
      await waitFor(() => expect(screen.getAllByTestId('cnbi-image-row')).toHaveLength(3));
      expect(rowsIn('cnbi-section-mine')).toEqual(['mine']);
      expect(rowsIn('cnbi-section-shared')).toEqual(['bob-all', 'bob-team']);
      expect(screen.getAllByTestId('cnbi-shared-with').map(e => e.textContent)).toEqual([
        ' · shared with everyone',
        ' · shared with team-a'
      ]);
      expect(screen.queryByTestId('cnbi-section-all')).toBeNull();
      view.unmount();
    });

    it('for an admin: also every other user’s images, by owner, each image once', async () => {
      service.user = ADMIN;
      service.images = images();
      const view = renderPanel();
      await screen.findByTestId('cnbi-section-all');
      await waitFor(() => expect(rowsIn('cnbi-section-mine')).toEqual(['root-own']));
      expect(rowsIn('cnbi-section-shared')).toEqual(['bob-all', 'bob-team']);
      const groups = screen.getAllByTestId('cnbi-owner-group');
      expect(groups.map(g => g.dataset.owner)).toEqual(['alice', 'carol']);
      expect(groups.map(g => g.querySelector('h4')!.textContent)).toEqual(['alice', 'carol']);
      expect(within(groups[0]).getAllByTestId('cnbi-image-row').map(r => r.dataset.name)).toEqual(['mine']);
      const all = screen.getAllByTestId('cnbi-image-row').map(r => r.dataset.name);
      expect(new Set(all).size).toBe(all.length);
      expect(all.length).toBe(5);
      view.unmount();
    });

    it('falls back to the hub user when the service does not say who', async () => {
      service.user = null;
      service.images = images().slice(0, 1);
      const view = renderPanel();
      await waitFor(() => expect(rowsIn('cnbi-section-mine')).toEqual(['mine']));
      view.unmount();
    });
  });

  describe('sharing', () => {
    it('admins share with everyone and with any group', async () => {
      service.user = ADMIN;
      service.images = [image('img', 'Ready', {}, 'bob')];
      const view = renderPanel();
      await screen.findByTestId('cnbi-section-all');
      await openDetail('img');
      const everyone = (await screen.findByTestId('cnbi-share-everyone')) as HTMLInputElement;
      expect(everyone.checked).toBe(false);
      fireEvent.click(everyone);
      await waitFor(() => expect((screen.getByTestId('cnbi-share-everyone') as HTMLInputElement).checked).toBe(true));
      const patches = () => service.requests.filter(r => r.method === 'PATCH').map(r => JSON.parse(r.body));
      expect(patches()).toEqual([{ shared: true }]);
      // the list moves it to "Shared with me"
      await waitFor(() => expect(within(screen.getByTestId('cnbi-section-shared')).getByTestId('cnbi-image-row')).toBeTruthy());

      fireEvent.change(screen.getByTestId('cnbi-share-group-input'), { target: { value: 'ops' } });
      fireEvent.click(screen.getByTestId('cnbi-share-group-add'));
      await waitFor(() => expect(screen.getAllByTestId('cnbi-share-group').map(c => c.dataset.group)).toEqual(['ops']));
      expect((screen.getByTestId('cnbi-share-group-input') as HTMLInputElement).value).toBe('');
      fireEvent.change(screen.getByTestId('cnbi-share-group-input'), { target: { value: 'data' } });
      fireEvent.keyDown(screen.getByTestId('cnbi-share-group-input'), { key: 'Enter' });
      await waitFor(() => expect(screen.getAllByTestId('cnbi-share-group').map(c => c.dataset.group)).toEqual(['data', 'ops']));
      fireEvent.click(within(screen.getAllByTestId('cnbi-share-group')[1]).getByTestId('cnbi-share-group-remove'));
      await waitFor(() => expect(screen.getAllByTestId('cnbi-share-group').map(c => c.dataset.group)).toEqual(['data']));
      expect(patches().slice(1)).toEqual([
        { sharedWithGroups: ['ops'] },
        { sharedWithGroups: ['data', 'ops'] },
        { sharedWithGroups: ['data'] }
      ]);
      fireEvent.click(screen.getByTestId('cnbi-share-everyone'));
      await waitFor(() => expect((screen.getByTestId('cnbi-share-everyone') as HTMLInputElement).checked).toBe(false));
      expect(service.images[0].metadata.annotations?.['cnbi-hub.io/shared']).toBeUndefined();
      view.unmount();
    });

    it('owners share with their own groups only, and see the service’s refusal', async () => {
      service.user = { name: 'alice', admin: false, groups: ['team-a', 'team-b'] };
      service.images = [image('img', 'Ready')];
      const view = renderPanel();
      await openDetail('img');
      expect(screen.queryByTestId('cnbi-share-everyone')).toBeNull();
      const input = await screen.findByTestId('cnbi-share-group-input');
      const add = screen.getByTestId('cnbi-share-group-add') as HTMLButtonElement;
      fireEvent.change(input, { target: { value: 'ops' } });
      expect(add.disabled).toBe(true);
      expect(screen.getByTestId('cnbi-share-hint').textContent).toContain('you can share with team-a, team-b');
      fireEvent.change(input, { target: { value: 'team-a' } });
      expect(add.disabled).toBe(false);
      fireEvent.click(add);
      await waitFor(() => expect(screen.getAllByTestId('cnbi-share-group').map(c => c.dataset.group)).toEqual(['team-a']));
      service.nextPatchError = { status: 403, body: { message: 'you are not a member of team-b', field: 'sharedWithGroups' } };
      fireEvent.change(input, { target: { value: 'team-b' } });
      fireEvent.click(add);
      expect((await screen.findByTestId('cnbi-share-error')).textContent).toBe('you are not a member of team-b');
      expect(screen.getAllByTestId('cnbi-share-group').map(c => c.dataset.group)).toEqual(['team-a']);
      view.unmount();
    });

    it('someone else’s image: who it is shared with, no controls', async () => {
      service.images = [
        image('theirs', 'Ready', {}, 'bob', { annotations: { 'cnbi-hub.io/shared-with-groups': 'team-a' } }),
        image('their-build', 'Building', {}, 'bob', { annotations: { 'cnbi-hub.io/shared': 'true' } })
      ];
      const view = renderPanel();
      const detail = await openDetail('theirs');
      expect(screen.getByTestId('cnbi-share-summary').textContent).toBe('Shared with team-a');
      expect(screen.queryByTestId('cnbi-share-group-input')).toBeNull();
      // start it, copy it; changing it is for its owner (the service refuses anyone else)
      expect(within(detail).getByTestId('cnbi-spawn')).toBeTruthy();
      expect(within(detail).getByTestId('cnbi-edit-as-new')).toBeTruthy();
      expect(within(detail).queryByTestId('cnbi-rebuild')).toBeNull();
      expect(within(detail).queryByTestId('cnbi-delete')).toBeNull();
      const building = await openDetail('their-build');
      expect(within(building).queryByTestId('cnbi-cancel')).toBeNull();
      expect(within(building).queryByTestId('cnbi-delete')).toBeNull();
      view.unmount();
    });

    it('an admin may cancel, rebuild and delete anyone’s image', async () => {
      service.user = ADMIN;
      service.images = [image('their-build', 'Building', {}, 'bob'), image('theirs', 'Failed', {}, 'bob')];
      const view = renderPanel();
      const building = await openDetail('their-build');
      expect(within(building).getByTestId('cnbi-cancel')).toBeTruthy();
      expect(within(building).getByTestId('cnbi-delete')).toBeTruthy();
      const failed = await openDetail('theirs');
      expect((within(failed).getByTestId('cnbi-rebuild') as HTMLButtonElement).disabled).toBe(false);
      expect(within(failed).getByTestId('cnbi-delete')).toBeTruthy();
      view.unmount();
    });

    it('tells an owner which of their groups are left to share with', () => {
      expect(ownerShareHint(['team-a', 'team-b'], [], [])).toBe('You can share with your groups: team-a, team-b.');
      expect(ownerShareHint(['team-a', 'team-b'], ['team-a'], [])).toBe('You can also share with your groups: team-b.');
      expect(ownerShareHint(['team-a'], ['team-a'], [])).toBe('It is shared with all your groups.');
      expect(ownerShareHint(['team-a'], [], ['ops'])).toBe('You are not in ops: you can share with team-a.');
    });
  });

  it('edit as new: a failed image’s settings in a new form', async () => {
    service.images = [
      image(
        'broken',
        'Failed',
        { conditions: [{ type: 'ErrorBuildingImage', status: 'True', message: 'no such ref' }] },
        'alice',
        {
          annotations: { 'opendatahub.io/notebook-image-desc': 'from git' },
          spec: {
            buildType: 'GitRepository',
            baseImage: 'localhost:5000/notebook:2',
            repository: 'https://example.org/r.git',
            gitRef: 'nope',
            packageVersions: ['six', 'numpy']
          }
        }
      )
    ];
    const view = renderPanel();
    await openDetail('broken');
    fireEvent.click(screen.getByTestId('cnbi-edit-as-new'));
    const form = await screen.findByTestId('cnbi-create-form');
    expect(within(form).getByTestId('cnbi-form-notice').textContent).toMatch(/^A copy of “Display broken” \(broken\)/);
    expect(within(form).getByTestId('cnbi-tab-GitRepository').getAttribute('aria-selected')).toBe('true');
    expect((screen.getByLabelText('Name') as HTMLInputElement).value).toBe('Display broken (copy)');
    expect((screen.getByLabelText('Description') as HTMLInputElement).value).toBe('from git');
    expect((screen.getByLabelText('Repository URL') as HTMLInputElement).value).toBe('https://example.org/r.git');
    expect((screen.getByLabelText('Branch, tag or commit') as HTMLInputElement).value).toBe('nope');
    expect((screen.getByLabelText(/one per line/) as HTMLTextAreaElement).value).toBe('six\nnumpy');
    await waitFor(() => expect((screen.getByLabelText('Base image') as HTMLSelectElement).value).toBe('localhost:5000/notebook:2'));
    fireEvent.change(screen.getByLabelText('Branch, tag or commit'), { target: { value: 'main' } });
    fireEvent.click(screen.getByTestId('cnbi-submit'));
    await waitFor(() => expect(screen.getByTestId('cnbi-detail').dataset.name).toBe('image-2'));
    const created = service.requests.find(r => r.method === 'POST' && !r.url.includes('dryRun'))!;
    expect(JSON.parse(created.body).spec).toEqual({
      buildType: 'GitRepository',
      baseImage: 'localhost:5000/notebook:2',
      repository: 'https://example.org/r.git',
      gitRef: 'main',
      packageVersions: ['six', 'numpy']
    });
    view.unmount();
  });

  it('cancels a running build; Delete stays its own button', async () => {
    service.images = [image('busy', 'Building', { startTime: '2026-11-23T08:59:50Z' })];
    const view = renderPanel();
    const detail = await openDetail('busy');
    expect(within(detail).getByTestId('cnbi-delete')).toBeTruthy();
    fireEvent.click(await screen.findByTestId('cnbi-cancel'));
    await waitFor(() => expect(within(detail).getByTestId('cnbi-phase-badge').dataset.phase).toBe('Failed'));
    expect(within(detail).getByTestId('cnbi-failure').textContent).toBe('cancelled by alice');
    expect(within(detail).getByTestId('cnbi-progress').dataset.phase).toBe('Failed');
    expect(within(detail).getByRole('progressbar').getAttribute('aria-label')).toBe('Failed while building');
    expect(screen.queryByTestId('cnbi-cancel')).toBeNull();
    expect(screen.getByTestId('cnbi-delete')).toBeTruthy();
    expect(service.requests.filter(r => new URL(r.url, 'http://x').pathname.endsWith('/images/busy/cancel')).map(r => r.method)).toEqual(['POST']);
    expect(service.images[0].status?.phase).toBe('Failed');
    view.unmount();
  });

  it('cancelling what already finished shows the service’s message and the real state', async () => {
    service.images = [image('quick', 'Resolving')];
    const view = renderPanel();
    await openDetail('quick');
    const cancel = await screen.findByTestId('cnbi-cancel');
    // it finished meanwhile, but no event told the panel yet
    service.images = [image('quick', 'Ready')];
    fireEvent.click(cancel);
    expect((await screen.findByTestId('cnbi-action-error')).textContent).toBe('the build of quick already finished (Ready)');
    await waitFor(() => expect(screen.getByTestId('cnbi-detail').querySelector('[data-testid="cnbi-phase-badge"]')!.textContent).toBe('Ready'));
    expect(screen.queryByTestId('cnbi-cancel')).toBeNull();
    view.unmount();
  });

  it('rebuilds: run separators in the log, each run’s duration, reuse, one phase for badge and bar', async () => {
    service.images = [
      image('other', 'Ready', {}, 'alice', { created: '2026-01-01T00:00:00Z' }),
      image(
        'again',
        'Ready',
        {
          run: 2,
          startTime: '2026-11-23T09:00:00Z',
          completionTime: '2026-11-23T09:00:05Z',
          reusedFrom: 'other',
          image: 'localhost:5000/cnbi/alice/again@sha256:9',
          imageSize: 1_234_567_890,
          runs: [
            { run: 1, phase: 'Ready', startTime: '2026-11-22T09:00:00Z', completionTime: '2026-11-22T09:00:23Z' }
          ],
          triggers: [
            { kind: 'rebuild', by: 'alice', at: '2026-11-22T09:00:30Z' },
            {
              kind: 'webhook',
              source: 'github',
              by: 'octocat',
              at: '2026-11-23T09:00:00Z',
              ref: 'refs/heads/main',
              from: '1a2b3c4d',
              to: '5d6e7f8a'
            }
          ]
        },
        'alice',
        { created: '2026-01-02T00:00:00Z' }
      )
    ];
    service.logs.again = 'STEP 1/2\nSTEP 2/2\n=== Run 2 · rebuild requested by alice · 2026-11-23T09:00:00Z ===\nreusing other\n';
    const view = renderPanel();
    const detail = await openDetail('again');
    const separator = await within(detail).findByTestId('cnbi-log-separator');
    expect(separator.dataset.run).toBe('2');
    expect(separator.textContent).toBe('Run 2 · rebuild requested by alice · 2026-11-23T09:00:00Z');
    expect(separator.getAttribute('role')).toBe('separator');
    expect(screen.getByTestId('cnbi-log').textContent).toContain('STEP 2/2\n');
    expect(screen.getByTestId('cnbi-log').textContent).toContain('reusing other\n');
    // a separator arriving live is drawn the same way
    act(() => service.push('again', 'log', { line: '=== Run 3 · rebuild requested by bob · 2026-11-24T09:00:00Z ===' }));
    await waitFor(() => expect(within(detail).getAllByTestId('cnbi-log-separator').map(e => e.dataset.run)).toEqual(['2', '3']));

    expect(within(detail).getByTestId('cnbi-duration').textContent).toBe('built in 5 s');
    expect(within(detail).getByTestId('cnbi-image-size').textContent).toBe('1.2 GB');
    expect(within(detail).getByTestId('cnbi-runs').textContent).toContain('Run 1 · Ready · built in 23 s');
    expect(within(detail).getByTestId('cnbi-reused').textContent).toBe('Reused the build of Display other');
    expect(within(detail).queryByTestId('cnbi-rebuild-after')).toBeNull();
    const rebuilds = within(detail).getByTestId('cnbi-triggers');
    expect(Array.from(rebuilds.querySelectorAll('li')).map(li => li.textContent)).toEqual([
      'Push to main by octocat (GitHub webhook) · 1a2b3c4 → 5d6e7f8 · 2026-11-23 09:00 UTC',
      'Rebuild asked by alice · 2026-11-22 09:00 UTC'
    ]);

    // the rebuild: badge and bar move together
    fireEvent.click(within(detail).getByTestId('cnbi-rebuild'));
    await waitFor(() => expect(within(detail).getByTestId('cnbi-phase-badge').dataset.phase).toBe('Pending'));
    expect(within(detail).getByTestId('cnbi-progress').dataset.phase).toBe('Pending');
    expect(within(detail).getByRole('progressbar').getAttribute('aria-valuenow')).toBe('0');
    const building = { ...service.images.find(i => i.metadata.name === 'again')! };
    const next = {
      ...building,
      metadata: { ...building.metadata, resourceVersion: '9' },
      status: { phase: 'Building' as const, run: 3, startTime: '2026-11-23T09:00:00Z' }
    };
    act(() =>
      service.push('again', 'object', {
        ...next,
        status: {
          ...next.status,
          rebuildAfter: { kind: 'webhook', source: 'gitlab', by: 'jdoe', ref: 'refs/heads/main', to: '99aa88bb77' }
        }
      })
    );
    await waitFor(() => expect(within(detail).getByTestId('cnbi-phase-badge').dataset.phase).toBe('Building'));
    expect(within(detail).getByTestId('cnbi-rebuild-after').textContent).toBe(
      'Push to main by jdoe (GitLab webhook) · 99aa88b came during this run: the image is rebuilt at that commit when it ends.'
    );
    expect(within(detail).getByTestId('cnbi-progress').dataset.phase).toBe('Building');
    expect(within(detail).getByTestId('cnbi-duration').textContent).toMatch(/^running for /);
    view.unmount();
  });

  it('shows a resolver failure with its lines apart', async () => {
    const message = 'No solution found when resolving dependencies:\n  Because pandas==99 does not exist\n  and you require pandas==99, we can conclude that your requirements are unsatisfiable.';
    service.images = [
      image('unsat', 'Failed', {
        failedPhase: 'Resolving',
        conditions: [{ type: 'ErrorResolvingDependencies', status: 'True', message }]
      })
    ];
    const view = renderPanel();
    const detail = await openDetail('unsat');
    const failure = within(detail).getByTestId('cnbi-failure');
    expect(failure.textContent).toBe(message);
    expect(failure.classList.contains('cnbi-failure-detail')).toBe(true);
    view.unmount();
  });

  it('labels durations and confirms a copy for a moment', async () => {
    service.images = [
      image('failed', 'Failed', { startTime: '2026-01-01T00:00:00Z', completionTime: '2026-01-01T00:00:12Z' }, 'alice', {
        created: '2026-01-01T00:00:00Z'
      }),
      image('built', 'Ready', {
        startTime: '2026-01-01T00:00:00Z',
        completionTime: '2026-01-01T00:00:23Z',
        image: 'localhost:5000/cnbi/alice/built@sha256:1',
        imageSize: 850_000_000
      }, 'alice', { created: '2026-01-02T00:00:00Z' })
    ];
    const view = renderPanel();
    let detail = await openDetail('failed');
    expect(within(detail).getByTestId('cnbi-duration').textContent).toBe('failed after 12 s');
    expect(within(detail).queryByTestId('cnbi-image-size')).toBeNull();
    detail = await openDetail('built');
    expect(within(detail).getByTestId('cnbi-duration').textContent).toBe('built in 23 s');
    expect(within(detail).getByTestId('cnbi-image-size').textContent).toBe('850 MB');
    expect(screen.queryByTestId('cnbi-copied')).toBeNull();
    fireEvent.click(screen.getByTestId('cnbi-copy-ref'));
    expect(screen.getByTestId('cnbi-copied').textContent).toBe('Copied');
    expect(actions.copied).toEqual(['localhost:5000/cnbi/alice/built@sha256:1']);
    await waitFor(() => expect(screen.queryByTestId('cnbi-copied')).toBeNull(), { timeout: COPIED_MS + 1500 });
    view.unmount();
  });

  describe('build-finished notifications', () => {
    const create = async () => {
      await baseImagesLoaded();
      fireEvent.change(screen.getByLabelText('Name'), { target: { value: 'Notify me' } });
      fireEvent.change(screen.getByLabelText(/one per line/), { target: { value: 'six' } });
      fireEvent.click(screen.getByTestId('cnbi-submit'));
      await waitFor(() => expect(screen.getByTestId('cnbi-detail').dataset.name).toBe('image-1'));
      await act(() => service.waitFor(() => service.watchers('image-1') === 1));
    };
    const finish = (phase: string, extra: Partial<ICustomNBImage['status']> = {}) => {
      const obj = service.images[0];
      act(() =>
        service.push('image-1', 'object', {
          ...obj,
          metadata: { ...obj.metadata, resourceVersion: '5' },
          status: { phase, ...extra }
        })
      );
    };

    it('tells that an image built in this session is ready, with a way to start a server', async () => {
      let visible = true;
      const view = renderPanel({ isVisible: () => visible });
      await create();
      visible = false;
      finish('Ready');
      await waitFor(() => expect(actions.notices).toHaveLength(1));
      expect(actions.notices[0]).toEqual({
        kind: 'success',
        message: 'Image “Notify me” is ready.',
        action: { label: 'Start a server', url: '/hub/spawn/alice/image-1?opt-cnbi_image=image-1' }
      });
      view.unmount();
    });

    it('tells a failure, and says nothing while the panel is in sight', async () => {
      const view = renderPanel({ isVisible: () => false });
      await create();
      finish('Failed', { conditions: [{ type: 'ErrorBuildingImage', status: 'True', message: 'pip failed\nmore' }] });
      await waitFor(() => expect(actions.notices).toHaveLength(1));
      expect(actions.notices[0]).toMatchObject({ kind: 'error', message: 'Image “Notify me” failed: pip failed' });
      expect(actions.notices[0].action).toBeUndefined();
      view.unmount();

      actions.notices.length = 0;
      service.images = [];
      const seen = renderPanel({ isVisible: () => true });
      await create();
      finish('Ready');
      await waitFor(() => expect(screen.getByTestId('cnbi-detail').querySelector('[data-testid="cnbi-phase-badge"]')!.textContent).toBe('Ready'));
      expect(actions.notices).toEqual([]);
      seen.unmount();
    });

    it('says nothing about images it did not build', async () => {
      service.images = [image('theirs', 'Building')];
      const view = renderPanel({ isVisible: () => false });
      await openDetail('theirs');
      await act(() => service.waitFor(() => service.watchers('theirs') === 1));
      // the service's state moves on too (as the real one's does): a stream that opens after the
      // push (the list's watcher hands over to the detail's) starts from Ready as well
      const ready = { ...image('theirs', 'Ready'), metadata: { ...image('theirs', 'Ready').metadata, resourceVersion: '2' } };
      service.images = [ready];
      act(() => service.push('theirs', 'object', ready));
      await waitFor(() => expect(screen.getByTestId('cnbi-detail').querySelector('[data-testid="cnbi-phase-badge"]')!.textContent).toBe('Ready'));
      expect(actions.notices).toEqual([]);
      view.unmount();
    });
  });

  describe('save this environment as an image', () => {
    it('shows what changed, then opens the form with it', async () => {
      service.environment = {
        baseImage: 'localhost:5000/cnbi/alice/mine@sha256:7',
        cnbiImage: 'mine',
        baseline: 'manifest',
        added: [{ name: 'tabulate', version: '0.9.0' }],
        changed: [{ name: 'six', from: '1.16.0', to: '1.17.0' }],
        removed: [{ name: 'toml', version: '0.10.2' }],
        requirements: ['tabulate==0.9.0', 'six==1.17.0']
      };
      const view = renderPanel();
      fireEvent.click(await screen.findByTestId('cnbi-save-env'));
      const diff = await screen.findByTestId('cnbi-env-diff');
      expect(within(diff).getByTestId('cnbi-env-added').textContent).toContain('tabulate');
      expect(within(diff).getByTestId('cnbi-env-changed').textContent).toContain('1.16.0 → 1.17.0');
      expect(within(diff).getByTestId('cnbi-env-removed').textContent).toContain('toml');
      expect(screen.queryByTestId('cnbi-create-form')).toBeNull();
      fireEvent.click(screen.getByTestId('cnbi-env-confirm'));
      await screen.findByTestId('cnbi-create-form');
      expect(screen.getByTestId('cnbi-tab-PackageList').getAttribute('aria-selected')).toBe('true');
      expect((screen.getByLabelText(/one per line/) as HTMLTextAreaElement).value).toBe('tabulate==0.9.0\nsix==1.17.0');
      const select = screen.getByLabelText('Base image') as HTMLSelectElement;
      await waitFor(() => expect(select.options.length).toBe(3));
      expect(select.value).toBe('localhost:5000/cnbi/alice/mine@sha256:7');
      // editable before building
      fireEvent.change(screen.getByLabelText(/one per line/), { target: { value: 'tabulate==0.9.0' } });
      fireEvent.change(screen.getByLabelText('Name'), { target: { value: 'saved' } });
      fireEvent.click(screen.getByTestId('cnbi-submit'));
      await waitFor(() => expect(screen.getByTestId('cnbi-detail').dataset.name).toBe('image-1'));
      const created = service.requests.find(r => r.method === 'POST' && !r.url.includes('dryRun'))!;
      expect(JSON.parse(created.body).spec).toEqual({
        buildType: 'PackageList',
        baseImage: 'localhost:5000/cnbi/alice/mine@sha256:7',
        packageVersions: ['tabulate==0.9.0']
      });
      view.unmount();
    });

    it('says so when nothing was installed, or the server’s image is unknown', async () => {
      const view = renderPanel();
      fireEvent.click(await screen.findByTestId('cnbi-save-env'));
      expect((await screen.findByTestId('cnbi-env-message')).textContent).toMatch(/^Nothing was installed in this server/);
      expect(screen.queryByTestId('cnbi-env-confirm')).toBeNull();
      service.environment = { status: 409, body: { message: 'this server does not know which image it runs on' } };
      view.rerender(
        <ImageBuilder
          api={api}
          hubPrefix="/hub/"
          currentUser="alice"
          actions={actions}
          eventSourceFactory={esFactory}
          request={{ seq: 1, kind: 'saveEnvironment' }}
        />
      );
      await waitFor(() =>
        expect(screen.getByTestId('cnbi-env-message').textContent).toBe(
          'This server’s environment cannot be saved: this server does not know which image it runs on'
        )
      );
      fireEvent.click(screen.getByTestId('cnbi-env-cancel'));
      expect(await screen.findByTestId('cnbi-create-form')).toBeTruthy();
      view.unmount();
    });
  });
});
