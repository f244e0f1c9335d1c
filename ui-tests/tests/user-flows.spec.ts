/**
 * The user flows of issue 8, each in Chromium against the real hub of tests/uifixtures.py: real
 * podman builds, servers in containers (PodmanSpawner, home volume per user), several users.
 *
 * 1. Edit as new: a typo fails in Resolving; "Edit as new" opens the form filled with its spec;
 *    the fixed copy builds to Ready.
 * 2. Cancel: a slow build is cancelled while Building ("cancelled by <user>"); Delete is its own
 *    button.
 * 3. Share with a group: the owner shares the image of flow 1 with a JupyterHub group; a member
 *    sees it under "Shared with me", a non-member does not, the admin sees every user's images
 *    by owner.
 * 4. Save my environment: `pip install` in a JupyterLab terminal, "Save environment" lists the
 *    package as added, the form is prefilled, the image builds to Ready.
 * 5. Home survives: a file saved in the default server is there in the named server started on
 *    the image of flow 4, whose status bar names that image.
 *
 * Each flow writes `<flow>-light.png` and `<flow>-dark.png` (and a few more of its steps) into
 * test-output/ui/. The flows run in order: 3 shares the image of 1, 5 starts the image of 4.
 */
import { expect, Locator, Page, test } from '@playwright/test';

import {
  LIGHT,
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
  userPath,
  waitForFinish,
  waitForLab
} from './helpers';

const env = hubEnv();
const BASE_IMAGE = env.baseImage;
const BUILD_TIMEOUT_MS = Number(process.env.CNBI_UI_BUILD_TIMEOUT_MS || 10 * 60_000);
const SAVED_FILE = 'home-survives.txt';
const SAVED_TEXT = 'written in my default server';

test.describe.configure({ mode: 'serial' });

/** Images one flow hands to a later one (the flows run in order, in one worker). */
const handed: {
  fixed?: { name: string; displayName: string };
  saved?: { name: string; displayName: string };
} = {};

test.beforeEach(() => {
  test.skip(!env.builds, 'the cnbi service of this hub has no reconciler: nothing builds');
});

function detailOf(panel: Locator): Locator {
  return panel.getByTestId('cnbi-detail');
}

/** The step of the progress bar a failed build stopped at. */
function failedStep(detail: Locator): Locator {
  return detail.getByTestId('cnbi-progress').locator('.cnbi-progress-steps li.cnbi-step-failed');
}

/** From the (new) launcher of an open Lab: a launcher card by its label. */
async function openFromNewLauncher(page: Page, label: string): Promise<void> {
  await page.locator('#jp-main-dock-panel .lm-TabBar-addButton').first().click();
  await expect(page.locator('.lm-TabBar-tab.lm-mod-current', { hasText: 'Launcher' })).toBeVisible();
  await page.locator('.jp-LauncherCard', { hasText: label }).last().click();
}

test('edit as new: a typo fails in Resolving, the fixed copy builds to Ready', async ({ page }) => {
  test.setTimeout(2 * BUILD_TIMEOUT_MS + 120_000);
  await openLab(page);
  await setTheme(page, LIGHT);
  const panel = await openImageBuilder(page);
  const displayName = uniqueName('Data tools');
  await fillPackageForm(panel, displayName, 'pandsa', BASE_IMAGE);
  const failed = await submit(page, panel, displayName);
  const detail = detailOf(panel);

  // uv does not find the project: Failed in Resolving, uv's explanation on lines of its own
  await waitForFinish(panel, 'Failed', BUILD_TIMEOUT_MS);
  await expect(failedStep(detail)).toHaveText('Resolving');
  const failure = detail.getByTestId('cnbi-failure');
  await expect(failure).toContainText('pandsa');
  const lines = (await failure.innerText()).split('\n').filter(line => line.trim());
  expect(lines.length, `one line: ${lines}`).toBeGreaterThan(1);
  await expect(row(panel, failed).getByTestId('cnbi-phase-badge')).toHaveAttribute('data-phase', 'Failed');
  await screenshotBothThemes(page, panel, 'edit-as-new-failed');

  // Edit as new: the create form with the failed image's spec
  await detail.getByTestId('cnbi-edit-as-new').click();
  const form = panel.getByTestId('cnbi-create-form');
  await expect(form).toBeVisible();
  const copyName = `${displayName} (copy)`;
  await expect(form.getByTestId('cnbi-name')).toHaveValue(copyName);
  await expect(form.getByTestId('cnbi-tab-PackageList')).toHaveAttribute('aria-selected', 'true');
  await expect(form.getByTestId('cnbi-base-image')).toHaveValue(BASE_IMAGE);
  await expect(form.getByTestId('cnbi-packages')).toHaveValue('pandsa');
  await form.getByTestId('cnbi-packages').fill('pandas');
  await expect(form.getByTestId('cnbi-package-error')).toHaveCount(0);
  await screenshot(panel, 'edit-as-new-form-light');

  const fixed = await submit(page, panel, copyName);
  expect(fixed).not.toBe(failed);
  await waitForFinish(panel, 'Ready', BUILD_TIMEOUT_MS);
  await expect(detail.getByTestId('cnbi-packages-table')).toContainText('pandas');
  await expect(detail.getByTestId('cnbi-spawn')).toBeEnabled();
  // the failed original stays, as it was
  await expect(row(panel, failed).getByTestId('cnbi-phase-badge')).toHaveAttribute('data-phase', 'Failed');
  await screenshotBothThemes(page, panel, 'edit-as-new');
  handed.fixed = { name: fixed, displayName: copyName };
});

