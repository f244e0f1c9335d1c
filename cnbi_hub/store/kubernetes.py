"""Cluster mode's ImageStore: CustomNBImage custom resources in one namespace (kubernetes_asyncio).

The same guarantees as the SQL store, from the apiserver itself:
- writes are conditional on `metadata.resourceVersion`; a stale one is `Conflict` (409), and a
  write without one is retried on a fresh read until it lands;
- status goes through the status subresource (the main resource ignores it, as CRDs do);
- sharing and ownership are labels, so lists filter on the server: the owner
  (`cnbi-hub.io/owner`), everyone (`cnbi-hub.io/shared=true`) and one label per JupyterHub group
  (`group.cnbi-hub.io/<hash of the name>=true`: group names need not fit a label key);
- `watch()` is fed by one watch on the namespace that resumes from its last resourceVersion
  after a cut and lists again after 410 Gone, telling subscribers what changed meanwhile;
- the lock and the operator's log lines live in a ConfigMap per image that the image owns
  (garbage-collected with it).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json

from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.client.rest import RESTResponse
from traitlets import Float, Unicode
from traitlets.config import LoggingConfigurable

from .. import model
from ..credentials import secret_name
from ..kubeclient import api_client, api_message
from .base import AlreadyExists, ChangeBroadcaster, Conflict, NotFound, StoreError, Subscription, WatchEvent

GROUP_LABEL_PREFIX = f"group.{model.PREFIX}/"
LABEL_SHARED = f"{model.PREFIX}/shared"
LABEL_GIT_CREDENTIAL = f"{model.PREFIX}/git-credential"
ANNOTATION_CREDENTIAL_OWNER = f"{model.PREFIX}/credential-owner"
# ConfigMaps hold at most 1 MiB: keep artifacts well under it
MAX_ARTIFACT_CHARS = 700 * 1024


def group_label(group: str) -> str:
    """The label key meaning "shared with this JupyterHub group"."""
    return GROUP_LABEL_PREFIX + hashlib.sha256(group.encode()).hexdigest()[:20]


def labels_for(obj: dict) -> dict:
    """The object's labels, with ownership and sharing labels derived from its annotations."""
    labels = {k: v for k, v in (obj["metadata"].get("labels") or {}).items()
              if not k.startswith(GROUP_LABEL_PREFIX) and k != LABEL_SHARED}
    labels[model.LABEL_OWNER] = model.owner_label_value(model.creator_of(obj))
    if model.is_shared(obj):
        labels[LABEL_SHARED] = "true"
    for group in model.shared_groups_of(obj):
        labels[group_label(group)] = "true"
    return labels


def _status_code_error(e: ApiException, name: str) -> StoreError:
    if e.status == 404:
        return NotFound(f"image {name} not found", "metadata.name")
    if e.status == 409:
        return Conflict(f"image {name} was changed by someone else; read it again and retry",
                        "metadata.resourceVersion")
    return StoreError(f"the Kubernetes API refused the write ({e.status} {e.reason}): {api_message(e)}")



async def _unread(call) -> None:
    """Await a call made with `_preload_content=False`, whose answer we do not need: it is not
    turned into model objects (parsing a ConfigMap's timestamps on every log write cost more
    than the write); a refusal raises ApiException as the client's own calls do."""
    response = await call
    body = await response.read()  # read to the end (bytes only): the connection is kept for the next
    if not 200 <= response.status <= 299:
        raise ApiException(http_resp=RESTResponse(response, body))


