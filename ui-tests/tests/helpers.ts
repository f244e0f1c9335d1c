import { expect, Locator, Page } from '@playwright/test';

export interface IHubEnv {
  hubUrl: string;
  user: string;
  password: string;
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
    builds: process.env.CNBI_UI_BUILDS === '1'
  };
}

/** The user's server, relative to the hub's URL. */
export function userPath(suffix = ''): string {
  return `user/${encodeURIComponent(hubEnv().user)}/${suffix}`;
}

export async function login(page: Page, user: string, password: string): Promise<void> {
  await page.goto('hub/login');
  await page.locator('input[name="username"]').fill(user);
  await page.locator('input[name="password"]').fill(password);
  await page.locator('input[type="submit"], button[type="submit"]').first().click();
}

/** Waits until JupyterLab has started in the page (its shell and the launcher area). */
export async function waitForLab(page: Page, timeout = 120_000): Promise<void> {
  await page.waitForURL(/\/user\/[^/]+\/lab/, { timeout });
  await expect(page.locator('#jp-main-dock-panel')).toBeVisible({ timeout });
  // The splash screen covers the shell until every plugin has activated.
  await expect(page.locator('#jupyterlab-splash')).toHaveCount(0, { timeout });
}

/**
 * Opens JupyterLab with a reset workspace, so it starts on the launcher whatever the last test
 * left open.
 */
export async function openLab(page: Page): Promise<void> {
  await page.goto(userPath('lab?reset'));
  await waitForLab(page);
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
export async function listImages(page: Page): Promise<IImageSummary[]> {
  const response = await page.request.get(userPath('cnbi/api/images'));
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
