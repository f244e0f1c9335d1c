"""Enabling cnbi in a hub config, and the service's own config file."""

import asyncio
import subprocess
import sys

from traitlets.config import Config

from cnbi_hub.hubconfig import configure


def test_configure_registers_service_scopes_and_roles():
    c = Config()
    c.Authenticator.admin_users = {"root-admin"}
    c.JupyterHub.services = [{"name": "other", "api_token": "x"}]
    configure(c, url="http://127.0.0.1:12345", service_config={"max_images_per_user": 3})
    configure(c, url="http://127.0.0.1:12345")  # idempotent: a second call replaces, not duplicates
    names = [s["name"] for s in c.JupyterHub.services]
    assert names == ["other", "cnbi", "cnbi-hooks"]
    service = c.JupyterHub.services[1]
    assert service["url"] == "http://127.0.0.1:12345"
    assert service["command"][1:] == ["-m", "cnbi_hub.service"]
    assert set(service["oauth_client_allowed_scopes"]) == {
        "access:services!service=cnbi", "custom:cnbi:images", "custom:cnbi:admin"}
    assert set(c.JupyterHub.custom_scopes) == {"custom:cnbi:images", "custom:cnbi:admin"}
    assert {"access:services!service=cnbi", "custom:cnbi:images"} <= c.JupyterHub.extra_user_scopes
    roles = [r for r in c.JupyterHub.load_roles if r["name"] == "cnbi-admin"]
    # hub admins are cnbi admins through their user model's admin flag, not a list copied now
    assert len(roles) == 1 and roles[0]["users"] == []
    assert "custom:cnbi:admin" in roles[0]["scopes"]
    assert "access:services!service=cnbi" in c.Spawner.server_token_scopes
    assert "custom:cnbi:images" in c.Spawner.server_token_scopes
    assert "access:servers!server" in c.Spawner.server_token_scopes  # the default server scopes stay
    assert "delete:servers!server" in c.Spawner.server_token_scopes  # a server may stop itself only
    assert c.Spawner.environment["CNBI_SERVICE_URL"] == "http://127.0.0.1:12345/services/cnbi/"


def test_configure_gives_the_spawner_hooks_a_token_only_service():
    c = Config()
    configure(c, url="http://127.0.0.1:12345/")
    first_token = c.CNBISpawnerHooks.api_token
    configure(c, url="http://127.0.0.1:12345/")  # a config load: a new random token, one service
    hooks_services = [s for s in c.JupyterHub.services if s["name"] == "cnbi-hooks"]
    assert len(hooks_services) == 1
    service = hooks_services[0]
    assert "url" not in service and "command" not in service  # token-only: the hub runs nothing
    assert service["api_token"] == c.CNBISpawnerHooks.api_token != first_token
    assert len(service["api_token"]) >= 32
    roles = [r for r in c.JupyterHub.load_roles if r["name"] == "cnbi-hooks"]
    assert len(roles) == 1 and roles[0]["services"] == ["cnbi-hooks"]
    assert set(roles[0]["scopes"]) == {"custom:cnbi:admin", "access:services!service=cnbi"}
    assert c.CNBISpawnerHooks.service_url == "http://127.0.0.1:12345/services/cnbi/"


def test_generate_config_writes_every_option_with_help(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cnbi_hub.service", "--generate-config"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "cnbi_config.py").read_text()
    for option in ("max_images_per_user", "base_images", "db_url", "allowed_git_schemes", "heartbeat_interval"):
        assert f"# c.CNBIService.{option} = " in text
    assert "How many images one user may have at once" in text


def test_service_inherits_how_this_machine_reaches_package_indexes(monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", "/etc/ssl/certs/corporate.pem")
    monkeypatch.setenv("PIP_INDEX_URL", "https://mirror.example.org/simple")
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    c = Config()
    configure(c, environment={"EXTRA": "1"})
    env = [s for s in c.JupyterHub.services if s["name"] == "cnbi"][0]["environment"]
    assert env["SSL_CERT_FILE"] == "/etc/ssl/certs/corporate.pem"
    assert env["PIP_INDEX_URL"] == "https://mirror.example.org/simple"
    assert env["EXTRA"] == "1" and "HTTPS_PROXY" not in env


def test_named_servers_setting_reaches_the_service():
    import json

    c = Config()
    c.JupyterHub.allow_named_servers = True
    configure(c)
    env = [s for s in c.JupyterHub.services if s["name"] == "cnbi"][0]["environment"]
    assert json.loads(env["CNBI_SERVICE_CONFIG"])["named_servers"] is True


def test_extra_cnbi_admins_are_listed_in_the_role():
    c = Config()
    configure(c, admin_users={"image-curator"})
    role = [r for r in c.JupyterHub.load_roles if r["name"] == "cnbi-admin"][0]
    assert role["users"] == ["image-curator"]


def test_cluster_mode_stores_images_as_custom_resources_and_builds_nothing(monkeypatch):
    import json

    monkeypatch.setenv("POD_NAMESPACE", "jhub")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "198.18.0.1")
    c = Config()
    configure(c, mode="kubernetes")
    service = [s for s in c.JupyterHub.services if s["name"] == "cnbi"][0]
    options = json.loads(service["environment"]["CNBI_SERVICE_CONFIG"])
    assert options["store_class"] == "cnbi_hub.store.kubernetes.KubernetesImageStore"
    assert options["reconcile"] is False and options["namespace"] == "jhub"
    # the service reaches the apiserver as the hub pod does (in-cluster config)
    assert service["environment"]["KUBERNETES_SERVICE_HOST"] == "198.18.0.1"
    import pytest

    with pytest.raises(ValueError, match="mode must be"):
        configure(Config(), mode="openshift")


def test_the_service_starts_with_the_cluster_mode_options_configure_gives_it(monkeypatch, tmp_path):
    import json

    from cnbi_hub.service.app import CNBIService
    from cnbi_hub.store.kubernetes import KubernetesImageStore

    c = Config()
    configure(c, mode="kubernetes", namespace="jhub", service_config={"data_dir": str(tmp_path)})
    service = [s for s in c.JupyterHub.services if s["name"] == "cnbi"][0]
    monkeypatch.setenv("CNBI_SERVICE_CONFIG", service["environment"]["CNBI_SERVICE_CONFIG"])
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "the-token-the-hub-gives-its-services")
    app = CNBIService()
    app.initialize([])
    assert isinstance(app.store, KubernetesImageStore) and app.store.namespace == "jhub"
    assert app.reconcile is False
    # Open Data Hub's notebook ImageStreams are read in the same namespace unless told otherwise
    assert app.imagestream_namespaces == ["jhub"] and app.imagestreams is not None
    assert json.loads(service["environment"]["CNBI_SERVICE_CONFIG"])["namespace"] == "jhub"


