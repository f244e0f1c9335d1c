import { Clipboard, Dialog, showDialog } from '@jupyterlab/apputils';
import { PageConfig } from '@jupyterlab/coreutils';
import { ReactWidget } from '@jupyterlab/ui-components';
import * as React from 'react';

import { CnbiApi } from './api';
import { IPanelActions } from './components/ImageDetail';
import { ImageBuilder } from './components/ImageBuilder';

/** JupyterLab's own dialogs, clipboard and windows, for the panel's actions. */
export const labPanelActions: IPanelActions = {
  async confirmDelete(displayName: string): Promise<boolean> {
    const result = await showDialog({
      title: 'Delete image',
      body: `Delete the image “${displayName}”? Servers already running on it keep running.`,
      buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Delete' })]
    });
    return result.button.accept;
  },
  copyToClipboard(text: string): void {
    Clipboard.copyToSystem(text);
  },
  openUrl(url: string): void {
    window.open(url, '_blank', 'noopener');
  }
};

/** The Image Builder's main-area content: a React tree in a Lumino widget. */
export class ImageBuilderWidget extends ReactWidget {
  constructor(api: CnbiApi = new CnbiApi()) {
    super();
    this.api = api;
    this.addClass('cnbi-panel');
    this.node.dataset.testid = 'cnbi-panel';
  }

  readonly api: CnbiApi;

  render(): JSX.Element {
    return (
      <ImageBuilder
        api={this.api}
        hubPrefix={PageConfig.getOption('hubPrefix') || '/hub/'}
        currentUser={PageConfig.getOption('hubUser')}
        actions={labPanelActions}
      />
    );
  }
}
