"""Which images running servers use, for retention: it never deletes one of them.

Two sources, each the truth where it applies: the hub (every spawner; the hooks keep the exact
build a server started on in its `user_options`, `cnbi_started`) and, in a cluster, the pods
themselves (any pod, hub server or not, by its containers' images and the digests the kubelet
pulled). Each raises when it cannot answer: retention then deletes nothing.
"""

from __future__ import annotations

import json
from urllib.parse import urlencode

from jupyterhub.utils import url_path_join
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from ..model import USER_OPTION_STARTED
from ..retention import digest_of

#: at most this many pages of 200 users are read (40,000 users with a running server)
MAX_USER_PAGES = 200


def digests_of_users(users: list[dict]) -> set[str]:
    """Digests the servers in the hub's user models run on (`user_options.cnbi_started`)."""
    found = set()
    for user in users:
        for server in (user.get("servers") or {}).values():
            started = (server.get("user_options") or {}).get(USER_OPTION_STARTED)
            if isinstance(started, str) and digest_of(started):
                found.add(digest_of(started))
    return found


async def hub_servers_in_use(api_url: str, token: str) -> set[str]:
    """Ask the hub (GET users?state=active, as the service: `list:users` and `read:servers`)."""
    found: set[str] = set()
    offset = 0
    for _ in range(MAX_USER_PAGES):
        url = url_path_join(api_url, "users") + "?" + urlencode({"state": "active", "offset": offset, "limit": 200})
        request = HTTPRequest(url, headers={"Authorization": f"token {token}",
                                            "Accept": "application/jupyterhub-pagination+json"}, request_timeout=30)
        page = json.loads((await AsyncHTTPClient().fetch(request)).body)
        users = page["items"] if isinstance(page, dict) else page
        found |= digests_of_users(users)
        following = (page.get("_pagination") or {}).get("next") if isinstance(page, dict) else None
        if not following or not users:
            return found
        offset = following.get("offset", offset + len(users))
    raise RuntimeError(f"the hub lists more than {MAX_USER_PAGES} pages of users with a running server")


def digests_of_pods(pods: list[dict]) -> set[str]:
    """Digests the pods that have not ended run or are about to run (spec and pulled imageID)."""
    found = set()
    for pod in pods:
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        spec, status = pod.get("spec") or {}, pod.get("status") or {}
        for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
            found.add(digest_of(container.get("image")))
        for container in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
            found.add(digest_of(container.get("imageID")))
    found.discard("")
    return found


async def pods_in_use(kubeconfig: str, namespaces: list[str]) -> set[str]:
    """Ask the apiserver for the pods of `namespaces` (the operator: `list pods`)."""
    from kubernetes_asyncio import client

    from ..kubeclient import api_client

    api = await api_client(kubeconfig)
    try:
        core = client.CoreV1Api(api)
        found: set[str] = set()
        for namespace in namespaces:
            listing = await core.list_namespaced_pod(namespace, _preload_content=False)
            found |= digests_of_pods(json.loads(await listing.read()).get("items", []))
        return found
    finally:
        await api.close()