test('cancel: a slow build is cancelled while Building, Delete is a separate button', async ({ browser }) => {
  test.setTimeout(BUILD_TIMEOUT_MS + 300_000);
  // another user than the owner of the other images: the admin's view groups them by owner
  const { context, page } = await userLab(browser, env.member);
  try {
    const panel = await openImageBuilder(page);
    const displayName = uniqueName('SciPy');
    await fillPackageForm(panel, displayName, 'scipy', BASE_IMAGE);
    const name = await submit(page, panel, displayName);
    const detail = detailOf(panel);
    const badge = detail.getByTestId('cnbi-phase-badge');
    await expect(badge).toHaveAttribute('data-phase', /^(Building|Ready|Failed)$/, { timeout: BUILD_TIMEOUT_MS });
    expect(await badge.getAttribute('data-phase'), 'the build finished before it could be cancelled').toBe(
      'Building'
    );

    // Cancel and Delete: two buttons
    const cancel = detail.getByTestId('cnbi-cancel');
    const remove = detail.getByTestId('cnbi-delete');
    await expect(cancel).toHaveText('Cancel build');
    await expect(remove).toHaveText('Delete');
    await expect(cancel).toBeEnabled();
    await cancel.click();

    await expect(badge).toHaveAttribute('data-phase', 'Failed', { timeout: 60_000 });
    await expect(detail.getByTestId('cnbi-failure')).toContainText(`cancelled by ${env.member}`);
    await expect(failedStep(detail)).toHaveText('Building');
    await expect(cancel).toHaveCount(0);
    await expect(remove).toBeEnabled();
    await expect(detail.getByTestId('cnbi-rebuild')).toBeEnabled();
    await expect(row(panel, name).getByTestId('cnbi-phase-badge')).toHaveAttribute('data-phase', 'Failed');
    // cancelled is not deleted, and the build does not come back
    await page.waitForTimeout(3_000);
    const listed = (await listImages(page, env.member)).find(i => i.name === name);
    expect(listed?.phase).toBe('Failed');
    await expect(detail.getByTestId('cnbi-failure')).toContainText(`cancelled by ${env.member}`);
    await screenshotBothThemes(page, panel, 'cancel');

    // build it again: the panel says who asked under "Rebuilds"; that run is cancelled too
    await detail.getByTestId('cnbi-rebuild').click();
    await expect(badge).not.toHaveAttribute('data-phase', 'Failed', { timeout: 30_000 });
    await expect(detail.getByTestId('cnbi-triggers')).toContainText(`Rebuild asked by ${env.member}`);
    await expect(detail.getByTestId('cnbi-runs')).toContainText('Run 1 · Failed');
    // with warm build caches the rebuild may already be done: cancel it only while it runs
    const cancelAgain = detail.getByTestId('cnbi-cancel');
    if (await cancelAgain.isVisible()) {
      await cancelAgain.click().catch(() => undefined);
    }
    await expect(badge).toHaveAttribute('data-phase', /^(Failed|Ready)$/, { timeout: BUILD_TIMEOUT_MS });
    await screenshotBothThemes(page, panel, 'rebuilds');
  } finally {
    await context.close();
  }
});

