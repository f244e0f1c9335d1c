import * as fs from 'fs';
import * as path from 'path';

import { Browser, BrowserContext, expect, Locator, Page } from '@playwright/test';

import { OUTPUT_DIR } from '../playwright.config';

export interface IHubEnv {
  hubUrl: string;
  /** the main user (logged in by the global setup; owns most images) */
  user: string;
  password: string;
  /** in `group` with `user` */
  member: string;
  /** in no group */
  outsider: string;
  /** a hub admin */
  admin: string;
  /** the JupyterHub group `user` and `member` are in */
  group: string;
  /** the base image the hub offers, which the servers run */
  baseImage: string;
  /** whether the hub's cnbi service builds images (its reconciler runs real podman builds) */
  builds: boolean;
}

export function hubEnv(): IHubEnv {
  const hubUrl = process.env.CNBI_UI_HUB_URL;
  const user = process.env.CNBI_UI_USER;
  const password = process.env.CNBI_UI_PASSWORD;
  if (!hubUrl || !user || !password) {
    throw new Error(
      'CNBI_UI_HUB_URL, CNBI_UI_USER and CNBI_UI_PASSWORD must name a running hub ' +
        '(tests/test_ui.py sets them; `python -m tests.uifixtures` starts one by hand)'
    );
  }
  return {
    hubUrl: hubUrl.endsWith('/') ? hubUrl : hubUrl + '/',
    user,
    password,
    member: process.env.CNBI_UI_MEMBER || 'ui-bob',
    outsider: process.env.CNBI_UI_OUTSIDER || 'ui-carol',
    admin: process.env.CNBI_UI_ADMIN || 'ui-admin',
    group: process.env.CNBI_UI_GROUP || 'ui-team',
    baseImage: process.env.CNBI_UI_BASE_IMAGE || 'localhost/cnbi/notebook-lab:py311',
    builds: process.env.CNBI_UI_BUILDS === '1'
  };
}

/** A user's default server (the main user's unless `user` is given), relative to the hub's URL. */
export function userPath(suffix = '', user = hubEnv().user): string {
  return `user/${encodeURIComponent(user)}/${suffix}`;
}

export async function login(page: Page, user: string, password: string): Promise<void> {
  await page.goto('hub/login');
  await page.locator('input[name="username"]').fill(user);
  await page.locator('input[name="password"]').fill(password);
  await page.locator('input[type="submit"], button[type="submit"]').first().click();
}

/** Waits until JupyterLab has started in the page (its shell and the launcher area). */
export async function waitForLab(page: Page, timeout = 120_000): Promise<void> {
  // the default server (/user/<user>/lab) or a named one (/user/<user>/<server>/lab)
  await page.waitForURL(/\/user\/[^/]+\/(?:[^/]+\/)?lab/, { timeout });
  await expect(page.locator('#jp-main-dock-panel')).toBeVisible({ timeout });
  // The splash screen covers the shell until every plugin has activated.
  await expect(page.locator('#jupyterlab-splash')).toHaveCount(0, { timeout });
}

/**
 * Logs `user` in through the hub's form and waits for their default server's JupyterLab. The
 * first login spawns the server; when the hub shows its spawn form (the user may start images
 * shared with them), the preselected choice, the admin's notebook image, is started.
 */
export async function loginToLab(page: Page, user: string, timeout = 240_000): Promise<void> {
  await login(page, user, hubEnv().password);
  const form = page.locator('#spawn_form');
  await expect(form.or(page.locator('#jp-main-dock-panel'))).toBeVisible({ timeout });
  if (await form.isVisible()) {
    await form.locator('[type="submit"]').click();
  }
  await waitForLab(page, timeout);
}

/**
 * Opens JupyterLab with a reset workspace, so it starts on the launcher whatever the last test
 * left open.
 */
export async function openLab(page: Page, user = hubEnv().user): Promise<void> {
  await page.goto(userPath('lab?reset', user));
  await waitForLab(page);
}

export const VIEWPORT = { width: 1366, height: 860 };

/**
 * A browser context logged in as `user` (another user than the global setup's), with JupyterLab
 * open in light theme. The first call logs in (spawning the server); later ones reuse the
 * cookies. Close the context when done.
 */
