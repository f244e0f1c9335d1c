// The status bar item and the commands of the plugins, with a stand-in JupyterLab application
// (a real CommandRegistry, a shell that attaches what it gets) against TestCnbiService.
import { PageConfig } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import type { IStatusBar } from '@jupyterlab/statusbar';
import { CommandRegistry } from '@lumino/commands';
import { Widget } from '@lumino/widgets';
import { fireEvent, screen, waitFor } from '@testing-library/react';
import EventSource from 'eventsource';

import { CnbiApi } from '../api';
import plugins, { COMMAND_OPEN, COMMAND_SAVE_ENVIRONMENT } from '../index';
import type { ICustomNBImage } from '../model';
import { addImageStatusItem } from '../statusbar';
import { TestCnbiService } from './service';

class FakeStatusBar implements IStatusBar {
  items: { id: string; item: IStatusBar.IItem }[] = [];
  registerStatusItem(id: string, item: IStatusBar.IItem) {
    this.items.push({ id, item });
    Widget.attach(item.item, document.body);
    return { isDisposed: false, dispose: () => undefined };
  }
}

const ready = (name: string): ICustomNBImage => ({
  metadata: {
    name,
    resourceVersion: '1',
    annotations: {
      'opendatahub.io/notebook-image-name': `Display ${name}`,
      'opendatahub.io/notebook-image-creator': 'alice'
    }
  },
  spec: { buildType: 'PackageList', baseImage: 'localhost:5000/notebook:1', packageVersions: ['six'] },
  status: { phase: 'Ready' }
});

describe('status bar', () => {
  let service: TestCnbiService;
  let api: CnbiApi;

  beforeEach(async () => {
    // Lumino renders the ReactWidgets here, outside React's act(): as in JupyterLab.
    (globalThis as any).IS_REACT_ACT_ENVIRONMENT = false;
    service = new TestCnbiService();
    await service.start();
    api = new CnbiApi(ServerConnection.makeSettings({ baseUrl: service.baseUrl }));
  });

  afterEach(async () => {
    (globalThis as any).IS_REACT_ACT_ENVIRONMENT = true;
    document.body.innerHTML = '';
    await service.stop();
  });

  it('shows the image this server runs on; a click asks to open it', async () => {
    service.serverInfo = { cnbiImage: 'my-img', jupyterImage: 'localhost/cnbi/alice/my-img@sha256:1', serverName: '' };
    const statusBar = new FakeStatusBar();
    const opened: string[] = [];
    const added = await addImageStatusItem(statusBar, api, image => opened.push(image));
    expect(added).not.toBeNull();
    expect(statusBar.items.map(i => [i.id, i.item.align])).toEqual([['cnbi-hub:image', 'left']]);
    const node = await screen.findByTestId('cnbi-statusbar-image');
    await waitFor(() => expect(node.textContent).toBe('Image: my-img'));
    fireEvent.click(node);
    expect(opened).toEqual(['my-img']);
  });

  it('shows nothing on another image, or when the server extension does not answer', async () => {
    const statusBar = new FakeStatusBar();
    expect(await addImageStatusItem(statusBar, api, () => undefined)).toBeNull();
    const elsewhere = new CnbiApi(ServerConnection.makeSettings({ baseUrl: service.baseUrl.replace('alice', 'bob') }));
    expect(await addImageStatusItem(statusBar, elsewhere, () => undefined)).toBeNull();
    expect(statusBar.items).toEqual([]);
  });

  it('opens the Image Builder on that image (cnbi:open with `image`), and saves the environment', async () => {
    (global as any).EventSource = EventSource;
    PageConfig.setOption('baseUrl', service.baseUrl);
    PageConfig.setOption('hubUser', 'alice');
    PageConfig.setOption('hubPrefix', '/hub/');
    service.images = [ready('first'), ready('my-img')];
    service.serverInfo = { cnbiImage: 'my-img', jupyterImage: null, serverName: '' };
    const commands = new CommandRegistry();
    const added: Widget[] = [];
    const app = {
      commands,
      shell: {
        add: (widget: Widget) => {
          added.push(widget);
          Widget.attach(widget, document.body);
        },
        activateById: () => undefined
      }
    } as any;
    const statusBar = new FakeStatusBar();
    const [main, status] = plugins;
    main.activate(app, null, null, null);
    status.activate(app, statusBar);
    fireEvent.click(await screen.findByTestId('cnbi-statusbar-image'));
    await waitFor(() => expect(screen.getByTestId('cnbi-detail').dataset.name).toBe('my-img'), { timeout: 5000 });
    // one panel, brought forward again by the palette command
    await commands.execute(COMMAND_SAVE_ENVIRONMENT);
    expect(added).toHaveLength(1);
    expect(await screen.findByTestId('cnbi-env-message')).toBeTruthy();
    await commands.execute(COMMAND_OPEN, { image: 'first' });
    await waitFor(() => expect(screen.getByTestId('cnbi-detail').dataset.name).toBe('first'));
    expect(screen.getAllByTestId('cnbi-panel')).toHaveLength(1);
    added.forEach(w => w.dispose());
    await service.waitFor(() => service.watchers('first') === 0);
    delete (global as any).EventSource;
  });
});