test('share with a group: members see it under Shared with me, others do not, the admin sees all', async ({
  page,
  browser
}) => {
  test.setTimeout(600_000);
  const image = handed.fixed;
  expect(image, 'the edit-as-new flow built the image to share').toBeTruthy();
  const { name, displayName } = image!;

  // the owner shares the image with a group of theirs
  await openLab(page);
  await setTheme(page, LIGHT);
  const panel = await openImageBuilder(page);
  await row(panel, name).click();
  const detail = detailOf(panel);
  await expect(detail).toHaveAttribute('data-name', name);
  const share = detail.getByTestId('cnbi-share');
  await expect(share).toBeVisible();
  await expect(share.getByTestId('cnbi-share-hint')).toContainText(env.group);
  await share.getByTestId('cnbi-share-group-input').fill(env.group);
  await share.getByTestId('cnbi-share-group-add').click();
  await expect(share.locator(`[data-testid="cnbi-share-group"][data-group="${env.group}"]`)).toBeVisible();
  await expect(share.getByTestId('cnbi-share-error')).toHaveCount(0);
  await expect(share.getByTestId('cnbi-share-group-input')).toHaveValue('');
  await expect(panel.getByTestId('cnbi-section-mine').locator(`[data-name="${name}"]`)).toContainText(
    `shared with ${env.group}`
  );
  await screenshotBothThemes(page, panel, 'share-owner');

  // a member of the group sees it under "Shared with me"
  {
    const { context, page: memberPage } = await userLab(browser, env.member);
    try {
      const memberPanel = await openImageBuilder(memberPage);
      const sharedSection = memberPanel.getByTestId('cnbi-section-shared');
      const sharedRow = row(sharedSection, name);
      await expect(sharedRow).toBeVisible();
      await expect(sharedRow).toContainText(displayName);
      await expect(sharedRow).toContainText(`by ${env.user}`);
      await expect(sharedRow.getByTestId('cnbi-shared-with')).toContainText(env.group);
      await expect(row(memberPanel.getByTestId('cnbi-section-mine'), name)).toHaveCount(0);
      await sharedRow.click();
      const memberDetail = detailOf(memberPanel);
      await expect(memberDetail).toHaveAttribute('data-name', name);
      await expect(memberDetail.getByTestId('cnbi-share-summary')).toContainText(env.group);
      await expect(memberDetail.getByTestId('cnbi-spawn')).toBeEnabled();
      // a member uses it (start, copy), only its owner changes it
      await expect(memberDetail.getByTestId('cnbi-edit-as-new')).toBeVisible();
      await expect(memberDetail.getByTestId('cnbi-delete')).toHaveCount(0);
      await expect(memberDetail.getByTestId('cnbi-rebuild')).toHaveCount(0);
      await screenshotBothThemes(memberPage, memberPanel, 'share');
    } finally {
      await context.close();
    }
  }

  // someone in no group does not
  {
    const { context, page: outsiderPage } = await userLab(browser, env.outsider);
    try {
      const outsiderPanel = await openImageBuilder(outsiderPage);
      await expect(outsiderPanel.getByTestId('cnbi-section-mine')).toBeVisible();
      await expect(outsiderPanel.getByTestId('cnbi-section-shared')).toHaveCount(0);
      await expect(row(outsiderPanel, name)).toHaveCount(0);
      expect((await listImages(outsiderPage, env.outsider)).map(i => i.name)).not.toContain(name);
      await screenshotBothThemes(outsiderPage, outsiderPanel, 'share-outsider');
    } finally {
      await context.close();
    }
  }

  // the admin sees every user's images, grouped by owner
  {
    const { context, page: adminPage } = await userLab(browser, env.admin);
    try {
      const adminPanel = await openImageBuilder(adminPage);
      const all = adminPanel.getByTestId('cnbi-section-all');
      await expect(all).toBeVisible();
      const owners = all.getByTestId('cnbi-owner-group');
      await expect(owners.first()).toBeVisible();
      const ownerNames = await owners.evaluateAll(nodes => nodes.map(n => n.getAttribute('data-owner')));
      expect(ownerNames).toEqual([...ownerNames].sort());
      expect(ownerNames).toEqual(expect.arrayContaining([env.user, env.member]));
      const alices = all.locator(`[data-testid="cnbi-owner-group"][data-owner="${env.user}"]`);
      await expect(row(alices, name)).toBeVisible();
      await expect(row(alices, name)).toContainText(`shared with ${env.group}`);
      await expect(
        all.locator(`[data-testid="cnbi-owner-group"][data-owner="${env.member}"] [data-testid="cnbi-image-row"]`)
      ).not.toHaveCount(0);
      await expect(adminPanel.getByTestId('cnbi-section-shared')).toHaveCount(0);
      // the admin's detail of the owner's image: who it is shared with, and the admin's controls
      await row(alices, name).click();
      const adminDetail = detailOf(adminPanel);
      await expect(adminDetail).toHaveAttribute('data-name', name);
      await expect(adminDetail.getByTestId('cnbi-share-everyone')).not.toBeChecked();
      await expect(adminDetail.locator(`[data-testid="cnbi-share-group"][data-group="${env.group}"]`)).toBeVisible();
      await expect(adminDetail.getByTestId('cnbi-delete')).toBeVisible();
      await screenshotBothThemes(adminPage, adminPanel, 'share-admin');
    } finally {
      await context.close();
    }
  }
});

