"""Embedded end to end: the real hub starts servers with PodmanSpawner over podman's API socket.

The session hub (MockHub with the cnbi service) switches to PodmanSpawner with the cnbi hooks
for these tests; the servers run on the host network on 127.0.0.1 and are reached through the
hub's real proxy.
"""

from __future__ import annotations

import asyncio
import json
import time

import docker
import pytest
import pytest_asyncio
from jupyterhub.tests.utils import AsyncSession
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from cnbi_hub import model
from cnbi_hub.podmanspawner import PodmanSpawner
from cnbi_hub.spawner import CNBISpawnerHooks, configure_dockerspawner
from tests.infra_podman import podman

pytestmark = pytest.mark.podman

USER_BASE = "localhost/cnbi/notebook-base:py311-user"


@pytest.fixture
def podman_client(podman_api):
    client = docker.APIClient(base_url=podman_api.url, version="auto")
    yield client
    client.close()


@pytest_asyncio.fixture
async def podman_hub(hub, podman_api, podman_client, notebook_base_images):
    """The session hub, spawning with PodmanSpawner + the cnbi hooks until the test ends.

    On the way out every server a test left running is stopped through the hub, and any
    container still named like one of ours is removed, so a failing test leaves no orphan."""
    config = hub.app.config
    saved_config = {k: config[k] for k in ("PodmanSpawner", "CNBISpawnerHooks") if k in config}
    saved_class = hub.app.tornado_settings["spawner_class"]
    config.PodmanSpawner.podman_socket = str(podman_api.socket_path)
    config.PodmanSpawner.image = USER_BASE
    config.PodmanSpawner.start_timeout = 120
    config.PodmanSpawner.http_timeout = 120
    config.CNBISpawnerHooks.admin_images = {"Notebook base": USER_BASE}
    config.CNBISpawnerHooks.cache_seconds = 0
    configure_dockerspawner(config, "PodmanSpawner")
    CNBISpawnerHooks.clear_instance()
    hub.app.tornado_settings["spawner_class"] = PodmanSpawner
    yield hub
    for user in list(hub.app.users.values()):
        for spawner in list(user.spawners.values()):
            if isinstance(spawner, PodmanSpawner):
                name = spawner.container_name
                if spawner.active:
                    try:
                        await user.stop(spawner.name)
                    except Exception as e:
                        print(f"stopping {name} failed: {e}")
                if container_of(podman_client, name) is not None:
                    podman_client.remove_container(name, force=True)
    hub.app.tornado_settings["spawner_class"] = saved_class
    for key in ("PodmanSpawner", "CNBISpawnerHooks"):
        config.pop(key, None)
        if key in saved_config:
            config[key] = saved_config[key]
    CNBISpawnerHooks.clear_instance()


async def hub_request(hub, method, path, token, body=None, timeout=60):
    request = HTTPRequest(
        hub.url + path.lstrip("/"), method=method, headers={"Authorization": f"token {token}"},
        body=json.dumps(body) if body is not None else (b"" if method == "POST" else None),
        request_timeout=timeout, follow_redirects=False, allow_nonstandard_methods=True,
    )
    return await AsyncHTTPClient().fetch(request, raise_error=False)


