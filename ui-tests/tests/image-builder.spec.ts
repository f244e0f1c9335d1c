/**
 * The Image Builder panel in a real JupyterLab, served by a real single-user server that a real
 * JupyterHub started in a container (PodmanSpawner, on the lab image: the notebook base plus our
 * panel), whose cnbi service stores and builds the images with podman.
 *
 * The first specs need no build: launcher card, the form's live package check, submitting (the
 * image is listed at once), the detail view, deleting with JupyterLab's confirm dialog and the
 * light/dark screenshots. The last one waits for a real podman build to reach Ready; it runs
 * when CNBI_UI_BUILDS=1 (tests/test_ui.py sets it). The user flows of issue 8 are in
 * user-flows.spec.ts.
 */
import { expect, test } from '@playwright/test';

import {
  DARK,
  LIGHT,
  deleteShownImage,
  fillGitForm,
  fillPackageForm,
  hubEnv,
  launcherCard,
  listImages,
  openImageBuilder,
  openLab,
  row,
  screenshot,
  screenshotBothThemes,
  setTheme,
  submit,
  uniqueName,
  userLab,
  userPath
} from './helpers';

// the base image the hub offers: the servers' own image (the notebook base plus our panel)
const BASE_IMAGE = hubEnv().baseImage;
const BUILD_TIMEOUT_MS = Number(process.env.CNBI_UI_BUILD_TIMEOUT_MS || 15 * 60_000);

test.beforeEach(async ({ page }) => {
  await openLab(page);
  await setTheme(page, LIGHT);
});

test('the launcher card opens the Image Builder panel', async ({ page }) => {
  const card = launcherCard(page);
  await expect(card).toBeVisible();
  const panel = await openImageBuilder(page);
  // the base images are the hub admin's, read from the service through the server extension
  const options = panel.getByTestId('cnbi-base-image').locator('option');
  await expect(options).toHaveCount(1);
  await expect(options.first()).toHaveAttribute('value', BASE_IMAGE);
  await expect(panel.getByTestId('cnbi-load-error')).toHaveCount(0);

  // a second launcher's card brings the same panel forward instead of opening another
  await page.locator('#jp-main-dock-panel .lm-TabBar-addButton').first().click();
  await expect(page.locator('.lm-TabBar-tab.lm-mod-current', { hasText: 'Launcher' })).toBeVisible();
  await launcherCard(page).last().click();
  await expect(page.locator('.lm-TabBar-tab.lm-mod-current', { hasText: 'Image Builder' })).toBeVisible();
  await expect(page.locator('#jp-main-dock-panel .lm-TabBar-tab', { hasText: 'Image Builder' })).toHaveCount(1);
  await expect(page.getByTestId('cnbi-panel')).toHaveCount(1);
});

test('a bad package line shows its message at that line', async ({ page }) => {
  const panel = await openImageBuilder(page);
  await fillPackageForm(panel, uniqueName('bad line'), 'six\nnumpy; rm -rf /\npandas', BASE_IMAGE);
  const error = panel.getByTestId('cnbi-package-error');
  await expect(error).toBeVisible();
  await expect(error).toHaveAttribute('data-line', '2');
  await expect(error).toContainText(/^Line 2: /);
  await expect(panel.getByTestId('cnbi-packages')).toHaveAttribute('aria-invalid', 'true');
  // the gutter marks line 2, and only line 2
  const gutter = panel.locator('.cnbi-package-gutter li');
  await expect(gutter).toHaveCount(3);
  await expect(gutter.nth(1)).toHaveClass(/cnbi-line-error/);
  await expect(panel.locator('.cnbi-package-gutter li.cnbi-line-error')).toHaveCount(1);
  await screenshot(panel, 'panel-form-error-light');

  // submitting anyway is refused by the service and stores nothing
  const before = await listImages(page);
  await panel.getByTestId('cnbi-submit').click();
  await expect(error).toHaveAttribute('data-line', '2');
  await expect(panel.getByTestId('cnbi-image-row')).toHaveCount(before.length);
  expect((await listImages(page)).length).toBe(before.length);

  // fixing the line clears the message
  await panel.getByTestId('cnbi-packages').fill('six\nnumpy\npandas');
  await expect(error).toHaveCount(0);
  await expect(panel.getByTestId('cnbi-packages')).toHaveAttribute('aria-invalid', 'false');
});

