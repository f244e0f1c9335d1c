"""Embedded builds end to end: the service's reconciler with real podman, registry, git and uv.

Every image here goes through the hub's proxy to the cnbi service process, which prepares,
resolves, builds and validates it with podman on this machine.
"""

import asyncio
import json
import os
import signal
import time

import pytest

from cnbi_hub import model
from tests.hubfixtures import ADMIN
from tests.infra_podman import SAMPLE_CONTAINERFILE_MARKER, podman

pytestmark = pytest.mark.podman

USER_BASE = "localhost/cnbi/notebook-base:py311-user"
ROOT_BASE = "localhost/cnbi/notebook-base:py311-root"


@pytest.fixture
def builder_token(hub, notebook_base_images, request):
    """A fresh user per test, so the per-user image limit never couples tests."""
    user = "b-" + request.node.name.removeprefix("test_").replace("_", "-")[:40]
    return hub.token(user)


@pytest.fixture(scope="module")
def admin_token(hub):
    return hub.token(ADMIN)


@pytest.fixture(scope="module")
def registry_with_base(local_registry, notebook_base_images, podman_env):
    """The local docker-registry holding the notebook base and the bare Debian image."""
    pushed = {}
    for variant, target in (("user", "cnbi/notebook-base:py311-user"), ("debian", "cnbi/debian:bookworm")):
        destination = f"{local_registry.host}/{target}"
        result = podman("push", "--quiet", "--tls-verify=false", notebook_base_images[variant],
                        f"docker://{destination}", env=podman_env)
        assert result.returncode == 0, result.stderr
        pushed[variant] = destination
    return pushed


async def create(hub, token, spec, display=None):
    body = {"spec": spec}
    if display:
        body["metadata"] = {"annotations": {model.ANNOTATION_DISPLAY_NAME: display}}
    r = await hub.api("POST", "api/images", token, body)
    assert r.code == 201, r.body
    return r.json()["metadata"]["name"]