class KubernetesImageStore(LoggingConfigurable):
    """CustomNBImage objects as custom resources (`meteor.zone/v1alpha1`, `customnbimages`)."""

    kubeconfig = Unicode(
        help="""kubeconfig file to reach the apiserver. Default: $KUBECONFIG, else the in-cluster
        ServiceAccount when running in a pod, else ~/.kube/config.""",
    ).tag(config=True)

    watch_timeout = Float(
        300.0,
        help="""Seconds one watch request stays open before it is renewed from its last
        resourceVersion (the apiserver ends watches on its own schedule too).""",
    ).tag(config=True)

    def __init__(self, namespace: str = "default", **kwargs):
        super().__init__(**kwargs)
        self.namespace = namespace
        self._api_client: client.ApiClient | None = None
        self._changes = ChangeBroadcaster()
        self._watcher: asyncio.Task | None = None
        self._watching = asyncio.Event()
        self._known: dict[str, str] = {}  # name -> resourceVersion last told to subscribers
        self._known_uids: dict[str, str] = {}
        self.relists = 0  # how often the feed listed the namespace (1 + one per 410 Gone)

    # --- connection ---------------------------------------------------------------------------

    async def _api(self) -> client.ApiClient:
        if self._api_client is None:
            self._api_client = await api_client(self.kubeconfig)
        return self._api_client

    async def _objects(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(await self._api())

    async def _core(self) -> client.CoreV1Api:
        return client.CoreV1Api(await self._api())

    def _resource(self) -> dict:
        return {"group": model.GROUP, "version": model.VERSION, "namespace": self.namespace, "plural": model.PLURAL}

    async def start(self) -> None:
        """Begin following the namespace (the change feed) and wait for the first list."""
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._follow())
        await self._watching.wait()

    def close(self) -> None:
        if self._watcher:
            self._watcher.cancel()
        if self._api_client is not None:
            api_client, self._api_client = self._api_client, None
            try:
                asyncio.get_running_loop().create_task(api_client.close())
            except RuntimeError:
                pass

    async def aclose(self) -> None:
        if self._watcher:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        if self._api_client is not None:
            await self._api_client.close()
            self._api_client = None

    # --- reading ------------------------------------------------------------------------------

    async def get(self, name: str) -> dict:
        """The object; one being deleted (its finalizer still running) is already gone here."""
        api = await self._objects()
        try:
            obj = await api.get_namespaced_custom_object(**self._resource(), name=name)
        except ApiException as e:
            raise _status_code_error(e, name) from None
        if obj["metadata"].get("deletionTimestamp"):
            raise NotFound(f"image {name} not found", "metadata.name")
        return obj

    async def _list(self, label_selector: str = "", field_selector: str = "", limit: int | None = None) -> list[dict]:
        api = await self._objects()
        items, token = [], None
        while True:
            kwargs = {"limit": limit or 500}
            if label_selector:
                kwargs["label_selector"] = label_selector
            if field_selector:
                kwargs["field_selector"] = field_selector
            if token:
                kwargs["_continue"] = token
            listing = await api.list_namespaced_custom_object(**self._resource(), **kwargs)
            items += [o for o in listing.get("items", []) if not o["metadata"].get("deletionTimestamp")]
            token = listing.get("metadata", {}).get("continue")
            if not token or limit:
                return items

    async def list(
        self,
        *,
        owner: str | None = None,
        include_shared: bool = False,
        groups=(),
        phase: str | None = None,
        build_type: str | None = None,
        spec_hash: str | None = None,
        limit: int | None = None,
    ) -> list[dict]:
        """Objects, oldest first, filtered by the apiserver (labels; phase, build type and spec
        hash are the CRD's selectable fields); with `limit`, at most that many of them, not
        necessarily the oldest."""
        fields = []
        if spec_hash:
            fields.append(f"status.specHash={spec_hash}")
        if phase:
            fields.append(f"status.phase={phase}")
        if build_type:
            fields.append(f"spec.buildType={build_type}")
        field_selector = ",".join(fields)
        if owner is None:
            found = await self._list(field_selector=field_selector, limit=limit)
        else:
            selectors = [f"{model.LABEL_OWNER}={model.owner_label_value(owner)}"]
            if include_shared:
                selectors.append(f"{LABEL_SHARED}=true")
                selectors += [f"{group_label(g)}=true" for g in sorted(set(groups))]
            # a label selector cannot say "or": one list per way of being visible
            lists = await asyncio.gather(*(self._list(s, field_selector) for s in selectors))
            by_uid = {}
            for obj in (o for listing in lists for o in listing):
                by_uid[obj["metadata"]["uid"]] = obj
            found = [o for o in by_uid.values()
                     if model.creator_of(o) == owner
                     or (include_shared and model.may_use(o, owner, groups))]
        return sorted(found, key=lambda o: (o["metadata"].get("creationTimestamp", ""), model.name_of(o)))

    async def count(self, owner: str) -> int:
        return len(await self.list(owner=owner))

    # --- writing ------------------------------------------------------------------------------

    async def create(self, obj: dict) -> dict:
        body = copy.deepcopy(obj)
        body["apiVersion"], body["kind"] = model.API_VERSION, model.KIND
        meta = body["metadata"]
        meta["namespace"] = self.namespace
        meta["labels"] = labels_for(body)
        status = body.pop("status", None) or model.initial_status()
        api = await self._objects()
        try:
            created = await api.create_namespaced_custom_object(**self._resource(), body=body,
                                                                field_validation="Strict")
        except ApiException as e:
            if e.status == 409:
                raise AlreadyExists(f"an image named {meta['name']} already exists", "metadata.name") from None
            if e.status == 422:
                raise StoreError(f"the cluster refused the image: {api_message(e)}") from None
            raise _status_code_error(e, meta["name"]) from None
        # A CRD with a status subresource ignores status on create: write it through the
        # subresource. Someone may write first (the operator adding its finalizer, or already
        # starting work): then read again, and leave a status someone else wrote alone.
        current = created
        for _ in range(20):
            if current.get("status"):
                return current
            current["status"] = status
            try:
                return await api.replace_namespaced_custom_object_status(
                    **self._resource(), name=meta["name"], body=current)
            except ApiException as e:
                if e.status != 409:
                    raise _status_code_error(e, meta["name"]) from None
            current = await api.get_namespaced_custom_object(**self._resource(), name=meta["name"])
        raise Conflict(f"image {meta['name']} kept changing while it was created", "metadata.name")

    async def replace(self, obj: dict) -> dict:
        """Write metadata and spec (never status); without a resourceVersion, on the current object."""
        name = obj["metadata"]["name"]
        api = await self._objects()
        for _ in range(20):
            body = copy.deepcopy(obj)
            body["apiVersion"], body["kind"] = model.API_VERSION, model.KIND
            if not body["metadata"].get("resourceVersion"):
                current = await self.get(name)
                body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                for key in ("uid", "creationTimestamp", "generation", "finalizers"):
                    if key in current["metadata"]:
                        body["metadata"][key] = current["metadata"][key]
                body["status"] = current.get("status", {})
            body["metadata"]["labels"] = labels_for(body)
            try:
                return await api.replace_namespaced_custom_object(**self._resource(), name=name, body=body,
                                                                  field_validation="Strict")
            except ApiException as e:
                if e.status == 409 and not obj["metadata"].get("resourceVersion"):
                    continue  # changed between our read and write: read again
                raise _status_code_error(e, name) from None
        raise Conflict(f"image {name} kept changing; gave up writing it", "metadata.resourceVersion")

    async def update_status(self, name: str, status: dict, resource_version: str | None = None) -> dict:
        """Write status through the status subresource; with resource_version, Conflict if stale,
        without, retried on a fresh read when someone wrote in between (409)."""
        api = await self._objects()
        for _ in range(20):
            if resource_version is not None:
                # the status subresource keeps everything but status from the stored object, so
                # name and resourceVersion (the precondition) are all the body needs: no read
                current = {"apiVersion": model.API_VERSION, "kind": model.KIND,
                           "metadata": {"name": name, "namespace": self.namespace,
                                        "resourceVersion": resource_version}}
            else:
                current = await self.get(name)
            current["status"] = status  # only serialized: no copy needed
            try:
                return await api.replace_namespaced_custom_object_status(**self._resource(), name=name, body=current)
            except ApiException as e:
                if e.status == 409 and resource_version is None:
                    continue
                raise _status_code_error(e, name) from None
        raise Conflict(f"image {name} kept changing; gave up writing its status", "metadata.resourceVersion")

    async def delete(self, name: str) -> None:
        api = await self._objects()
        try:
            await api.delete_namespaced_custom_object(**self._resource(), name=name, propagation_policy="Background")
        except ApiException as e:
            raise _status_code_error(e, name) from None

    # --- the change feed ----------------------------------------------------------------------

    def watch(self) -> Subscription:
        """Start following changes now (call `start()` once first, so the feed is running)."""
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._follow())
        return self._changes.open_subscription()

    async def follow_from(self, resource_version: str) -> None:
        """Restart the feed's watch at `resource_version` (a version saved before a restart)."""
        await self.start()
        self._watcher.cancel()
        await asyncio.gather(self._watcher, return_exceptions=True)
        self._watcher = asyncio.create_task(self._follow(resource_version))

    async def _follow(self, resource_version: str | None = None) -> None:
        """One watch on the namespace, forever: resume from the last resourceVersion after a
        cut; after 410 Gone (that version is compacted away) list again and tell subscribers
        what changed meanwhile, as a Kubernetes informer does."""
        backoff = 0.5
        while True:
            try:
                if resource_version is None:
                    resource_version = await self._relist()
                    self._watching.set()
                api = await self._objects()
                stream = watch.Watch()
                async with stream:
                    async for event in stream.stream(
                        api.list_namespaced_custom_object, **self._resource(),
                        resource_version=resource_version, allow_watch_bookmarks=True,
                        timeout_seconds=int(self.watch_timeout),
                    ):
                        kind, obj = event["type"], event["raw_object"]
                        resource_version = obj.get("metadata", {}).get("resourceVersion", resource_version)
                        if kind == "BOOKMARK":
                            continue
                        self._tell(kind, obj)
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except ApiException as e:
                if e.status == 410:
                    self.log.info("watch of %s: resourceVersion %s is gone; listing again", self.namespace,
                                  resource_version)
                    resource_version = None
                    continue
                self.log.warning("watch of %s failed (%s); resuming from %s", self.namespace, e.status, resource_version)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10)
            except Exception as e:  # the connection was cut: resume where we were
                self.log.warning("watch of %s cut (%s); resuming from %s", self.namespace, e, resource_version)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10)

    async def _relist(self) -> str:
        self.relists += 1
        api = await self._objects()
        listing = await api.list_namespaced_custom_object(**self._resource())
        current = {model.name_of(o): o for o in listing.get("items", []) if not o["metadata"].get("deletionTimestamp")}
        if self._watching.is_set():  # a relist after 410: tell what changed while we were away
            for name in set(self._known) - set(current):
                self._tell("DELETED", {"metadata": {"name": name, "uid": self._known_uids.get(name)}})
            for name, obj in current.items():
                if self._known.get(name) != obj["metadata"]["resourceVersion"]:
                    self._tell("MODIFIED" if name in self._known else "ADDED", obj)
        else:
            for name, obj in current.items():
                self._remember(obj)
        return listing["metadata"]["resourceVersion"]

    def _remember(self, obj: dict) -> None:
        name = model.name_of(obj)
        self._known[name] = obj["metadata"].get("resourceVersion", "")
        self._known_uids[name] = obj["metadata"].get("uid")

    def _tell(self, kind: str, obj: dict) -> None:
        name = obj.get("metadata", {}).get("name")
        if not name:
            return
        if obj["metadata"].get("deletionTimestamp"):
            if name not in self._known:
                return  # already told
            kind = "DELETED"  # being deleted: gone for every reader, as `get` says
        if kind == "DELETED":
            self._known.pop(name, None)
            self._known_uids.pop(name, None)
        else:
            self._remember(obj)
        self._changes.publish(WatchEvent(kind, obj))

    # --- artifacts ----------------------------------------------------------------------------

    def _artifact_map_name(self, name: str) -> str:
        return f"cnbi-artifacts-{name}"

    async def put_artifact(self, name: str, kind: str, text: str, *, uid: str | None = None) -> None:
        if uid is None:
            uid = (await self.get(name))["metadata"]["uid"]
        if len(text) > MAX_ARTIFACT_CHARS:
            text = "[earlier lines cut]\n" + text[-MAX_ARTIFACT_CHARS:].split("\n", 1)[-1]
        core = await self._core()
        map_name = self._artifact_map_name(name)
        owner = client.V1OwnerReference(api_version=model.API_VERSION, kind=model.KIND, name=name,
                                        uid=uid, block_owner_deletion=False)
        body = client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=map_name, owner_references=[owner],
                                         labels={f"{model.PREFIX}/image": name}),
            data={kind: text},
        )
        for _ in range(10):
            # create first: most images write their artifacts once (a reused image, its log)
            try:
                await _unread(core.create_namespaced_config_map(self.namespace, body, _preload_content=False))
                return
            except ApiException as e:
                if e.status != 409:
                    raise _status_code_error(e, name) from None
            try:
                current = await core.read_namespaced_config_map(map_name, self.namespace)
            except ApiException as e:
                if e.status == 404:
                    continue  # deleted in between: create again
                raise _status_code_error(e, name) from None
            if any(ref.uid != uid for ref in current.metadata.owner_references or []):
                if (await self.get(name))["metadata"]["uid"] != uid:
                    raise NotFound(f"image {name} was replaced", "metadata.name")  # a stale writer
                current.metadata.owner_references = [owner]  # left from a deleted image of the same name
                current.data = {}
            current.data = {**(current.data or {}), kind: text}
            try:
                await _unread(core.replace_namespaced_config_map(map_name, self.namespace, current,
                                                                 _preload_content=False))
                return
            except ApiException as e:
                if e.status == 409:
                    continue
                raise _status_code_error(e, name) from None
        raise Conflict(f"the artifacts of image {name} kept changing", "metadata.name")

    async def get_artifact(self, name: str, kind: str) -> str | None:
        obj = await self.get(name)
        core = await self._core()
        try:
            current = await core.read_namespaced_config_map(self._artifact_map_name(name), self.namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise _status_code_error(e, name) from None
        if any(ref.uid != obj["metadata"]["uid"] for ref in current.metadata.owner_references or []):
            return None
        return (current.data or {}).get(kind)

    # --- git credentials: one Secret each, holding the sealed record (cnbi_hub.credentials) ----

    def _credential_secret(self, record: dict) -> client.V1Secret:
        return client.V1Secret(
            metadata=client.V1ObjectMeta(
                name=secret_name(record["owner"], record["name"]),
                labels={LABEL_GIT_CREDENTIAL: "true", model.LABEL_OWNER: model.owner_label_value(record["owner"]),
                        "app.kubernetes.io/managed-by": "cnbi-hub"},
                annotations={ANNOTATION_CREDENTIAL_OWNER: record["owner"]},
            ),
            type="Opaque",
            data={"credential": base64.b64encode(json.dumps(record).encode()).decode()},
        )

    @staticmethod
    def _record_of(secret, owner: str) -> dict | None:
        # the owner label is lossy (hub names are not label values): the annotation decides
        if (secret.metadata.annotations or {}).get(ANNOTATION_CREDENTIAL_OWNER) != owner:
            return None
        return json.loads(base64.b64decode((secret.data or {})["credential"]))

    async def put_credential(self, record: dict) -> None:
        core = await self._core()
        body = self._credential_secret(record)
        try:
            await _unread(core.create_namespaced_secret(self.namespace, body, _preload_content=False))
        except ApiException as e:
            if e.status != 409:
                raise _status_code_error(e, record["name"]) from None
            try:  # a PUT replaces the whole credential: no read needed
                await _unread(core.replace_namespaced_secret(body.metadata.name, self.namespace, body,
                                                             _preload_content=False))
            except ApiException as e:
                raise _status_code_error(e, record["name"]) from None

    async def get_credential(self, owner: str, name: str) -> dict | None:
        core = await self._core()
        try:
            secret = await core.read_namespaced_secret(secret_name(owner, name), self.namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise _status_code_error(e, name) from None
        return self._record_of(secret, owner)

    async def list_credentials(self, owner: str) -> list[dict]:
        core = await self._core()
        selector = f"{LABEL_GIT_CREDENTIAL}=true,{model.LABEL_OWNER}={model.owner_label_value(owner)}"
        found = await core.list_namespaced_secret(self.namespace, label_selector=selector)
        records = [self._record_of(secret, owner) for secret in found.items]
        return sorted((r for r in records if r), key=lambda r: r["name"])

    async def delete_credential(self, owner: str, name: str) -> bool:
        if await self.get_credential(owner, name) is None:
            return False
        core = await self._core()
        try:
            await _unread(core.delete_namespaced_secret(secret_name(owner, name), self.namespace,
                                                        _preload_content=False))
        except ApiException as e:
            if e.status == 404:
                return False
            raise _status_code_error(e, name) from None
        return True
