/**
 * Playwright configuration for the Image Builder browser tests.
 *
 * The hub under test comes from the environment (tests/test_ui.py starts a real JupyterHub with
 * the cnbi service and sets these): CNBI_UI_HUB_URL, CNBI_UI_USER, CNBI_UI_PASSWORD, and for the
 * user flows CNBI_UI_MEMBER, CNBI_UI_OUTSIDER, CNBI_UI_ADMIN, CNBI_UI_GROUP, CNBI_UI_BASE_IMAGE,
 * CNBI_UI_BUILDS (see tests/uifixtures.py and helpers.ts). The browser
 * is Debian's Chromium (CNBI_UI_CHROMIUM, default /usr/bin/chromium); Playwright never downloads
 * one. Screenshots land in CNBI_UI_OUTPUT (default <repo>/test-output/ui).
 */
import * as path from 'path';

import { defineConfig } from '@playwright/test';

export const OUTPUT_DIR =
  process.env.CNBI_UI_OUTPUT || path.resolve(__dirname, '..', 'test-output', 'ui');

export default defineConfig({
  testDir: './tests',
  outputDir: path.join(OUTPUT_DIR, 'artifacts'),
  // One hub, one panel per user: the specs run one after another.
  workers: 1,
  fullyParallel: false,
  retries: 0,
  timeout: 180_000,
  expect: { timeout: 30_000 },
  reporter: [
    ['list'],
    ['json', { outputFile: path.join(OUTPUT_DIR, 'results.json') }]
  ],
  globalSetup: require.resolve('./tests/global-setup'),
  use: {
    baseURL: process.env.CNBI_UI_HUB_URL,
    storageState: path.join(OUTPUT_DIR, '.auth', 'state.json'),
    viewport: { width: 1366, height: 860 },
    actionTimeout: 30_000,
    navigationTimeout: 120_000,
    trace: 'retain-on-failure',
    screenshot: 'only-on-failure',
    launchOptions: {
      executablePath: process.env.CNBI_UI_CHROMIUM || '/usr/bin/chromium',
      args: [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync'
      ]
    }
  }
});
