"""The reconciler on its own (no hub): pushing Ready images to a registry, and the build log."""

import asyncio
import json

import pytest

from cnbi_hub import model
from cnbi_hub.controller.buildlog import BuildLog
from cnbi_hub.controller.reconciler import Reconciler
from cnbi_hub.store.sqlite import SQLImageStore
from tests.hubfixtures import CA_BUNDLE

pytestmark = pytest.mark.podman


async def test_ready_image_is_pushed_with_its_digest(tmp_path, local_registry, notebook_base_images, podman_env):
    store = SQLImageStore(f"sqlite:///{tmp_path}/cnbi.sqlite")
    events = []
    reconciler = Reconciler(
        store=store, publish=events.append, work_dir=str(tmp_path / "builds"), ca_bundle=CA_BUNDLE,
        push_registry=f"{local_registry.host}/pushed",
    )
    await reconciler.start()
    try:
        obj = model.validate_new_object(
            {"metadata": {"name": "pushed-image"},
             "spec": {"buildType": "PackageList", "baseImage": notebook_base_images["user"],
                      "packageVersions": ["tabulate==0.9.0"]}},
            creator="pusher",
        )
        await store.create(obj)
        for _ in range(600):
            current = await store.get("pushed-image")
            if model.phase_of(current) in model.TERMINAL_PHASES:
                break
            await asyncio.sleep(0.5)
    finally:
        await reconciler.stop()
    status = current["status"]
    assert status["phase"] == "Ready", json.dumps(status.get("conditions"), indent=1)
    repository, digest = status["image"].split("@")
    assert repository == f"{local_registry.host}/pushed/pushed-image"
    result = local_registry.skopeo_inspect(f"pushed/pushed-image:{status['specHash'].split(':')[1][:12]}")
    assert result["Digest"] == digest
    log_lines = [e[1]["line"] for e in events if e[0] == "log"]
    assert any("pushing" in line for line in log_lines)
    assert any(line.startswith("==> Building -> Ready") for line in log_lines)


def test_build_log_keeps_head_and_tail():
    log = BuildLog(head=3, tail=4)
    for i in range(20):
        log.append(f"line {i}")
    assert log.dropped == 13
    assert log.text().splitlines() == ["line 0", "line 1", "line 2", "[... 13 lines not kept ...]",
                                       "line 16", "line 17", "line 18", "line 19"]
    assert BuildLog(initial_text="a\nb\n").text() == "a\nb\n"