test('a submitted image is listed at once, opens in the detail, and is deleted after confirming', async ({
  page
}) => {
  const panel = await openImageBuilder(page);
  const displayName = uniqueName('six');
  await fillPackageForm(panel, displayName, 'six', BASE_IMAGE);
  await expect(panel.getByTestId('cnbi-package-error')).toHaveCount(0);
  const name = await submit(page, panel, displayName);

  const detail = panel.getByTestId('cnbi-detail');
  await expect(detail.locator('h3')).toHaveText(displayName);
  await expect(detail).toContainText(BASE_IMAGE);
  await expect(detail).toContainText('PackageList');
  const badge = row(panel, name).getByTestId('cnbi-phase-badge');
  await expect(badge).toHaveAttribute(
    'data-phase',
    /^(Pending|Prepare|Resolving|Building|Ready|Failed)$/
  );
  if ((await badge.getAttribute('data-phase')) !== 'Ready') {
    await expect(detail.getByTestId('cnbi-spawn')).toBeDisabled();
  }
  // the stream stays open: no "reconnecting…"
  await page.waitForTimeout(2_000);
  await expect(detail.getByTestId('cnbi-stream-state')).toHaveCount(0);
  expect((await listImages(page)).map(i => i.name)).toContain(name);

  // the detail stays after a reload: the list comes back from the service
  await page.reload();
  const reloaded = page.getByTestId('cnbi-panel');
  await expect(reloaded).toBeVisible({ timeout: 120_000 });
  await row(reloaded, name).click();
  await expect(reloaded.getByTestId('cnbi-detail')).toHaveAttribute('data-name', name);

  // cancelling the dialog keeps the image
  await reloaded.getByTestId('cnbi-delete').click();
  const dialog = page.locator('.jp-Dialog');
  await expect(dialog).toContainText('Delete image');
  await expect(dialog).toContainText(displayName);
  await dialog.locator('button', { hasText: /^Cancel$/ }).click();
  await expect(dialog).toHaveCount(0);
  await expect(row(reloaded, name)).toBeVisible();

  await deleteShownImage(page, reloaded, name);
  expect((await listImages(page)).map(i => i.name)).not.toContain(name);
});

test('the panel in light and dark theme', async ({ page }) => {
  const panel = await openImageBuilder(page);
  const displayName = uniqueName('themes');
  await fillPackageForm(panel, displayName, 'six', BASE_IMAGE);
  await screenshot(panel, 'panel-form-light');
  const lightBackground = await panel.evaluate(n => getComputedStyle(n).backgroundColor);

  const name = await submit(page, panel, displayName);
  await screenshot(panel, 'panel-detail-light');

  await setTheme(page, DARK);
  const darkBackground = await panel.evaluate(n => getComputedStyle(n).backgroundColor);
  expect(darkBackground).not.toBe(lightBackground);
  await screenshot(panel, 'panel-detail-dark');
  await panel.getByTestId('cnbi-new-image').click();
  await fillPackageForm(panel, uniqueName('dark'), 'six\nnumpy; rm -rf /', BASE_IMAGE);
  await expect(panel.getByTestId('cnbi-package-error')).toHaveAttribute('data-line', '2');
  await screenshot(panel, 'panel-form-error-dark');

  // leave the theme and the hub as they were
  await row(panel, name).click();
  await deleteShownImage(page, panel, name);
  await setTheme(page, LIGHT);
});

