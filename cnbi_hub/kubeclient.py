"""The one way cluster-mode code connects to the apiserver (kubernetes_asyncio)."""

from __future__ import annotations

import json
import os

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException


async def api_client(kubeconfig: str = "") -> client.ApiClient:
    """A client for `kubeconfig`, else $KUBECONFIG, else the pod's ServiceAccount when running
    in a pod, else ~/.kube/config. $KUBECONFIG is read now, not when kubernetes_asyncio was
    imported (it reads it once, at import)."""
    configuration = client.Configuration()
    path = kubeconfig or os.environ.get("KUBECONFIG", "")
    if path:
        await config.load_kube_config(config_file=path, client_configuration=configuration)
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        await config.load_kube_config(client_configuration=configuration)
    return client.ApiClient(configuration)


def api_message(e: ApiException) -> str:
    """The apiserver's own sentence from an error response (its Status `message`)."""
    try:
        return json.loads(e.body).get("message", "") if e.body else ""
    except (TypeError, ValueError, AttributeError):
        return str(e.body or "")


async def serves(api: client.ApiClient, group_version: str, plural: str) -> bool:
    """Whether the apiserver serves `plural` in `group_version` (discovery), e.g.
    ("image.openshift.io/v1", "imagestreams"): OpenShift's image API, or a CRD in its place."""
    group, _, version = group_version.partition("/")
    try:
        resources = await client.CustomObjectsApi(api).get_api_resources(group, version)
    except ApiException as e:
        if e.status == 404:
            return False
        raise
    return any(r.name == plural for r in resources.resources or [])