export async function userLab(browser: Browser, user: string): Promise<{ context: BrowserContext; page: Page }> {
  const statePath = path.join(OUTPUT_DIR, '.auth', `${user}.json`);
  const known = fs.existsSync(statePath);
  const context = await browser.newContext({
    baseURL: hubEnv().hubUrl,
    viewport: VIEWPORT,
    storageState: known ? statePath : undefined
  });
  const page = await context.newPage();
  page.setDefaultNavigationTimeout(180_000);
  if (!known) {
    await loginToLab(page, user);
    fs.mkdirSync(path.dirname(statePath), { recursive: true });
    await context.storageState({ path: statePath });
  }
  await openLab(page, user);
  await setTheme(page, LIGHT);
  return { context, page };
}

export function launcherCard(page: Page): Locator {
  return page.locator('.jp-LauncherCard', { hasText: 'Image Builder' });
}

/** From the launcher card: the Image Builder panel, with its list loaded. */
export async function openImageBuilder(page: Page): Promise<Locator> {
  const card = launcherCard(page);
  await expect(card).toBeVisible();
  await card.click();
  const panel = page.getByTestId('cnbi-panel');
  await expect(panel).toBeVisible();
  await expect(page.locator('.lm-TabBar-tab.lm-mod-current', { hasText: 'Image Builder' })).toBeVisible();
  // the form's base images come from the service: once the select has them, the API is up
  await expect(panel.getByTestId('cnbi-base-image').locator('option').first()).toBeAttached();
  return panel;
}

export const LIGHT = 'JupyterLab Light';
export const DARK = 'JupyterLab Dark';

/** Switches the theme through the Settings menu, as a user would. */
export async function setTheme(page: Page, theme: string): Promise<void> {
  const body = page.locator('body');
  if ((await body.getAttribute('data-jp-theme-name')) === theme) {
    return;
  }
  await page.locator('.lm-MenuBar-item', { hasText: /^Settings$/ }).click();
  await page.locator('.lm-Menu-item', { hasText: /^Theme/ }).first().hover();
  await page.locator('.lm-Menu-item', { hasText: theme }).first().click();
  await expect(body).toHaveAttribute('data-jp-theme-name', theme, { timeout: 60_000 });
  await expect(body).toHaveAttribute('data-jp-theme-light', theme === DARK ? 'false' : 'true');
  // the theme's CSS applies asynchronously after the attribute flips
  await page.waitForTimeout(500);
}

export function uniqueName(prefix: string): string {
  return `${prefix} ${Date.now().toString(36)}`;
}

export interface IImageSummary {
  name: string;
  displayName: string;
  phase: string;
}

/** The user's images as the API lists them, through the same server extension the panel uses. */
export async function listImages(page: Page, user = hubEnv().user): Promise<IImageSummary[]> {
  const response = await page.request.get(userPath('cnbi/api/images', user));
  expect(response.status()).toBe(200);
  const body = await response.json();
  return body.items.map((item: any) => ({
    name: item.metadata.name,
    displayName: item.metadata.annotations?.['opendatahub.io/notebook-image-name'] ?? '',
    phase: item.status?.phase ?? 'Pending'
  }));
}

/** Fills the PackageList form: name, the first base image of the select, package lines. */
export async function fillPackageForm(
  panel: Locator,
  displayName: string,
  packages: string,
  baseImage: string
): Promise<void> {
  const form = panel.getByTestId('cnbi-create-form');
  await expect(form).toBeVisible();
  await form.getByTestId('cnbi-tab-PackageList').click();
  await form.getByTestId('cnbi-name').fill(displayName);
  await form.getByTestId('cnbi-base-image').selectOption(baseImage);
  await form.getByTestId('cnbi-packages').fill(packages);
}

/** Fills the git tab: name, base image, repository URL; returns the form. */
export async function fillGitForm(
  panel: Locator,
  displayName: string,
  repository: string,
  baseImage: string
): Promise<Locator> {
  const form = panel.getByTestId('cnbi-create-form');
  await expect(form).toBeVisible();
  await form.getByTestId('cnbi-tab-GitRepository').click();
  await form.getByTestId('cnbi-name').fill(displayName);
  await form.getByTestId('cnbi-base-image').selectOption(baseImage);
  await form.getByTestId('cnbi-repository').fill(repository);
  return form;
}

