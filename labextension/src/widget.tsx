import { Clipboard, Dialog, Notification, showDialog } from '@jupyterlab/apputils';
import { PageConfig } from '@jupyterlab/coreutils';
import { ReactWidget } from '@jupyterlab/ui-components';
import * as React from 'react';

import { CnbiApi } from './api';
import { IPanelActions, IPanelNotice } from './components/ImageDetail';
import { ImageBuilder, PanelRequest } from './components/ImageBuilder';

/** JupyterLab's notifications: a build finished while the panel was out of sight. */
export function notifyWithLab(notice: IPanelNotice, openUrl: (url: string) => void): string {
  const action = notice.action;
  const options = {
    autoClose: notice.kind === 'error' ? (false as const) : 15000,
    actions: action
      ? [{ label: action.label, callback: () => openUrl(action.url), displayType: 'accent' as const }]
      : []
  };
  return notice.kind === 'success'
    ? Notification.success(notice.message, options)
    : Notification.error(notice.message, options);
}

/** JupyterLab's own dialogs, clipboard, notifications and windows, for the panel's actions. */
export const labPanelActions: IPanelActions = {
  async confirmDelete(displayName: string, builtOnIt: string[] = []): Promise<boolean> {
    const stacked = builtOnIt.length
      ? ` ${builtOnIt.length === 1 ? 'One image is' : `${builtOnIt.length} images are`} built on it ` +
        `(${builtOnIt.map(n => `“${n}”`).join(', ')}): they keep their builds, but cannot be rebuilt once it is gone.`
      : '';
    const result = await showDialog({
      title: 'Delete image',
      body: `Delete the image “${displayName}”? Servers already running on it keep running.${stacked}`,
      buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Delete' })]
    });
    return result.button.accept;
  },
  async confirmRestart(displayName: string, run: number): Promise<boolean> {
    const result = await showDialog({
      title: 'Restart on the newer build',
      body:
        `Restart this server on run ${run} of “${displayName}”? The server stops and starts again: ` +
        'its kernels and terminals end, so save your work first. Your home directory stays as it is.',
      buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Restart' })]
    });
    return result.button.accept;
  },
  navigate(url: string): void {
    window.location.assign(url);
  },
  copyToClipboard(text: string): void {
    Clipboard.copyToSystem(text);
  },
  openUrl(url: string): void {
    window.open(url, '_blank', 'noopener');
  },
  notify(notice: IPanelNotice): void {
    notifyWithLab(notice, url => labPanelActions.openUrl(url));
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

  /** Show one image's detail (the status bar item, `cnbi:open` with `image`). */
  showImage(name: string): void {
    this._request = { seq: this._nextSeq++, kind: 'select', name };
    this.update();
  }

  /** Start "Save this environment as an image". */
  saveEnvironment(): void {
    this._request = { seq: this._nextSeq++, kind: 'saveEnvironment' };
    this.update();
  }

  /** In sight: the widget is shown and the browser tab is not hidden. */
  readonly isInSight = (): boolean =>
    this.isVisible && (typeof document === 'undefined' || document.visibilityState !== 'hidden');

  render(): JSX.Element {
    return (
      <ImageBuilder
        api={this.api}
        hubPrefix={PageConfig.getOption('hubPrefix') || '/hub/'}
        currentUser={PageConfig.getOption('hubUser')}
        actions={labPanelActions}
        request={this._request}
        isVisible={this.isInSight}
      />
    );
  }

  private _request: PanelRequest | undefined;
  private _nextSeq = 1;
}