test('save my environment: pip install in a terminal, saved as an image that builds', async ({ page }) => {
  test.setTimeout(BUILD_TIMEOUT_MS + 300_000);
  await openLab(page);
  await setTheme(page, LIGHT);
  const panel = await openImageBuilder(page);

  // a JupyterLab terminal in this server: pip install
  await openFromNewLauncher(page, 'Terminal');
  // (its tab is "Terminal 1" until the shell sets its title, e.g. "jovyan@host: ~")
  const terminal = page.locator('.jp-Terminal');
  await expect(terminal).toBeVisible();
  // the shell is there once its prompt is (the terminal's text is drawn on a canvas: ask the
  // server whether its terminal session exists, then give the shell a moment)
  await expect
    .poll(async () => ((await (await page.request.get(userPath('api/terminals'))).json()) as unknown[]).length, {
      timeout: 60_000
    })
    .toBeGreaterThan(0);
  await page.waitForTimeout(1_500);
  await terminal.click();
  await page.keyboard.type('pip install tabulate==0.9.0\n', { delay: 20 });
  // done when the server's environment has it
  await expect
    .poll(
      async () => {
        const response = await page.request.get(userPath('cnbi/environment'));
        return response.ok() ? JSON.stringify((await response.json()).added) : `HTTP ${response.status()}`;
      },
      { timeout: 180_000, intervals: [2_000] }
    )
    .toContain('"tabulate"');
  await page.waitForTimeout(500);
  await screenshotBothThemes(page, page, 'save-environment-terminal');

  // the Image Builder: Save this environment as an image
  await page.locator('.lm-TabBar-tab', { hasText: 'Image Builder' }).click();
  await panel.getByTestId('cnbi-save-env').click();
  const view = panel.getByTestId('cnbi-env');
  await expect(view).toBeVisible();
  const diff = view.getByTestId('cnbi-env-diff');
  await expect(diff).toBeVisible({ timeout: 60_000 });
  const added = diff.getByTestId('cnbi-env-added');
  await expect(added).toContainText('tabulate');
  await expect(added).toContainText('0.9.0');
  await expect(diff.getByTestId('cnbi-env-removed')).toHaveCount(0);
  await expect(diff).toContainText(BASE_IMAGE);
  await screenshotBothThemes(page, panel, 'save-environment-diff');

  // confirm: the create form, a PackageList on this server's image with the pinned package
  await view.getByTestId('cnbi-env-confirm').click();
  const form = panel.getByTestId('cnbi-create-form');
  await expect(form).toBeVisible();
  await expect(form.getByTestId('cnbi-form-notice')).toContainText(BASE_IMAGE);
  await expect(form.getByTestId('cnbi-tab-PackageList')).toHaveAttribute('aria-selected', 'true');
  await expect(form.getByTestId('cnbi-base-image')).toHaveValue(BASE_IMAGE);
  await expect(form.getByTestId('cnbi-packages')).toHaveValue('tabulate==0.9.0');
  const displayName = uniqueName('My environment');
  await form.getByTestId('cnbi-name').fill(displayName);
  await expect(form.getByTestId('cnbi-package-error')).toHaveCount(0);
  await screenshot(panel, 'save-environment-form-light');

  const name = await submit(page, panel, displayName);
  await waitForFinish(panel, 'Ready', BUILD_TIMEOUT_MS);
  const detail = detailOf(panel);
  await expect(detail.getByTestId('cnbi-packages-table')).toContainText('tabulate');
  await expect(detail.getByTestId('cnbi-packages-table')).toContainText('0.9.0');
  await screenshotBothThemes(page, panel, 'save-environment');
  handed.saved = { name, displayName };
});

