import { TextItem } from '@jupyterlab/statusbar';
import type { IStatusBar } from '@jupyterlab/statusbar';
import { ReactWidget } from '@jupyterlab/ui-components';
import * as React from 'react';

import { CnbiApi } from './api';

/** "Image: <name>" in the status bar; a click opens that image in the Image Builder. */
export class ImageStatusItem extends ReactWidget {
  constructor(readonly image: string, onOpen: (image: string) => void) {
    super();
    this.addClass('jp-mod-highlighted');
    this.addClass('cnbi-statusbar-item');
    this.node.dataset.testid = 'cnbi-statusbar-image';
    this.node.title = `This server runs on the image ${image}: open it in the Image Builder`;
    this.node.setAttribute('role', 'button');
    this.node.tabIndex = 0;
    this.node.addEventListener('click', () => onOpen(image));
    this.node.addEventListener('keydown', event => {
      if (event.key === 'Enter' || event.key === ' ') {
        event.preventDefault();
        onOpen(image);
      }
    });
  }

  render(): JSX.Element {
    return <TextItem source={`Image: ${this.image}`} />;
  }
}

export const STATUS_ITEM_ID = 'cnbi-hub:image';

/**
 * Asks this server what it runs on (`{baseUrl}cnbi/server-info`); on a cnbi image, puts
 * "Image: <name>" in the status bar. Resolves to the item, or null (another image, an older
 * server extension, no answer).
 */
export async function addImageStatusItem(
  statusBar: IStatusBar,
  api: CnbiApi,
  onOpen: (image: string) => void
): Promise<{ item: ImageStatusItem; registration: ReturnType<IStatusBar['registerStatusItem']> } | null> {
  let image: string | null = null;
  try {
    image = (await api.serverInfo()).cnbiImage;
  } catch {
    return null;
  }
  if (!image) {
    return null;
  }
  const item = new ImageStatusItem(image, onOpen);
  const registration = statusBar.registerStatusItem(STATUS_ITEM_ID, {
    item,
    align: 'left',
    rank: 100
  });
  return { item, registration };
}
