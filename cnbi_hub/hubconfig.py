"""One call that enables cnbi in a jupyterhub_config.py.

    from cnbi_hub.hubconfig import configure
    configure(c, base_images=[{"image": "quay.io/jupyter/minimal-notebook:2024-10-07"}])

It registers the hub-managed `cnbi` service, its custom scopes, the roles that grant them, and
the scopes of single-user servers' tokens (the Lab extension calls the service with them).
"""

from __future__ import annotations

import json
import os
import secrets
import sys

SERVICE_NAME = "cnbi"
FORWARDED_ENVIRONMENT = ("SSL_CERT_FILE", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "UV_INDEX_URL",
                         "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "https_proxy", "http_proxy", "no_proxy")
SCOPE_IMAGES = "custom:cnbi:images"
SCOPE_ADMIN = "custom:cnbi:admin"
ADMIN_ROLE = "cnbi-admin"
# The spawner hooks (cnbi_hub.spawner) ask the service, in the hub's process, which images a user
# may start; this token-only service is who they are.
HOOKS_SERVICE_NAME = "cnbi-hooks"
HOOKS_ROLE = "cnbi-hooks"
SERVICE_ROLE = "cnbi-service"


def configure(
    c,
    *,
    url: str = "http://127.0.0.1:10101",
    service_config: dict | None = None,
    admin_users=None,
    environment: dict | None = None,
    server_service_url: str | None = None,
    python: str = sys.executable,
    mode: str = "embedded",
    namespace: str | None = None,
) -> None:
    """Enable the cnbi service on the JupyterHub config object `c`.

    url: where the service listens (keep it on 127.0.0.1).
    service_config: CNBIService options, e.g. {"base_images": [...], "data_dir": "/srv/cnbi"};
      passed to the service as JSON in $CNBI_SERVICE_CONFIG, so they need no config file.
    admin_users: users who get `custom:cnbi:admin` (every image; sharing) without being hub
      admins. Hub admins need no listing: the service reads the `admin` flag of the user model
      at each request, so they are cnbi admins whatever the order of the config lines.
    environment: extra environment variables for the service process.
    server_service_url: how single-user servers reach the service (the Lab extension calls it
      there). Default: `url` + `/services/cnbi/`, right when servers share the hub's host network;
      on Kubernetes give the proxy's in-cluster URL, e.g. `http://proxy-public/services/cnbi/`.
    mode: "embedded" (the service builds with podman on this machine, objects in SQLite) or
      "kubernetes" (objects are CustomNBImage resources in `namespace`; the operator,
      `python -m cnbi_hub.controller`, builds them with Tekton; the service builds nothing).
    namespace: cluster mode's namespace. Default: $POD_NAMESPACE (z2jh's hub pod has it), else
      "default".
    """
    if mode not in ("embedded", "kubernetes"):
        raise ValueError(f"mode must be 'embedded' or 'kubernetes', not {mode!r}")
    service_access = f"access:services!service={SERVICE_NAME}"
    command = [python, "-m", "cnbi_hub.service"]
    # JupyterHub starts services with a clean environment: carry over how this machine reaches
    # package indexes (a mirror, a proxy's CA), which resolving and builds need too
    env = {key: os.environ[key] for key in FORWARDED_ENVIRONMENT if key in os.environ}
    env.update(environment or {})
    service_config = dict(service_config or {})
    if mode == "kubernetes":
        service_config.setdefault("store_class", "cnbi_hub.store.kubernetes.KubernetesImageStore")
        service_config.setdefault("reconcile", False)
        service_config.setdefault("namespace", namespace or os.environ.get("POD_NAMESPACE", "default"))
        for key in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "KUBECONFIG", "POD_NAMESPACE"):
            if key in os.environ:
                env.setdefault(key, os.environ[key])
    # the Lab panel starts named servers when the hub allows them (set that before this call)
    service_config.setdefault("named_servers", bool(c.JupyterHub.get("allow_named_servers", False)))
    if service_config:
        # JSON in the environment carries lists and dicts intact (a command line would not)
        env["CNBI_SERVICE_CONFIG"] = json.dumps(service_config)

    services = [s for s in c.JupyterHub.get("services", []) if s.get("name") != SERVICE_NAME]
    services.append(
        {
            "name": SERVICE_NAME,
            "display": True,
            "info": {"description": "Build custom notebook images"},
            "url": url,
            "command": command,
            "environment": env,
            # the service's pages may see only what the image builder needs of the user
            "oauth_client_allowed_scopes": [service_access, SCOPE_IMAGES, SCOPE_ADMIN],
            "oauth_no_confirm": True,
        }
    )
    # a fresh token per config load: it never needs to be stored anywhere but the hub's memory
    hooks_token = secrets.token_hex(32)
    services = [s for s in services if s.get("name") != HOOKS_SERVICE_NAME]
    services.append({"name": HOOKS_SERVICE_NAME, "api_token": hooks_token, "display": False})
    c.JupyterHub.services = services

    custom_scopes = dict(c.JupyterHub.get("custom_scopes", {}))
    custom_scopes[SCOPE_IMAGES] = {"description": "Build, watch and manage one's own custom notebook images."}
    custom_scopes[SCOPE_ADMIN] = {
        "description": "Manage every user's custom notebook images and share images with everyone.",
        "subscopes": [SCOPE_IMAGES],
    }
    c.JupyterHub.custom_scopes = custom_scopes

    extra = set(c.JupyterHub.get("extra_user_scopes", set()))
    c.JupyterHub.extra_user_scopes = extra | {service_access, SCOPE_IMAGES}

    roles = [r for r in c.JupyterHub.get("load_roles", []) if r.get("name") not in (ADMIN_ROLE, HOOKS_ROLE, SERVICE_ROLE)]
    roles.append(
        {
            "name": ADMIN_ROLE,
            "description": "Administer the image builder",
            "scopes": [SCOPE_ADMIN, service_access],
            "users": sorted(admin_users or ()),
        }
    )
    roles.append(
        {
            "name": SERVICE_ROLE,
            "description": "The cnbi service: see whether a user's server has stopped (Restart on it) and "
                           "which builds running servers use (retention never removes those)",
            "scopes": ["list:users", "read:servers"],
            "services": [SERVICE_NAME],
        }
    )
    roles.append(
        {
            "name": HOOKS_ROLE,
            "description": "Spawner hooks: list the images any user may start",
            "scopes": [SCOPE_ADMIN, service_access],
            "services": [HOOKS_SERVICE_NAME],
        }
    )
    c.JupyterHub.load_roles = roles
    c.CNBISpawnerHooks.service_url = f"{url.rstrip('/')}/services/{SERVICE_NAME}/"
    c.CNBISpawnerHooks.api_token = hooks_token

    # The server's own token reaches the service for the Lab panel. JupyterHub grants only the
    # subset the user holds, so a non-admin's server never gets custom:cnbi:admin.
    server_scopes = list(c.Spawner.get("server_token_scopes", []) or [])
    if not server_scopes:
        server_scopes = ["users:activity!user", "access:servers!server"]
    # delete:servers!server: the server may stop itself ("Restart on it", when its image has
    # a newer build) and no other server
    for scope in (service_access, SCOPE_IMAGES, SCOPE_ADMIN, "delete:servers!server"):
        if scope not in server_scopes:
            server_scopes.append(scope)
    c.Spawner.server_token_scopes = server_scopes

    spawner_env = dict(c.Spawner.get("environment", {}) or {})
    spawner_env.setdefault("CNBI_SERVICE_URL", server_service_url or f"{url.rstrip('/')}/services/{SERVICE_NAME}/")
    c.Spawner.environment = spawner_env
