/**
 * Logs in once through the hub's real login form, waits for JupyterHub to spawn the user's
 * single-user server and JupyterLab to load, and keeps the cookies for every spec.
 */
import * as fs from 'fs';
import * as path from 'path';

import { chromium, FullConfig } from '@playwright/test';

import { hubEnv, loginToLab } from './helpers';

export default async function globalSetup(config: FullConfig): Promise<void> {
  const env = hubEnv();
  const use = config.projects[0].use;
  const statePath = use.storageState as string;
  fs.mkdirSync(path.dirname(statePath), { recursive: true });
  const browser = await chromium.launch(use.launchOptions);
  try {
    const context = await browser.newContext({ baseURL: env.hubUrl, viewport: use.viewport });
    const page = await context.newPage();
    page.setDefaultNavigationTimeout(180_000);
    // The first login spawns the server (a container): the hub's spawn-pending page, then JupyterLab.
    await loginToLab(page, env.user, 240_000);
    await context.storageState({ path: statePath });
  } finally {
    await browser.close();
  }
}
