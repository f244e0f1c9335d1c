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
import { buildIcon } from '@jupyterlab/ui-components';

import { ImageBuilderWidget } from './widget';

export const COMMAND_OPEN = 'cnbi:open';

/** The Image Builder: a launcher card and a palette entry opening one main-area panel. */
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

    app.commands.addCommand(COMMAND_OPEN, {
      label: 'Image Builder',
      caption: 'Build a custom notebook image and start a server on it',
      icon: args => (args['isPalette'] ? undefined : buildIcon),
      execute: () => {
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
      }
    });

    launcher?.add({ command: COMMAND_OPEN, category: 'Other', rank: 1 });
    palette?.addItem({ command: COMMAND_OPEN, category: 'Image Builder' });
    if (restorer) {
      void restorer.restore(tracker, {
        command: COMMAND_OPEN,
        name: () => 'cnbi-image-builder'
      });
    }
  }
};

export default plugin;