test('home survives: a file of the default server is there in a server started on a built image', async ({
  page
}) => {
  test.setTimeout(600_000);
  const image = handed.saved;
  expect(image, 'the save-environment flow built the image to start').toBeTruthy();
  const { name } = image!;

  // a text file from the launcher, saved, then renamed in the file browser. (Not renamed in the
  // dialog of its first save: JupyterLab then saves and renames at once, and the file browser's
  // listing that the save triggers can run during the rename: jupyter_server answers 404 for the
  // directory and Lab shows "Directory not found".)
  await openLab(page);
  await setTheme(page, LIGHT);
  await launcherCard(page).waitFor();
  await page.locator('.jp-LauncherCard', { hasText: 'Text File' }).first().click();
  const editor = page.locator('.jp-FileEditor .cm-content');
  await expect(editor).toBeVisible();
  await editor.click();
  await page.keyboard.type(SAVED_TEXT);
  await page.keyboard.press('Control+s');
  const dialog = page.locator('.jp-Dialog');
  await expect(dialog).toContainText('Rename file');
  await dialog.locator('button', { hasText: 'Rename and Save' }).click();
  await expect(dialog).toHaveCount(0);
  const untitled = page.locator('.jp-DirListing-item', { hasText: 'untitled.txt' });
  await untitled.click({ button: 'right' });
  await page.locator('.lm-Menu-item[data-command="filebrowser:rename"]').click();
  const nameInput = page.locator('.jp-DirListing-editor');
  await nameInput.fill(SAVED_FILE);
  await nameInput.press('Enter');
  await expect(page.locator('.jp-DirListing-item', { hasText: SAVED_FILE })).toBeVisible();
  await expect(page.locator('.lm-TabBar-tab.lm-mod-current', { hasText: SAVED_FILE })).toBeVisible();
  await expect(dialog).toHaveCount(0);
  const saved = await (await page.request.get(userPath(`api/contents/${SAVED_FILE}?content=1`))).json();
  expect(saved.content.trim()).toBe(SAVED_TEXT);

  // Start a server with this image: a new named server, in a new browser tab
  await openFromNewLauncher(page, 'Image Builder');
  const panel = page.getByTestId('cnbi-panel');
  await row(panel, name).click();
  const detail = detailOf(panel);
  await expect(detail).toHaveAttribute('data-name', name);
  const opened = page.context().waitForEvent('page');
  await detail.getByTestId('cnbi-spawn').click();
  const server = await opened;
  server.setDefaultNavigationTimeout(180_000);
  try {
    await waitForLab(server, 240_000);
    expect(new URL(server.url()).pathname).toContain(`/user/${env.user}/${name}/lab`);
    // it runs on the image, says so in the status bar, and has the file of the home volume
    const info = await (await server.request.get(userPath(`${name}/cnbi/server-info`))).json();
    expect(info.cnbiImage).toBe(name);
    expect(info.serverName).toBe(name);
    // nothing installed in it yet: compared with its image's manifest, there is nothing to save
    const environment = await (await server.request.get(userPath(`${name}/cnbi/environment`))).json();
    expect(environment.baseline).toBe('manifest');
    expect(environment.requirements, JSON.stringify(environment)).toEqual([]);
    await expect(server.getByTestId('cnbi-statusbar-image')).toHaveText(`Image: ${name}`);
    const file = server.locator('.jp-DirListing-item', { hasText: SAVED_FILE });
    await expect(file).toBeVisible();
    await file.dblclick();
    await expect(server.locator('.jp-FileEditor .cm-content')).toContainText(SAVED_TEXT);
    await setTheme(server, LIGHT);
    await screenshotBothThemes(server, server, 'home-survives');
  } finally {
    await server.close();
  }
});