test('a PackageList image builds to Ready with its log', async ({ page }) => {
  test.skip(!hubEnv().builds, 'the cnbi service of this hub has no reconciler: images stay Pending');
  test.setTimeout(BUILD_TIMEOUT_MS + 180_000);
  const panel = await openImageBuilder(page);
  const displayName = uniqueName('six build');
  await fillPackageForm(panel, displayName, 'six', BASE_IMAGE);
  const name = await submit(page, panel, displayName);
  const detail = panel.getByTestId('cnbi-detail');
  const badge = detail.getByTestId('cnbi-phase-badge');

  // log lines arrive on the event stream while it builds
  const log = detail.getByTestId('cnbi-log');
  await expect(log).not.toBeEmpty({ timeout: BUILD_TIMEOUT_MS });
  await expect(badge).toHaveAttribute('data-phase', /^(Ready|Failed)$/, { timeout: BUILD_TIMEOUT_MS });
  const failure = await detail.getByTestId('cnbi-failure').textContent().catch(() => null);
  expect(await badge.getAttribute('data-phase'), `build failed: ${failure}`).toBe('Ready');
  await expect(row(panel, name).getByTestId('cnbi-phase-badge')).toHaveAttribute('data-phase', 'Ready');
  expect((await log.textContent())!.trim().split('\n').length).toBeGreaterThan(3);
  await expect(detail.getByTestId('cnbi-image-ref')).toHaveValue(/@sha256:[0-9a-f]{64}$/);
  await expect(detail.getByTestId('cnbi-spawn')).toBeEnabled();
  await expect(detail.getByTestId('cnbi-packages-table')).toContainText('six');
  await screenshot(panel, 'panel-ready-light');
  await setTheme(page, DARK);
  await screenshot(panel, 'panel-ready-dark');
  await setTheme(page, LIGHT);

  // an image on this one (a stack): offered under "Ready images you may use", built on its build
  await panel.getByTestId('cnbi-new-image').click();
  await expect(panel.getByTestId('cnbi-stack-bases').locator('option', { hasText: displayName })).toHaveCount(1);
  const stackedName = uniqueName('on six');
  await fillPackageForm(panel, stackedName, 'toolz', `cnbi:${name}`);
  await panel.getByTestId('cnbi-rebuild-schedule').selectOption('weekly');
  await screenshot(panel, 'panel-stack-form-light');
  const stacked = await submit(page, panel, stackedName);
  await expect(badge).toHaveAttribute('data-phase', /^(Ready|Failed)$/, { timeout: BUILD_TIMEOUT_MS });
  expect(await badge.getAttribute('data-phase'), 'the stacked build failed').toBe('Ready');
  await expect(detail).toContainText(`cnbi:${name}`);
  await expect(detail.getByTestId('cnbi-schedule')).toHaveText(/rebuilt weekly/);
  await expect(detail.getByTestId('cnbi-packages-table')).toContainText('toolz');
  await screenshot(panel, 'panel-stack-light');
  await setTheme(page, DARK);
  await screenshot(panel, 'panel-stack-dark');
  await setTheme(page, LIGHT);

  // deleting the image below names the images built on it (then: Cancel)
  await row(panel, name).click();
  await expect(detail).toHaveAttribute('data-name', name);
  await detail.getByTestId('cnbi-delete').click();
  const dialog = page.locator('.jp-Dialog');
  await expect(dialog).toContainText(`One image is built on it (“${stackedName}”)`);
  await screenshot(page, 'delete-stacked-light');
  await dialog.locator('button', { hasText: /^Cancel$/ }).click();
  await expect(dialog).toHaveCount(0);
  await row(panel, stacked).click();
  await deleteShownImage(page, panel, stacked);
  await row(panel, name).click();

  // a reload shows the same log again, fetched from api/images/{name}/logs
  const lines = (await log.textContent())!.trim().split('\n').length;
  await page.reload();
  const reloaded = page.getByTestId('cnbi-panel');
  await expect(reloaded).toBeVisible({ timeout: 120_000 });
  await row(reloaded, name).click();
  await expect
    .poll(async () => ((await reloaded.getByTestId('cnbi-log').textContent()) ?? '').trim().split('\n').length)
    .toBeGreaterThanOrEqual(lines);

  await deleteShownImage(page, reloaded, name);
  expect((await listImages(page)).map(i => i.name)).not.toContain(name);
});

