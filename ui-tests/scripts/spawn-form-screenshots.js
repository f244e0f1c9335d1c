// Screenshots of a hub's spawn form as a user sees it, light and dark (Debian's Chromium).
//   node ui-tests/scripts/spawn-form-screenshots.js HUB_URL USER PASSWORD OUTDIR
// tests/test_cluster_hub.py runs it when CNBI_SPAWN_SCREENSHOTS names a directory.
const { chromium } = require('@playwright/test');

(async () => {
  const [hubUrl, user, password, outdir] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.CNBI_UI_CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox']
  });
  try {
    for (const scheme of ['light', 'dark']) {
      const context = await browser.newContext({ colorScheme: scheme, viewport: { width: 1100, height: 900 } });
      const page = await context.newPage();
      await page.goto(`${hubUrl}hub/login`);
      await page.fill('#username_input', user);
      await page.fill('#password_input', password);
      await page.click('#login_submit');
      await page.waitForURL(/\/hub\//);
      await page.goto(`${hubUrl}hub/spawn/${user}`);
      await page.waitForSelector('input[name="profile"]');
      await page.screenshot({ path: `${outdir}/spawn-form-${scheme}.png`, fullPage: true });
      await context.close();
    }
  } finally {
    await browser.close();
  }
})().catch(error => {
  console.error(error);
  process.exit(1);
});
