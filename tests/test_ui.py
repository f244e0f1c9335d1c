"""Browser tests of the Image Builder panel: the Playwright suite in ui-tests/, run in Debian's
Chromium against a real JupyterHub (tests.uifixtures.ui_hub) with the cnbi service, PodmanSpawner
servers in containers on the lab image (our Lab panel and server extension), and four users.

The suite runs as one subprocess; this test asserts that every spec passed — the panel specs
(image-builder.spec.ts) and the five user flows of issue 8 (user-flows.spec.ts: edit as new,
cancel, share with a group, save my environment, home survives), each by its title, so a flow
that did not run fails here — and that each flow wrote its screenshots, light and dark theme,
into test-output/ui/.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.uifixtures import REPO, UI_BASE_IMAGE

UI_TESTS = REPO / "ui-tests"
OUTPUT = REPO / "test-output" / "ui"
CHROMIUM = os.environ.get("CNBI_UI_CHROMIUM", "/usr/bin/chromium")
PLAYWRIGHT = UI_TESTS / "node_modules" / "playwright" / "cli.js"

BUILD_SPEC = "a PackageList image builds to Ready with its log"
PANEL_SPECS = (
    "the launcher card opens the Image Builder panel",
    "a bad package line shows its message at that line",
    "a submitted image is listed at once, opens in the detail, and is deleted after confirming",
    "the panel in light and dark theme",
    BUILD_SPEC,
    "a private repository builds with a token stored from the form, and goes back to its first build",
)
# issue 8's user flows: spec title -> the screenshots it writes (each also as -dark unless noted)
FLOWS = {
    "edit as new: a typo fails in Resolving, the fixed copy builds to Ready":
        ("edit-as-new", "edit-as-new-failed"),
    "cancel: a slow build is cancelled while Building, Delete is a separate button":
        ("cancel", "rebuilds"),
    "share with a group: members see it under Shared with me, others do not, the admin sees all":
        ("share", "share-owner", "share-outsider", "share-admin"),
    "save my environment: pip install in a terminal, saved as an image that builds":
        ("save-environment", "save-environment-diff", "save-environment-terminal"),
    "home survives: a file of the default server is there in a server started on a built image":
        ("home-survives",),
    "a newer build: a server on the image says so, and restarts on it": ("newer-build",),
}
LIGHT_ONLY = ("edit-as-new-form", "save-environment-form")

SCREENSHOTS = (
    "panel-form-light.png",
    "panel-form-error-light.png",
    "panel-detail-light.png",
    "panel-detail-dark.png",
    "panel-form-error-dark.png",
    "panel-ready-light.png",
    "panel-ready-dark.png",
    "panel-stack-light.png",
    "panel-stack-form-light.png",
    "delete-stacked-light.png",
    "panel-stack-dark.png",
    "panel-token-light.png",
    "panel-token-dark.png",
    "panel-private-ready-light.png",
    "panel-private-ready-dark.png",
    "panel-generations-light.png",
    "panel-generations-dark.png",
    *(f"{shot}-{theme}.png" for shots in FLOWS.values() for shot in shots for theme in ("light", "dark")),
    *(f"{shot}-light.png" for shot in LIGHT_ONLY),
)

pytestmark = [pytest.mark.slow, pytest.mark.podman]


def builds_expected() -> bool:
    """Whether this checkout's cnbi service builds images (its embedded runner exists)."""
    return importlib.util.find_spec("cnbi_hub.controller.runner") is not None


def ensure_playwright() -> None:
    """The ui-tests/ node modules (@playwright/test only; never a downloaded browser)."""
    if PLAYWRIGHT.exists():
        return
    env = dict(os.environ, PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    subprocess.run(["jlpm", "install", "--immutable"], cwd=UI_TESTS, env=env, check=True)


def flatten(suite: dict):
    yield from suite.get("specs", [])
    for child in suite.get("suites", []):
        yield from flatten(child)


def test_image_builder_in_chromium(ui_hub, notebook_base_images, private_git_server):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `scripts/install-system-deps --browser` (Debian's chromium)")
    assert builds_expected(), "cnbi_hub.controller.runner is missing: the user flows need real builds"
    ensure_playwright()
    shutil.rmtree(OUTPUT, ignore_errors=True)
    OUTPUT.mkdir(parents=True)
    # the servers' image is the notebook base (built from Debian packages if podman lacks it) plus our panel
    assert UI_BASE_IMAGE in notebook_base_images.values()
    assert ui_hub.lab_image
    # a private repository (smart HTTP on 127.0.0.1 asking for a token) for the token flow
    private = private_git_server.make_repo("ui-private", {"requirements.txt": "six\n"})
    # a repository that moves on after each fetch: each build of it is a new build (the newer-build flow)
    moving = private_git_server.make_repo("ui-moving", {"requirements.txt": "six\n"})
    private_git_server.moving[moving.name] = moving
    env = dict(
        os.environ,
        **ui_hub.playwright_env(),
        CNBI_UI_PRIVATE_REPO=private.url,
        CNBI_UI_PRIVATE_TOKEN=private_git_server.token,
        CNBI_UI_MOVING_REPO=moving.url,
        CNBI_UI_OUTPUT=str(OUTPUT),
        CNBI_UI_CHROMIUM=CHROMIUM,
        PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD="1",
        CI="1",  # Playwright: no interactive report server, forbid test.only
    )
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(
        ["node", str(PLAYWRIGHT), "test"],
        cwd=UI_TESTS,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=45 * 60,
        check=False,
    )
    print(result.stdout)
    if result.returncode != 0:
        print("--- JupyterHub log (tail) ---\n" + ui_hub.log_tail(12000))
    assert result.returncode == 0, f"the Playwright suite failed (exit {result.returncode}); see the output above"

    report = json.loads((OUTPUT / "results.json").read_text())
    outcomes = {
        spec["title"]: [r["status"] for t in spec["tests"] for r in t["results"]] or ["skipped"]
        for suite in report["suites"]
        for spec in flatten(suite)
    }
    for title in (*PANEL_SPECS, *FLOWS):
        assert outcomes.get(title) == ["passed"], f"{title}: {outcomes.get(title, 'did not run')}"
    for title, statuses in outcomes.items():
        assert statuses == ["passed"], f"{title}: {statuses}"

    for name in SCREENSHOTS:
        path = OUTPUT / name
        assert path.exists(), f"screenshot {name} was not written"
        # a real PNG of a real panel, not an empty file
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 5000, f"{name} is suspiciously small"