test('a private repository builds with a token stored from the form, and goes back to its first build', async ({
  page,
  browser
}) => {
  const repository = process.env.CNBI_UI_PRIVATE_REPO;
  const token = process.env.CNBI_UI_PRIVATE_TOKEN;
  test.skip(!hubEnv().builds || !repository || !token, 'needs the private git server of tests/test_ui.py');
  test.setTimeout(BUILD_TIMEOUT_MS + 180_000);
  const host = new URL(repository!).host;
  const panel = await openImageBuilder(page);
  const displayName = uniqueName('private repo');
  const form = await fillGitForm(panel, displayName, repository!, BASE_IMAGE);
  const select = form.getByTestId('cnbi-git-credential-select');
  await select.selectOption({ label: `Add a token for ${host}…` });
  const box = form.getByTestId('cnbi-add-token');
  await expect(box.getByTestId('cnbi-token-host')).toHaveValue(host);
  await box.getByTestId('cnbi-token').fill(token!);
  await screenshotBothThemes(page, panel, 'panel-token');
  await box.getByTestId('cnbi-token-save').click();
  await expect(box).toHaveCount(0);
  const stored = host.replace(/[^a-z0-9]+/g, '-');
  await expect(select).toHaveValue(stored);
  expect(await page.content()).not.toContain(token!);

  const name = await submit(page, panel, displayName);
  const detail = panel.getByTestId('cnbi-detail');
  const badge = detail.getByTestId('cnbi-phase-badge');
  await expect(badge).toHaveAttribute('data-phase', /^(Ready|Failed)$/, { timeout: BUILD_TIMEOUT_MS });
  const failure = await detail.getByTestId('cnbi-failure').textContent().catch(() => null);
  expect(await badge.getAttribute('data-phase'), `build failed: ${failure}`).toBe('Ready');
  await expect(detail.getByTestId('cnbi-credential-name')).toHaveText(` · with the token ${stored}`);
  await expect(detail.getByTestId('cnbi-packages-table')).toContainText('six');
  await screenshotBothThemes(page, panel, 'panel-private-ready');

  // a rebuild keeps this build: the detail lists both, and the first is made current again
  await detail.getByTestId('cnbi-rebuild').click();
  await expect(detail.getByTestId('cnbi-run')).toHaveText(/Run 2/, { timeout: BUILD_TIMEOUT_MS });
  await expect(badge).toHaveAttribute('data-phase', 'Ready', { timeout: BUILD_TIMEOUT_MS });
  const builds = detail.getByTestId('cnbi-generations');
  await expect(builds.locator('li')).toHaveCount(2);
  await expect(builds.locator('li[data-run="2"]')).toContainText('current');
  await expect(builds.locator('li[data-run="2"]')).toContainText('same packages as run 1');
  await screenshotBothThemes(page, panel, 'panel-generations');
  await builds.locator('li[data-run="1"]').getByTestId('cnbi-make-current').click();
  await expect(builds.locator('li[data-run="3"]')).toContainText('current');
  await expect(badge).toHaveAttribute('data-phase', 'Ready');
  await expect(detail.getByTestId('cnbi-triggers')).toContainText('Run 1’s build made current again');

  // the hub's spawn form lists the kept build under the image (a new named server: nothing
  // starts until the form is sent)
  const env = hubEnv();
  const spawnPage = await page.context().newPage();
  try {
    await spawnPage.goto(`hub/spawn/${encodeURIComponent(env.user)}/pick-a-build`);
    const choice = spawnPage.locator('#cnbi-image-select');
    await expect(choice).toBeVisible({ timeout: 60_000 });
    const options = await choice.locator('option').allTextContents();
    const current = options.findIndex(o => o.endsWith(`(${name})`));
    expect(current, options.join(' | ')).toBeGreaterThanOrEqual(0);
    expect(options[current + 1]).toMatch(/ — earlier build, run 2 of .* UTC \(/);
    await choice.selectOption({ index: current + 1 });
    for (const scheme of ['light', 'dark'] as const) {
      await spawnPage.emulateMedia({ colorScheme: scheme });
      await screenshot(spawnPage, `spawn-form-kept-build-${scheme}`);
    }
  } finally {
    await spawnPage.close();
  }

  // an admin's retention pass (keep no earlier build) leaves run 2 alone: both runs built the
  // same commit into one image, which is the current build again (the pass lists it as shared);
  // the detail still offers it. (A removed build's row and "Build it again": components.spec.tsx,
  // and end to end in tests/test_generations.py and tests/test_cluster.py.)
  const { context, page: adminPage } = await userLab(browser, env.admin);
  try {
    const [code, report] = await adminPage.evaluate(
      async ([url, user]) => {
        const xsrf = decodeURIComponent((document.cookie.match(/(?:^|; )_xsrf=([^;]+)/) || ['', ''])[1]);
        const response = await fetch(url, {
          method: 'POST',
          headers: { 'Content-Type': 'application/json', 'X-XSRFToken': xsrf },
          body: JSON.stringify({ keepGenerations: 0, user })
        });
        return [response.status, await response.json()];
      },
      [`/${userPath('cnbi/api/retention', env.admin)}`, env.user]
    );
    expect(code, JSON.stringify(report)).toBe(200);
    const runs = (entries: { name: string; run: number }[]) => entries.map(r => [r.name, r.run]);
    expect(runs(report.shared)).toContainEqual([name, 2]);
    expect(runs(report.removed)).not.toContainEqual([name, 2]);
  } finally {
    await context.close();
  }
  await page.reload();
  const again = page.getByTestId('cnbi-panel');
  await expect(again).toBeVisible({ timeout: 120_000 });
  await row(again, name).click();
  const kept = again.getByTestId('cnbi-generations').locator('li[data-run="2"]');
  await expect(kept).toHaveAttribute('data-removed', 'false');
  await expect(kept.getByTestId('cnbi-start-build')).toHaveCount(1);

  // the API lists the credential by name and host only; the log says which one was used
  const listed = await page.request.get(userPath('cnbi/api/credentials'));
  expect(listed.status()).toBe(200);
  const text = await listed.text();
  expect(text).toContain(host);
  expect(text).not.toContain(token!);
  const log = await page.request.get(userPath(`cnbi/api/images/${name}/logs`));
  expect(await log.text()).toContain(`using the git credential ${stored}`);
  expect(await log.text()).not.toContain(token!);
  await deleteShownImage(page, again, name);
});
