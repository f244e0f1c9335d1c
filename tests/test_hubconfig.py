"""Enabling cnbi in a hub config, and the service's own config file."""

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