def test_the_embedded_service_starts_without_the_kubernetes_extra():
    """`make demo` installs no Kubernetes client: nothing embedded mode loads may need it."""
    import subprocess
    import sys

    program = ("import sys\n"
               "for name in ('kubernetes_asyncio', 'kopf', 'kubespawner'):\n"
               "    sys.modules[name] = None  # as if not installed\n"
               "import cnbi_hub.service.app, cnbi_hub.hubconfig, cnbi_hub.demo, cnbi_hub.serverextension\n"
               "app = cnbi_hub.service.app.CNBIService()\n"
               "assert app.imagestream_namespaces == []  # embedded: no ImageStreams to offer\n"
               "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


async def test_a_servers_own_token_may_stop_that_server_and_no_other(hub):
    """"Restart on it" (the server extension's cnbi/restart) stops the server with the server's
    own hub token: configure() grants it `delete:servers!server`, which the hub narrows to that
    one server. A real hub, real (mock single-user) servers."""
    from jupyterhub import orm
    from jupyterhub.tests.utils import add_user, api_request

    users = {}
    for name in ("restart-alice", "restart-bob"):
        orm_user = orm.User.find(hub.app.db, name) or add_user(hub.app.db, hub.app, name=name)
        users[name] = hub.app.users[orm_user]
        await users[name].spawn()
    alice_token = users["restart-alice"].spawner.api_token
    assert "delete:servers!server" in users["restart-alice"].spawner.server_token_scopes
    headers = {"Authorization": f"token {alice_token}"}
    r = await api_request(hub.app, "users", "restart-bob", "server", method="delete", headers=headers)
    assert r.status_code in (403, 404), r.text
    assert users["restart-bob"].spawner.active
    r = await api_request(hub.app, "users", "restart-alice", "server", method="delete", headers=headers)
    assert r.status_code in (202, 204), r.text  # accepted: stopped (204) or stopping (202)
    # the mock server may take the spawner's interrupt and terminate timeouts to end (on a busy
    # machine: SIGINT, 10 s, SIGTERM, 5 s, SIGKILL)
    deadline = asyncio.get_running_loop().time() + 90
    while users["restart-alice"].spawner.active and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.2)
    assert not users["restart-alice"].spawner.active
    await users["restart-bob"].stop()


async def test_the_restarting_page_waits_for_the_hub_to_stop_the_server_then_spawns_it(hub, service_store):
    """Where "Restart on it" sends the browser: the cnbi service asks the hub (its own token,
    `read:servers`) until the server has stopped, then redirects to the spawn page."""
    from jupyterhub import orm
    from jupyterhub.tests.utils import add_user

    from cnbi_hub import model

    name = "restarting-img"
    obj = model.validate_new_object({"metadata": {"name": name}, "spec": {
        "buildType": "ImageImport", "fromImage": "quay.io/jupyter/minimal-notebook:2024-10-07"}},
        creator="restart-carol")
    obj["status"] = {**model.initial_status(), "phase": "Ready", "image": "localhost/x@sha256:" + "d" * 64}
    await service_store.create(obj)
    orm_user = orm.User.find(hub.app.db, "restart-carol") or add_user(hub.app.db, hub.app, name="restart-carol")
    user = hub.app.users[orm_user]
    await user.spawn()
    token = hub.token("restart-carol")

    async def stop_later():
        await asyncio.sleep(2)
        await user.stop()

    stopping = asyncio.create_task(stop_later())
    started = asyncio.get_running_loop().time()
    r = await hub.api("GET", f"restarting/{name}?server=", token, timeout=150)
    waited = asyncio.get_running_loop().time() - started
    await stopping
    assert r.code == 302, r.body
    assert r.headers["Location"] == f"/hub/spawn/restart-carol?opt-cnbi_image={name}"
    assert waited >= 1.5 and not user.spawner.active  # it waited for the stop
    # someone else's image: the page is a 404, as the API
    r = await hub.api("GET", f"restarting/{name}?server=", hub.token("restart-dave"))
    assert r.code == 404
    r = await hub.api("GET", f"restarting/{name}?server=a/b", token)
    assert r.code == 400