async def wait_for_server(hub, name, token, ready=True, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = await hub_request(hub, "GET", f"hub/api/users/{name}", token)
        model_ = json.loads(r.body)
        server = model_.get("servers", {}).get("")
        if ready and server and server.get("ready"):
            return server
        if not ready and not server:
            return None
        await asyncio.sleep(0.5)
    pytest.fail(f"server of {name} did not become {'ready' if ready else 'stopped'}: {model_}")


def container_of(client, name):
    try:
        return client.inspect_container(name)
    except docker.errors.NotFound:
        return None


async def start_and_check(hub, client, username, user_options, expected_image):
    token = hub.token(username)
    r = await hub_request(hub, "POST", f"hub/api/users/{username}/server", token, body=user_options)
    assert r.code in (201, 202), r.body
    await wait_for_server(hub, username, token)

    # the server answers through the hub's proxy
    r = await hub_request(hub, "GET", f"user/{username}/api/status", token)
    assert r.code == 200, r.body
    assert "started" in json.loads(r.body)

    container_name = hub.app.users[username].spawner.container_name
    assert container_name.startswith("cnbi-")  # named per user
    container = container_of(client, container_name)
    assert container is not None and container["State"]["Running"]
    assert container["Image"] == client.inspect_image(expected_image)["Id"]
    assert container["HostConfig"]["NetworkMode"] == "host"
    env = dict(line.split("=", 1) for line in container["Config"]["Env"])
    service_url = env["JUPYTERHUB_SERVICE_URL"]
    assert service_url.startswith("http://127.0.0.1:")
    return token, container, env


async def stop_and_check(hub, client, username, token):
    container_name = hub.app.users[username].spawner.container_name
    r = await hub_request(hub, "DELETE", f"hub/api/users/{username}/server", token)
    assert r.code in (202, 204), r.body
    await wait_for_server(hub, username, token, ready=False)
    assert container_of(client, container_name) is None
    assert client.containers(all=True, filters={"name": container_name}) == []


async def test_server_on_the_notebook_base_image_through_the_proxy(podman_hub, podman_client):
    username = "pod-user"
    token, container, env = await start_and_check(podman_hub, podman_client, username, {}, USER_BASE)
    assert env["JUPYTER_IMAGE_SPEC"] == USER_BASE
    assert "CNBI_IMAGE" not in env
    await stop_and_check(podman_hub, podman_client, username, token)


async def test_server_on_a_built_image_chosen_with_cnbi_image(podman_hub, podman_client, podman_env):
    """A PackageList image built by the service's reconciler, started with `cnbi_image`.

    tabulate, not six: the base image already holds six (a Jupyter dependency), so importing it
    would prove nothing about the built layer."""
    hub = podman_hub
    username = "pod-builder"
    token = hub.token(username)
    body = {
        "metadata": {"annotations": {model.ANNOTATION_DISPLAY_NAME: "tabulate for spawning"}},
        "spec": {"buildType": "PackageList", "baseImage": USER_BASE, "packageVersions": ["tabulate==0.9.0"]},
    }
    r = await hub.api("POST", "api/images", token, body)
    assert r.code == 201, r.body
    name = model.name_of(r.json())
    deadline = time.monotonic() + 900
    while True:
        obj = (await hub.api("GET", f"api/images/{name}", token)).json()
        if model.phase_of(obj) in model.TERMINAL_PHASES:
            break
        assert time.monotonic() < deadline, f"{name} did not finish building: {obj.get('status')}"
        await asyncio.sleep(1)
    assert model.phase_of(obj) == model.PHASE_READY, json.dumps(obj["status"], indent=1)
    reference = obj["status"]["image"]
    assert "@sha256:" in reference

    try:
        token, container, env = await start_and_check(hub, podman_client, username, {"cnbi_image": name}, reference)
        assert env["CNBI_IMAGE"] == name and env["JUPYTER_IMAGE"] == reference
        # the package is importable inside the running server's container
        exec_id = podman_client.exec_create(container["Id"], ["python", "-c", "import tabulate; print(tabulate.__version__)"])
        output = podman_client.exec_start(exec_id).decode()
        assert podman_client.exec_inspect(exec_id)["ExitCode"] == 0, output
        assert output.strip().endswith("0.9.0")
        await stop_and_check(hub, podman_client, username, token)
    finally:
        await hub.api("DELETE", f"api/images/{name}", token)


async def test_someone_elses_private_image_is_refused(podman_hub, podman_client, make_ready_image):
    private = await make_ready_image("pod-owner", "Private", image=USER_BASE)
    token = podman_hub.token("pod-other")
    r = await hub_request(podman_hub, "POST", "hub/api/users/pod-other/server", token,
                          body={"cnbi_image": model.name_of(private)})
    assert r.code == 404, r.body
    assert b"No ready image named" in r.body
    assert podman_client.containers(all=True, filters={"name": "cnbi-pod"}) == []


ROOT_BASE = "localhost/cnbi/notebook-base:py311-root"


async def wait_ready_image(hub, token, name, timeout=900):
    deadline = time.monotonic() + timeout
    while True:
        obj = (await hub.api("GET", f"api/images/{name}", token)).json()
        if model.phase_of(obj) in model.TERMINAL_PHASES:
            assert model.phase_of(obj) == model.PHASE_READY, json.dumps(obj["status"], indent=1)
            return obj
        assert time.monotonic() < deadline, f"{name} did not finish building: {obj.get('status')}"
        await asyncio.sleep(1)


def exec_in(client, container_id, *argv, environment=None):
    exec_id = client.exec_create(container_id, list(argv), environment=environment)
    output = client.exec_start(exec_id).decode()
    return client.exec_inspect(exec_id)["ExitCode"], output


async def test_home_survives_a_stop_and_a_change_of_image(podman_hub, podman_client, make_ready_image, podman_env):
    """A file made in a server on one image is there in the next server on another image: the
    user's home is one podman volume, mounted in every server of theirs; deleting an image
    leaves it alone."""
    hub, username = podman_hub, "homekeeper"  # DockerSpawner escapes names: '-' would be '-2d'
    volume = f"cnbi-home-{username}"
    podman("volume", "rm", "--force", volume, env=podman_env)  # a leftover from an earlier run
    other = await make_ready_image(username, "Root-owned Python", image=ROOT_BASE)
    try:
        token, container, _ = await start_and_check(hub, podman_client, username, {}, USER_BASE)
        mounts = {m["Destination"]: m for m in container["Mounts"]}
        assert mounts["/home/jovyan"]["Name"] == volume
        # the machine's CA bundle, read-only, so pip in a terminal trusts the package index
        assert mounts["/etc/cnbi/ca-certificates.crt"]["RW"] is False
        r = await hub_request(hub, "PUT", f"user/{username}/api/contents/kept.txt", token,
                              body={"type": "file", "format": "text", "content": "still here"})
        assert r.code in (200, 201), r.body
        await stop_and_check(hub, podman_client, username, token)

        token, container, env = await start_and_check(hub, podman_client, username,
                                                      {"cnbi_image": model.name_of(other)}, ROOT_BASE)
        assert env["CNBI_IMAGE"] == model.name_of(other)
        assert {m["Destination"]: m.get("Name") for m in container["Mounts"]}["/home/jovyan"] == volume
        r = await hub_request(hub, "GET", f"user/{username}/api/contents/kept.txt", token)
        assert r.code == 200 and json.loads(r.body)["content"] == "still here"
        # the image's own home files came along on the volume's first use (podman copies them up)
        code, output = exec_in(podman_client, container["Id"], "sh", "-c", "ls -A /home/jovyan; id -un")
        assert code == 0 and "kept.txt" in output and "jovyan" in output
        # deleting the image the server runs on touches no volume
        assert (await hub.api("DELETE", f"api/images/{model.name_of(other)}", token)).code == 204
        await stop_and_check(hub, podman_client, username, token)
        assert podman("volume", "exists", volume, env=podman_env).returncode == 0
    finally:
        podman("volume", "rm", "--force", volume, env=podman_env)


@pytest.fixture(scope="module")
def lab_image(notebook_base_images):
    """The notebook base plus cnbi_hub (its server extension serves cnbi/environment)."""
    from cnbi_hub.labimage import ensure_lab_image

    return ensure_lab_image(USER_BASE)


async def test_save_this_environment_as_an_image(podman_hub, podman_client, lab_image, podman_env):
    """In a server on a built image the user `pip install`s a package in a terminal (a login
    shell), saves the environment as an image, and a server on that new image imports it."""
    hub, username = podman_hub, "envsaver"
    token = hub.token(username)
    body = {"metadata": {"annotations": {model.ANNOTATION_DISPLAY_NAME: "toolz"}},
            "spec": {"buildType": "PackageList", "baseImage": lab_image, "packageVersions": ["toolz==0.12.1"]}}
    r = await hub.api("POST", "api/images", token, body)
    assert r.code == 201, r.body
    first = await wait_ready_image(hub, token, model.name_of(r.json()))
    created = [model.name_of(first)]
    try:
        token, container, env = await start_and_check(hub, podman_client, username,
                                                      {"cnbi_image": model.name_of(first)}, first["status"]["image"])
        # the terminal: a login shell; pip trusts this machine's package index through the CA
        # bundle PodmanSpawner mounts into every server
        assert env["PIP_CERT"] == "/etc/cnbi/ca-certificates.crt"
        code, output = exec_in(podman_client, container["Id"], "bash", "-lc",
                               "pip install --quiet --disable-pip-version-check tabulate==0.9.0")
        assert code == 0, output

        r = await hub_request(hub, "GET", f"user/{username}/cnbi/environment", token)
        assert r.code == 200, r.body
        saved = json.loads(r.body)
        assert saved["baseline"] == "manifest" and saved["cnbiImage"] == model.name_of(first)
        assert saved["baseImage"] == first["status"]["image"]
        assert saved["requirements"] == ["tabulate==0.9.0"], saved
        assert saved["added"] == [{"name": "tabulate", "version": "0.9.0"}]
        await stop_and_check(hub, podman_client, username, token)

        body = {"metadata": {"annotations": {model.ANNOTATION_DISPLAY_NAME: "toolz + what I installed"}},
                "spec": {"buildType": "PackageList", "baseImage": saved["baseImage"],
                         "packageVersions": saved["requirements"]}}
        r = await hub.api("POST", "api/images", token, body)
        assert r.code == 201, r.body
        second = await wait_ready_image(hub, token, model.name_of(r.json()))
        created.append(model.name_of(second))
        token, container, env = await start_and_check(hub, podman_client, username,
                                                      {"cnbi_image": model.name_of(second)}, second["status"]["image"])
        code, output = exec_in(podman_client, container["Id"], "bash", "-lc",
                               "python -c 'import tabulate, toolz; print(tabulate.__version__)'")
        assert code == 0 and output.strip().endswith("0.9.0"), output
        await stop_and_check(hub, podman_client, username, token)
    finally:
        for name in created:
            await hub.api("DELETE", f"api/images/{name}", token)
        podman("volume", "rm", "--force", f"cnbi-home-{username}", env=podman_env)


async def test_spawn_page_takes_the_image_as_an_opt_prefixed_option(podman_hub, podman_client, make_ready_image,
                                                                    caplog):
    """The panel's link `/hub/spawn?opt-cnbi_image=<name>` starts the server on the image, and
    the hub logs no "User options should be prefixed with `opt-`" warning."""
    hub, username = podman_hub, "optuser"
    image = await make_ready_image(username, "Spawned from a link", image=USER_BASE)
    token = hub.token(username)
    session = AsyncSession()  # a browser: the hub's login cookie, as when the panel opens the link
    session.cookies.update(await hub.app.login_user(username))
    caplog.clear()
    r = await session.get(hub.url + f"hub/spawn/{username}?opt-cnbi_image={model.name_of(image)}",
                          allow_redirects=False)
    assert r.status_code == 302, r.text
    assert "/spawn-pending/" in r.headers["Location"]
    await wait_for_server(hub, username, token)
    container = container_of(podman_client, hub.app.users[username].spawner.container_name)
    env = dict(line.split("=", 1) for line in container["Config"]["Env"])
    assert env["CNBI_IMAGE"] == model.name_of(image)
    assert "prefixed with `opt-`" not in caplog.text
    await stop_and_check(hub, podman_client, username, token)