test('a newer build: a server on the image says so, and restarts on it', async ({ page }) => {
  const repository = process.env.CNBI_UI_MOVING_REPO;
  const token = process.env.CNBI_UI_PRIVATE_TOKEN;
  test.skip(!repository || !token, 'needs the moving repository of tests/test_ui.py');
  test.setTimeout(2 * BUILD_TIMEOUT_MS + 600_000);
  const host = new URL(repository!).host;

  // an image of a repository that moves on after each build, with a stored token
  await openLab(page);
  await setTheme(page, LIGHT);
  const panel = await openImageBuilder(page);
  const displayName = uniqueName('moving repo');
  const form = await fillGitForm(panel, displayName, repository!, BASE_IMAGE);
  const select = form.getByTestId('cnbi-git-credential-select');
  const stored = host.replace(/[^a-z0-9]+/g, '-');
  if ((await select.locator(`option[value="${stored}"]`).count()) === 0) {
    await select.selectOption({ label: `Add a token for ${host}…` });
    await form.getByTestId('cnbi-token').fill(token!);
    await form.getByTestId('cnbi-token-save').click();
  } else {
    await select.selectOption(stored); // stored by an earlier flow: pick it
  }
  await expect(select).toHaveValue(stored);
  const name = await submit(page, panel, displayName);
  await waitForFinish(panel, 'Ready', BUILD_TIMEOUT_MS);
  const first = (await (await page.request.get(userPath(`cnbi/api/images/${name}`))).json()).status.image;

  // a server on run 1, in a new tab
  const opened = page.context().waitForEvent('page');
  await detailOf(panel).getByTestId('cnbi-spawn').click();
  const server = await opened;
  server.setDefaultNavigationTimeout(180_000);
  try {
    await waitForLab(server, 240_000);
    await setTheme(server, LIGHT);
    const info = await (await server.request.get(userPath(`${name}/cnbi/server-info`))).json();
    expect(info.jupyterImage).toBe(first);
    const serverPanel = await openImageBuilder(server);
    await expect(serverPanel.getByTestId('cnbi-newer-build')).toHaveCount(0);

    // rebuilt (from the first tab, as a push would): the new commit makes a new build
    await detailOf(panel).getByTestId('cnbi-rebuild').click();
    await expect(detailOf(panel).getByTestId('cnbi-run')).toHaveText(/Run 2/, { timeout: BUILD_TIMEOUT_MS });
    await waitForFinish(panel, 'Ready', BUILD_TIMEOUT_MS);
    const second = (await (await page.request.get(userPath(`cnbi/api/images/${name}`))).json()).status.image;
    expect(second).not.toBe(first);

    // the server's own panel says so at once, and restarts the server on it
    const notice = serverPanel.getByTestId('cnbi-newer-build');
    await expect(notice).toContainText(`A newer build of ${displayName} is ready (run 2)`, { timeout: 30_000 });
    await screenshotBothThemes(server, serverPanel, 'newer-build');
    await notice.getByTestId('cnbi-restart-on-newer').click();
    const dialog = server.locator('.jp-Dialog');
    await expect(dialog).toContainText('Restart this server on run 2');
    await dialog.locator('button', { hasText: /^Restart$/ }).click();
    // the service's page waits while the hub stops it, the hub's while it starts, then Lab
    await server.waitForURL(/\/(hub|services\/cnbi)\//, { timeout: 60_000 });
    await waitForLab(server, 300_000);
    const restarted = await (await server.request.get(userPath(`${name}/cnbi/server-info`))).json();
    expect(restarted.jupyterImage).toBe(second);
    expect(restarted.cnbiImage).toBe(name);
    const again = await openImageBuilder(server);
    await expect(again.getByTestId('cnbi-image-row').first()).toBeVisible();
    await expect(again.getByTestId('cnbi-newer-build')).toHaveCount(0);
  } finally {
    await server.close();
  }
});
