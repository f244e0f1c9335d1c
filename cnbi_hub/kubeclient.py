"""The one way cluster-mode code connects to the apiserver (kubernetes_asyncio)."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

# the apiserver busy (429), restarting or behind a proxy that is (5xx): worth another try
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})


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
    api = client.ApiClient(configuration)
    if not urllib.request.getproxies() and hasattr(api.rest_client.pool_manager, "_trust_env"):
        # kubernetes_asyncio's session trusts the environment, so aiohttp looks for a proxy and
        # a ~/.netrc in two executor threads for every request: a quarter of the operator's CPU
        # under load. With no proxy named in the environment there is nothing to find (kopf's
        # own default is not to look). The session offers no public switch for it.
        api.rest_client.pool_manager._trust_env = False
    return api


def transient(error: BaseException) -> bool:
    """Whether a failed API call is worth trying again as it was: the connection cut, refused
    or timed out, or the apiserver answering that it cannot now."""
    if isinstance(error, ApiException):
        return error.status in _TRANSIENT_STATUS
    if isinstance(error, (aiohttp.ClientSSLError, aiohttp.InvalidURL)):
        return False  # a certificate or an address that is wrong stays wrong
    return isinstance(error, (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError))


async def retrying(call, *, patience: float = 60.0, first_delay: float = 0.5, log=None):
    """`await call()`, tried again after transient failures (waiting 0.5, 1, 2… s, at most 10)
    for up to `patience` seconds; then, or at once for any other failure, its error is raised."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    delay = first_delay
    while True:
        try:
            return await call()
        except Exception as e:
            if not transient(e) or loop.time() + delay > deadline:
                raise
            if log is not None:
                log.info("the apiserver call failed (%s: %s); trying again in %.1f s", type(e).__name__, e, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


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
