import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import {
  ICommandPalette,
  MainAreaWidget,
  WidgetTracker
} from '@jupyterlab/apputils';
import { ILauncher } from '@jupyterlab/launcher';
import { IStatusBar } from '@jupyterlab/statusbar';
import { buildIcon } from '@jupyterlab/ui-components';

import { CnbiApi } from './api';
import { addImageStatusItem } from './statusbar';
import { ImageBuilderWidget } from './widget';

export const COMMAND_OPEN = 'cnbi:open';
export const COMMAND_SAVE_ENVIRONMENT = 'cnbi:save-environment';

/**
 * The Image Builder: a launcher card and palette entries opening one main-area panel.
 * `cnbi:open` takes an optional `image` (an object name) whose detail it shows.
 */
const plugin: JupyterFrontEndPlugin<void> = {
  id: 'cnbi-hub:plugin',
  description: 'Build custom notebook images and start servers on them (JupyterHub cnbi service).',
  autoStart: true,
  optional: [ILauncher, ICommandPalette, ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    launcher: ILauncher | null,
    palette: ICommandPalette | null,
    restorer: ILayoutRestorer | null
  ) => {
    const tracker = new WidgetTracker<MainAreaWidget<ImageBuilderWidget>>({
      namespace: 'cnbi-hub'
    });
    let panel: MainAreaWidget<ImageBuilderWidget> | null = null;

    const open = (): MainAreaWidget<ImageBuilderWidget> => {
      if (!panel || panel.isDisposed) {
        panel = new MainAreaWidget({ content: new ImageBuilderWidget() });
        panel.id = 'cnbi-image-builder';
        panel.title.label = 'Image Builder';
        panel.title.icon = buildIcon;
        panel.title.closable = true;
        void tracker.add(panel);
      }
      if (!panel.isAttached) {
        app.shell.add(panel, 'main');
      }
      app.shell.activateById(panel.id);
      return panel;
    };

    app.commands.addCommand(COMMAND_OPEN, {
      label: 'Image Builder',
      caption: 'Build a custom notebook image and start a server on it',
      icon: args => (args['isPalette'] ? undefined : buildIcon),
      describedBy: {
        args: {
          type: 'object',
          properties: {
            image: { type: 'string', description: 'Name of an image whose detail to show' }
          }
        }
      },
      execute: args => {
        const widget = open();
        const image = args['image'];
        if (typeof image === 'string' && image) {
          widget.content.showImage(image);
        }
        return widget;
      }
    });

    app.commands.addCommand(COMMAND_SAVE_ENVIRONMENT, {
      label: 'Save this environment as an image',
      caption: 'Build a new image from the packages installed in this server',
      execute: () => {
        const widget = open();
        widget.content.saveEnvironment();
        return widget;
      }
    });

    launcher?.add({ command: COMMAND_OPEN, category: 'Other', rank: 1 });
    palette?.addItem({ command: COMMAND_OPEN, category: 'Image Builder' });
    palette?.addItem({ command: COMMAND_SAVE_ENVIRONMENT, category: 'Image Builder' });
    if (restorer) {
      void restorer.restore(tracker, {
        command: COMMAND_OPEN,
        name: () => 'cnbi-image-builder'
      });
    }
  }
};

/** "Image: <name>" in the status bar when this server runs on a cnbi image. */
export const statusBarPlugin: JupyterFrontEndPlugin<void> = {
  id: 'cnbi-hub:statusbar',
  description: 'Shows the cnbi image this server runs on; a click opens it in the Image Builder.',
  autoStart: true,
  optional: [IStatusBar],
  activate: (app: JupyterFrontEnd, statusBar: IStatusBar | null) => {
    if (!statusBar) {
      return;
    }
    void addImageStatusItem(statusBar, new CnbiApi(), image =>
      app.commands.execute(COMMAND_OPEN, { image })
    );
  }
};

export default [plugin, statusBarPlugin];