/** Deletes the shown image through the detail's Delete button and JupyterLab's dialog. */
export async function deleteShownImage(page: Page, panel: Locator, name: string): Promise<void> {
  const detail = panel.getByTestId('cnbi-detail');
  await expect(detail).toHaveAttribute('data-name', name);
  await detail.getByTestId('cnbi-delete').click();
  const dialog = page.locator('.jp-Dialog');
  await expect(dialog).toBeVisible();
  await expect(dialog).toContainText('Delete image');
  await dialog.locator('button', { hasText: /^Delete$/ }).click();
  await expect(dialog).toHaveCount(0);
  await expect(panel.locator(`[data-testid="cnbi-image-row"][data-name="${name}"]`)).toHaveCount(0);
}

/** Where the screenshots go (test-output/ui/ unless CNBI_UI_OUTPUT says otherwise). */
export async function screenshot(target: Locator | Page, name: string): Promise<void> {
  fs.mkdirSync(OUTPUT_DIR, { recursive: true });
  // the pointer rests on the empty end of the menu bar: no row or button shows its hover look
  const page = 'page' in target ? target.page() : target;
  await page.mouse.move((page.viewportSize() ?? VIEWPORT).width - 40, 12);
  const file = path.join(OUTPUT_DIR, `${name}.png`);
  await target.screenshot({ path: file, animations: 'disabled' });
  expect(fs.statSync(file).size).toBeGreaterThan(1000);
}

/**
 * `<name>-light.png` and `<name>-dark.png` of `target`, switching JupyterLab's theme through its
 * menu; the page is left in the light theme.
 */
export async function screenshotBothThemes(page: Page, target: Locator | Page, name: string): Promise<void> {
  await setTheme(page, LIGHT);
  await screenshot(target, `${name}-light`);
  await setTheme(page, DARK);
  await screenshot(target, `${name}-dark`);
  await setTheme(page, LIGHT);
}

export function row(panel: Locator, name: string): Locator {
  return panel.locator(`[data-testid="cnbi-image-row"][data-name="${name}"]`);
}

/** Submits the filled form; returns the new image's object name (the row the panel selected). */
export async function submit(page: Page, panel: Locator, displayName: string): Promise<string> {
  const created = page.waitForResponse(
    r => r.request().method() === 'POST' && /\/cnbi\/api\/images(\?|$)/.test(r.url()) && !r.url().includes('dryRun')
  );
  const streams: { url: string; status: number; type: string }[] = [];
  page.on('response', r => {
    if (/\/cnbi\/api\/images\/[^/]+\/events/.test(r.url())) {
      streams.push({ url: r.url(), status: r.status(), type: r.headers()['content-type'] ?? '' });
    }
  });
  await panel.getByTestId('cnbi-submit').click();
  const response = await created;
  expect(response.status()).toBe(201);
  const name: string = (await response.json()).metadata.name;
  // the detail watches the new image's event stream (EventSource, authenticated by cookie+_xsrf)
  await expect.poll(() => streams.filter(e => e.url.includes(`/images/${name}/events`)).length).toBeGreaterThan(0);
  for (const e of streams.filter(e => e.url.includes(`/images/${name}/events`))) {
    expect(e.status, e.url).toBe(200);
    expect(e.type).toContain('text/event-stream');
  }
  // listed and shown at once, before anything was built
  await expect(row(panel, name)).toBeVisible({ timeout: 5_000 });
  await expect(row(panel, name)).toContainText(displayName);
  const detail = panel.getByTestId('cnbi-detail');
  await expect(detail).toHaveAttribute('data-name', name, { timeout: 5_000 });
  return name;
}

/** Waits until the shown image finished; fails with the failure message unless it is `phase`. */
export async function waitForFinish(panel: Locator, phase: 'Ready' | 'Failed', timeout: number): Promise<void> {
  const detail = panel.getByTestId('cnbi-detail');
  const badge = detail.getByTestId('cnbi-phase-badge');
  await expect(badge).toHaveAttribute('data-phase', /^(Ready|Failed)$/, { timeout });
  const failure = await detail
    .getByTestId('cnbi-failure')
    .textContent({ timeout: 1_000 })
    .catch(() => null);
  expect(await badge.getAttribute('data-phase'), `build ended: ${failure}`).toBe(phase);
}