async def wait_for(hub, token, name, phases=model.TERMINAL_PHASES, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = await hub.api("GET", f"api/images/{name}", token)
        assert r.code == 200, r.body
        obj = r.json()
        if model.phase_of(obj) in phases:
            return obj
        await asyncio.sleep(0.5)
    pytest.fail(f"{name} did not reach {phases} in {timeout}s; last: {obj.get('status')}")


def explain(obj):
    status = obj.get("status", {})
    return json.dumps({"phase": status.get("phase"), "conditions": status.get("conditions")}, indent=1)


def condition(obj, kind):
    return next((c for c in obj["status"].get("conditions", []) if c["type"] == kind), None)


def run_in(image, *argv, podman_env):
    return podman("run", "--rm", "--network=host", image, *argv, env=podman_env)


async def test_package_list_reaches_ready_with_manifest_lock_and_logs(hub, builder_token, podman_env):
    name = await create(hub, builder_token, {"buildType": "PackageList", "baseImage": USER_BASE,
                                             "packageVersions": ["tabulate==0.9.0", "toolz"]}, display="tabulate and toolz")
    obj = await wait_for(hub, builder_token, name)
    assert model.phase_of(obj) == "Ready", explain(obj)
    status = obj["status"]
    assert status["image"].startswith(f"localhost/cnbi/{name}@sha256:")
    assert status["resolvedBaseImage"].startswith("localhost/cnbi/notebook-base@sha256:")
    assert list(status["phaseTimes"]) == ["Pending", "Prepare", "Resolving", "Building", "Ready"]
    assert condition(obj, "Validated")["status"] == "True"
    visible = {p["name"].lower(): p for p in status["packages"] if p["visible"]}
    assert visible["tabulate"]["version"] == "0.9.0" and "toolz" in visible
    assert any(p["name"].lower() == "jupyterlab" and not p["visible"] for p in status["packages"])

    result = run_in(status["image"], "python", "-c", "import tabulate, toolz; print(tabulate.__version__)", podman_env=podman_env)
    assert result.returncode == 0 and result.stdout.strip() == "0.9.0", result.stderr
    # JupyterLab's terminal is a login shell: there too `python` is the image's, with its packages
    result = run_in(status["image"], "bash", "-lc", "python -c 'import tabulate; print(tabulate.__version__)'",
                    podman_env=podman_env)
    assert result.returncode == 0 and result.stdout.strip() == "0.9.0", result.stderr
    assert "check login-shell: ok" in (await hub.api("GET", f"api/images/{name}/logs", builder_token)).body.decode()
    size = int(podman("image", "inspect", "--format", "{{.Size}}", status["image"], env=podman_env).stdout)
    assert status["imageSize"] == size > 100_000_000
    # packages went in as the image's own user (user-owned environment), and it still is
    result = run_in(status["image"], "sh", "-c", "id -un; stat -c %U /opt/venv/lib/python3.11/site-packages/tabulate/__init__.py",
                    podman_env=podman_env)
    assert result.stdout.split() == ["jovyan", "jovyan"], result.stdout
    labels = json.loads(podman("image", "inspect", "--format", "{{json .Labels}}", status["image"],
                               env=podman_env).stdout)
    assert labels["io.cnbi-hub.image"] == name and labels["io.cnbi-hub.owner"].startswith("b-package-list")

    lock = await hub.api("GET", f"api/images/{name}/lock", builder_token)
    assert lock.code == 200 and "tabulate==0.9.0" in lock.body.decode() and "--hash=sha256:" in lock.body.decode()
    logs = (await hub.api("GET", f"api/images/{name}/logs", builder_token)).body.decode()
    assert "==> Building -> Ready" in logs and "check imports: ok" in logs


async def test_root_owned_environment_installs_as_root(hub, builder_token, podman_env):
    name = await create(hub, builder_token, {"buildType": "PackageList", "baseImage": ROOT_BASE,
                                             "packageVersions": ["tabulate==0.9.0"]})
    obj = await wait_for(hub, builder_token, name)
    assert model.phase_of(obj) == "Ready", explain(obj)
    result = run_in(obj["status"]["image"], "sh", "-c",
                    "id -un; stat -c %U /opt/venv/lib/python3.11/site-packages/tabulate/__init__.py; python -c 'import tabulate'",
                    podman_env=podman_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["jovyan", "root"]  # server runs as jovyan, packages owned by root


async def test_identical_request_is_reused_without_building(hub, builder_token):
    spec = {"buildType": "PackageList", "baseImage": USER_BASE, "packageVersions": ["tabulate==0.9.0"]}
    first = await wait_for(hub, builder_token, await create(hub, builder_token, spec))
    assert model.phase_of(first) == "Ready", explain(first)
    started = time.monotonic()
    second_name = await create(hub, builder_token, spec)
    second = await wait_for(hub, builder_token, second_name)
    elapsed = time.monotonic() - started
    assert model.phase_of(second) == "Ready", explain(second)
    assert second["status"]["image"] == first["status"]["image"]
    assert second["status"]["reusedFrom"]
    assert "Building" not in second["status"]["phaseTimes"]
    print(f"identical request reached Ready in {elapsed:.2f}s")


async def test_identical_requests_at_the_same_time_build_once(hub, builder_token):
    spec = {"buildType": "PackageList", "baseImage": USER_BASE, "packageVersions": ["tabulate==0.8.10"]}
    names = await asyncio.gather(create(hub, builder_token, spec), create(hub, builder_token, spec))
    done = [await wait_for(hub, builder_token, name) for name in names]
    assert [model.phase_of(o) for o in done] == ["Ready", "Ready"], [explain(o) for o in done]
    builders = [o for o in done if "reusedFrom" not in o["status"]]
    waiters = [o for o in done if "reusedFrom" in o["status"]]
    assert len(builders) == 1 and len(waiters) == 1, [o["status"].get("reusedFrom") for o in done]
    assert waiters[0]["status"]["reusedFrom"] == model.name_of(builders[0])
    assert waiters[0]["status"]["image"] == builders[0]["status"]["image"]
    assert "Building" not in waiters[0]["status"]["phaseTimes"]
    log = (await hub.api("GET", f"api/images/{model.name_of(waiters[0])}/logs", builder_token)).body.decode()
    assert f"{model.name_of(builders[0])} is building the same image now: waiting for it" in log
    for name in names:
        await hub.api("DELETE", f"api/images/{name}", builder_token)


async def test_adding_a_package_builds_on_the_previous_generation(hub, builder_token, podman_env):
    first = await create(hub, builder_token, {"buildType": "PackageList", "baseImage": USER_BASE,
                                              "packageVersions": ["text-unidecode==1.3"]})
    first_obj = await wait_for(hub, builder_token, first)
    assert model.phase_of(first_obj) == "Ready", explain(first_obj)
    second = await create(hub, builder_token, {"buildType": "PackageList", "baseImage": USER_BASE,
                                               "packageVersions": ["text-unidecode==1.3", "toolz==0.12.1"]})
    obj = await wait_for(hub, builder_token, second)
    assert model.phase_of(obj) == "Ready", explain(obj)
    assert obj["status"]["layeredOn"] == {"name": first, "image": first_obj["status"]["image"]}
    logs = (await hub.api("GET", f"api/images/{second}/logs", builder_token)).body.decode()
    assert "1 packages to add" in logs
    result = run_in(obj["status"]["image"], "python", "-c", "import text_unidecode, toolz", podman_env=podman_env)
    assert result.returncode == 0, result.stderr
    # the same packages as a full build: the manifest lists both as requested
    visible = {p["name"].lower() for p in obj["status"]["packages"] if p["visible"]}
    assert visible == {"text-unidecode", "toolz"}


async def test_rebuild_keeps_each_run_and_names_the_build_really_reused(hub, builder_token):
    """A is built; B, identical, reuses A's build; A is rebuilt and finds B's image — which is
    its own earlier build, so it names nobody. Each run keeps its times; the log separates runs."""
    spec = {"buildType": "PackageList", "baseImage": USER_BASE, "packageVersions": ["tabulate==0.8.9"]}
    a = await create(hub, builder_token, spec, display="A")
    first = await wait_for(hub, builder_token, a)
    assert model.phase_of(first) == "Ready", explain(first)
    assert "reusedFrom" not in first["status"] and first["status"].get("run", 1) == 1
    b = await create(hub, builder_token, spec, display="B")
    b_obj = await wait_for(hub, builder_token, b)
    assert b_obj["status"]["reusedFrom"] == a

    r = await hub.api("POST", f"api/images/{a}/rebuild", builder_token)
    assert r.code == 200
    assert r.json()["status"]["run"] == 2
    assert [run["run"] for run in r.json()["status"]["runs"]] == [1]
    again = await wait_for(hub, builder_token, a)
    assert model.phase_of(again) == "Ready", explain(again)
    status = again["status"]
    assert "reusedFrom" not in status  # B's image is A's own earlier build: nobody else's
    assert status["image"] == first["status"]["image"]
    earlier = status["runs"][0]
    assert earlier["startTime"] == first["status"]["startTime"]
    assert earlier["completionTime"] == first["status"]["completionTime"]
    assert earlier["phase"] == "Ready" and status["startTime"] >= earlier["completionTime"]
    logs = (await hub.api("GET", f"api/images/{a}/logs", builder_token)).body.decode().splitlines()
    separators = [i for i, line in enumerate(logs) if line.startswith("=== Run 2 · rebuild requested by ")]
    assert len(separators) == 1
    before, after = logs[:separators[0]], logs[separators[0] + 1:]
    assert any("==> Building -> Ready" in line for line in before)  # run 1's log is kept above
    assert any("==> Resolving -> Ready (Reused)" in line for line in after)
    # B still names A, which really built the image
    assert (await hub.api("GET", f"api/images/{b}", builder_token)).json()["status"]["reusedFrom"] == a


async def test_cancel_during_building_stops_the_build_and_keeps_the_image_record(hub, builder_token, podman_env):
    name = await create(hub, builder_token, {"buildType": "PackageList", "baseImage": USER_BASE,
                                             "packageVersions": ["scipy", "tabulate==0.8.7"]})
    await building(hub, builder_token, name)
    await asyncio.sleep(1.0)
    r = await hub.api("POST", f"api/images/{name}/cancel", builder_token, {})
    assert r.code == 200, r.body
    await assert_build_stopped(name, podman_env)
    obj = (await hub.api("GET", f"api/images/{name}", builder_token)).json()  # cancel is not delete
    assert model.phase_of(obj) == "Failed" and obj["status"]["failedPhase"] == "Building"
    assert any(c["reason"] == "Cancelled" and c["message"].startswith("cancelled by b-")
               for c in obj["status"]["conditions"])
    # a cancelled image can be built again
    r = await hub.api("POST", f"api/images/{name}/rebuild", builder_token)
    assert r.code == 200 and r.json()["status"]["runs"][-1]["reason"] == "Cancelled"
    await hub.api("POST", f"api/images/{name}/cancel", builder_token, {})


async def test_rebuild_runs_a_finished_image_again(hub, builder_token):
    # a set no other test builds, so this one cannot finish at once by reuse
    name = await create(hub, builder_token, {"buildType": "PackageList", "baseImage": USER_BASE,
                                             "packageVersions": ["tabulate==0.8.10"]})
    r = await hub.api("POST", f"api/images/{name}/rebuild", builder_token)
    assert r.code == 409 and "wait" in r.json()["message"]  # not finished yet
    first = await wait_for(hub, builder_token, name)
    assert model.phase_of(first) == "Ready", explain(first)
    r = await hub.api("POST", f"api/images/{name}/rebuild", builder_token)
    assert r.code == 200 and model.phase_of(r.json()) == "Pending"
    assert r.json()["status"]["rebuildOf"] == first["status"]["image"]
    again = await wait_for(hub, builder_token, name)
    assert model.phase_of(again) == "Ready", explain(again)
    assert again["status"]["completionTime"] >= first["status"]["completionTime"]
    assert (await hub.api("POST", f"api/images/{name}/rebuild", hub.token("someone-else"))).code == 404


async def test_unresolvable_fails_in_resolving_with_uvs_message(hub, builder_token):
    name = await create(hub, builder_token, {"buildType": "PackageList", "baseImage": USER_BASE,
                                             "packageVersions": ["tabulate==999"]})
    obj = await wait_for(hub, builder_token, name)
    assert model.phase_of(obj) == "Failed"
    assert obj["status"]["failedPhase"] == "Resolving"
    error = condition(obj, "ErrorResolvingDependencies")
    assert error["status"] == "True"
    assert "tabulate==999" in error["message"] and "no version" in error["message"].lower()
    assert "Building" not in obj["status"]["phaseTimes"]


async def test_conflict_with_the_base_image_fails_in_resolving(hub, builder_token):
    name = await create(hub, builder_token, {"buildType": "PackageList", "baseImage": USER_BASE,
                                             "packageVersions": ["jupyterlab<4"]})
    obj = await wait_for(hub, builder_token, name)
    assert model.phase_of(obj) == "Failed" and obj["status"]["failedPhase"] == "Resolving"
    assert "jupyterlab" in condition(obj, "ErrorResolvingDependencies")["message"]


async def test_package_that_fails_to_import_fails_in_building_with_the_check_output(hub, builder_token):
    # python-magic installs fine but its import needs libmagic, which the base image lacks
    name = await create(hub, builder_token, {"buildType": "PackageList", "baseImage": USER_BASE,
                                             "packageVersions": ["python-magic"]})
    obj = await wait_for(hub, builder_token, name)
    assert model.phase_of(obj) == "Failed" and obj["status"]["failedPhase"] == "Building"
    error = condition(obj, "ErrorBuildingImage")
    assert error["reason"] == "ValidationFailed"
    assert "imports" in error["message"] and "magic" in error["message"]


async def test_import_from_local_registry_reaches_ready(hub, builder_token, registry_with_base):
    name = await create(hub, builder_token, {"buildType": "ImageImport", "fromImage": registry_with_base["user"]})
    obj = await wait_for(hub, builder_token, name)
    assert model.phase_of(obj) == "Ready", explain(obj)
    assert obj["status"]["image"].startswith(registry_with_base["user"].rsplit(":", 1)[0] + "@sha256:")
    assert "Resolving" not in obj["status"]["phaseTimes"]
    assert condition(obj, "ImageImportReady")["status"] == "True"
    assert any(p["name"].lower() == "jupyterhub" for p in obj["status"]["packages"])
    # the same import again: nothing to validate twice
    again = await wait_for(hub, builder_token, await create(
        hub, builder_token, {"buildType": "ImageImport", "fromImage": registry_with_base["user"]}))
    assert model.phase_of(again) == "Ready", explain(again)
    assert again["status"]["image"] == obj["status"]["image"] and again["status"]["reusedFrom"] == name
    assert "Building" not in again["status"]["phaseTimes"] and again["status"]["packages"] == obj["status"]["packages"]
    await hub.api("DELETE", f"api/images/{model.name_of(again)}", builder_token)


async def test_import_without_jupyterhub_fails_naming_singleuser(hub, builder_token, registry_with_base):
    name = await create(hub, builder_token, {"buildType": "ImageImport", "fromImage": registry_with_base["debian"]})
    obj = await wait_for(hub, builder_token, name)
    assert model.phase_of(obj) == "Failed", explain(obj)
    assert obj["status"]["failedPhase"] == "Building", explain(obj)
    assert "jupyterhub-singleuser" in condition(obj, "ErrorBuildingImage")["message"], explain(obj)
    assert condition(obj, "ImageImportReady")["status"] == "False"


async def test_missing_image_fails_in_prepare_quickly(hub, builder_token, local_registry):
    name = await create(hub, builder_token, {"buildType": "ImageImport",
                                             "fromImage": f"{local_registry.host}/no/such-image:1"})
    started = time.monotonic()
    obj = await wait_for(hub, builder_token, name, timeout=60)
    assert model.phase_of(obj) == "Failed" and obj["status"]["failedPhase"] == "Prepare"
    failure = condition(obj, "ImageImportReady")
    assert failure["reason"] == "ImageNotFound" and "no/such-image" in failure["message"]
    print(f"missing image Failed after {time.monotonic() - started:.2f}s")


async def test_git_repository_builds(hub, builder_token, sample_git_repos, podman_env):
    requirements = await create(hub, builder_token, {
        "buildType": "GitRepository", "repository": sample_git_repos["requirements"].url,
        "baseImage": USER_BASE})
    containerfile = await create(hub, builder_token, {
        "buildType": "GitRepository", "repository": sample_git_repos["containerfile"].url, "gitRef": "main"})
    obj = await wait_for(hub, builder_token, requirements)
    assert model.phase_of(obj) == "Ready", explain(obj)
    assert obj["status"]["gitCommit"] == sample_git_repos["requirements"].commit
    assert run_in(obj["status"]["image"], "python", "-c", "import tabulate", podman_env=podman_env).returncode == 0
    labels = json.loads(podman("image", "inspect", "--format", "{{json .Labels}}", obj["status"]["image"],
                               env=podman_env).stdout)
    assert labels["io.cnbi-hub.git-commit"] == sample_git_repos["requirements"].commit

    obj = await wait_for(hub, builder_token, containerfile)
    assert model.phase_of(obj) == "Ready", explain(obj)
    result = run_in(obj["status"]["image"], "cat", SAMPLE_CONTAINERFILE_MARKER, podman_env=podman_env)
    assert result.stdout.strip() == "hello from a git repository"


async def test_git_repository_with_apt_txt_and_postbuild(hub, builder_token, make_git_repo, podman_env):
    # repo2docker's conventions: apt.txt installs libmagic, which python-magic needs to import
    # (without it the import check fails, see above); postBuild runs as the image's user
    repo = make_git_repo("apt-and-postbuild", {
        "requirements.txt": "python-magic==0.4.27\n",
        "apt.txt": "# the C library\nlibmagic1\n",
        "postBuild": "#!/bin/sh\nset -e\necho \"postBuild ran as $(id -un)\" > \"$HOME/postbuild.txt\"\n",
    })
    name = await create(hub, builder_token, {"buildType": "GitRepository", "repository": repo.url,
                                             "baseImage": USER_BASE})
    obj = await wait_for(hub, builder_token, name)
    assert model.phase_of(obj) == "Ready", explain(obj)
    assert obj["status"]["recipe"] == "requirements"
    assert obj["status"]["recipeExtras"] == ["apt", "postbuild"]
    result = run_in(obj["status"]["image"], "sh", "-c",
                    "python -c 'import magic; print(magic.from_buffer(b\"%PDF-1.4\"))'; cat $HOME/postbuild.txt",
                    podman_env=podman_env)
    assert result.returncode == 0, result.stderr
    assert "PDF document" in result.stdout and "postBuild ran as jovyan" in result.stdout


async def test_missing_git_ref_fails_in_prepare(hub, builder_token, sample_git_repos):
    name = await create(hub, builder_token, {
        "buildType": "GitRepository", "repository": sample_git_repos["requirements"].url,
        "gitRef": "no-such-branch", "baseImage": USER_BASE})
    obj = await wait_for(hub, builder_token, name, timeout=60)
    assert model.phase_of(obj) == "Failed" and obj["status"]["failedPhase"] == "Prepare"
    assert condition(obj, "Prepared")["reason"] == "GitRefNotFound"
    assert "no-such-branch" in condition(obj, "Prepared")["message"]


async def test_check_image(hub, builder_token, registry_with_base, local_registry):
    r = await hub.api("GET", f"api/check-image?image={registry_with_base['user']}", builder_token)
    assert r.code == 200 and r.json()["exists"] is True and r.json()["result"] == "found"
    assert r.json()["digest"].startswith("sha256:") and "linux/amd64" in r.json()["platforms"]
    r = await hub.api("GET", f"api/check-image?image={local_registry.host}/nothing/here:1", builder_token)
    assert r.code == 200
    assert {k: r.json()[k] for k in ("result", "exists", "digest", "platforms")} == {
        "result": "notFound", "exists": False, "digest": None, "platforms": []}
    assert "was not found" in r.json()["message"]
    r = await hub.api("GET", f"api/check-image?image={USER_BASE}", builder_token)  # this machine's storage
    assert r.json()["exists"] is True and r.json()["platforms"] == ["linux/amd64"] and r.json()["result"] == "found"
    r = await hub.api("GET", "api/check-image?image=localhost/cnbi/not-here:1", builder_token)
    assert r.json()["result"] == "notFound" and r.json()["exists"] is False
    r = await hub.api("GET", "api/check-image?image=Not%20An%20Image", builder_token)
    assert r.code == 422 and r.json()["field"] == "image"


async def assert_build_stopped(name, podman_env, timeout=60):
    """No build container of `name` is left running, and its half-made image is gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing = podman("ps", "-a", "--external", "--format", "{{.Names}} {{.Image}}", env=podman_env).stdout
        builds = [line for line in listing.splitlines() if "buildah" in line or name in line]
        if not builds:
            break
        await asyncio.sleep(1)
    assert not builds, builds
    images = podman("images", "--format", "{{.Repository}}", env=podman_env).stdout.split()
    assert f"localhost/cnbi/{name}" not in images


async def building(hub, token, name, timeout=300):
    """Wait until the image is in Building with podman actually running its build."""
    obj = await wait_for(hub, token, name, phases={"Building", "Ready", "Failed"}, timeout=timeout)
    assert model.phase_of(obj) == "Building", explain(obj)
    return obj


async def test_delete_during_building_stops_the_build(hub, builder_token, podman_env):
    # a package that takes a while to install keeps the build busy long enough to cancel it
    name = await create(hub, builder_token, {"buildType": "PackageList", "baseImage": USER_BASE,
                                             "packageVersions": ["scipy"]})
    await building(hub, builder_token, name)
    await asyncio.sleep(1.0)
    assert (await hub.api("DELETE", f"api/images/{name}", builder_token)).code == 204
    await assert_build_stopped(name, podman_env)
    assert not (hub.data_dir / "builds").exists() or not any(
        (hub.data_dir / "builds").iterdir()), list((hub.data_dir / "builds").iterdir())


async def test_queue_positions_and_metrics(hub, admin_token):
    tokens = [hub.token(f"queue{i}") for i in range(4)]
    names = [await create(hub, t, {"buildType": "PackageList", "baseImage": USER_BASE,
                                   "packageVersions": ["tabulate==0.9.0", f"toolz=={v}"]})
             for t, v in zip(tokens, ["0.11.2", "0.12.0", "0.12.1", "1.0.0"])]
    positions = set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not positions:
        for token, name in zip(tokens, names):
            obj = (await hub.api("GET", f"api/images/{name}", token)).json()
            if obj["status"].get("queuePosition"):
                positions.add(obj["status"]["queuePosition"])
        await asyncio.sleep(0.2)
    assert positions and min(positions) >= 1  # more images than build slots: some wait, numbered
    for token, name in zip(tokens, names):
        assert model.phase_of(await wait_for(hub, token, name)) == "Ready"
    metrics = await hub.api("GET", "metrics", admin_token)
    assert metrics.code == 200
    text = metrics.body.decode()
    assert 'cnbi_builds_total{outcome="ready"}' in text and "cnbi_build_queue_length" in text
    assert (await hub.api("GET", "metrics", tokens[0])).code == 403


async def test_service_killed_during_building_resumes_to_ready(hub, builder_token, service_proc):
    name = await create(hub, builder_token, {"buildType": "PackageList", "baseImage": USER_BASE,
                                             "packageVersions": ["tabulate==0.9.0", "humanize"]})
    await building(hub, builder_token, name)
    old_pid = service_proc.proc.pid
    os.kill(old_pid, signal.SIGKILL)
    obj = await wait_for_restart_and(hub, builder_token, name, service_proc, old_pid)
    assert model.phase_of(obj) == "Ready", explain(obj)
    assert condition(obj, "BuildingImage")["status"] == "False"
    logs = (await hub.api("GET", f"api/images/{name}/logs", builder_token)).body.decode()
    assert "Restarted" in json.dumps(obj["status"]["conditions"]) or "==> Pending" in logs


@pytest.mark.parametrize("phase,extra", [("Prepare", "six"), ("Resolving", "attrs")])
async def test_service_killed_in_an_earlier_phase_resumes_to_ready(hub, builder_token, service_proc, phase, extra):
    """SIGKILL at the first sight of the phase (polled every 50 ms; a phase that passed
    quicker than that is caught in the one after it, which is said)."""
    name = await create(hub, builder_token, {"buildType": "PackageList", "baseImage": USER_BASE,
                                             "packageVersions": ["tabulate==0.9.0", "humanize", extra]})
    order = ["Pending", "Prepare", "Resolving", "Building"]
    deadline = time.monotonic() + 300
    while True:
        seen = model.phase_of((await hub.api("GET", f"api/images/{name}", builder_token)).json())
        assert seen not in model.TERMINAL_PHASES, f"finished before it could be killed in {phase}"
        if seen in order and order.index(seen) >= order.index(phase):
            break
        assert time.monotonic() < deadline, seen
        await asyncio.sleep(0.05)
    old_pid = service_proc.proc.pid
    os.kill(old_pid, signal.SIGKILL)
    print(f"killed in {seen} (aimed at {phase})")
    obj = await wait_for_restart_and(hub, builder_token, name, service_proc, old_pid)
    assert model.phase_of(obj) == "Ready", explain(obj)
    packages = {p["name"] for p in obj["status"]["packages"]}
    assert {"tabulate", "humanize", extra} <= packages


async def wait_for_restart_and(hub, token, name, service_proc, old_pid, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = service_proc.proc
        if proc is not None and proc.pid != old_pid:
            try:
                r = await hub.api("GET", f"api/images/{name}", token, timeout=5)
                if r.code == 200 and model.phase_of(r.json()) in model.TERMINAL_PHASES:
                    return r.json()
            except Exception:
                pass
        await asyncio.sleep(1)
    pytest.fail("the image did not finish after the service restarted")
