"""HTTP handlers of the cnbi service: thin, they check who asks and what, then call the store.

Authentication is the hub's (HubOAuth: API tokens, or the OAuth cookie for browser pages).
Authorization uses custom scopes: `custom:cnbi:images` to use the service at all,
`custom:cnbi:admin` for every image and for sharing. Someone else's private image answers 404,
never 403, so its existence does not leak.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from importlib import resources
from typing import Any
from urllib.parse import unquote

from jupyterhub.log import SCRUB_PARAM_KEYS
from jupyterhub.services.auth import HubOAuthCallbackHandler, HubOAuthenticated
from jupyterhub.utils import url_path_join
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from tornado import web
from tornado.iostream import StreamClosedError

from .. import credentials, generations, model, stacks, webhooks
from ..hubconfig import SCOPE_ADMIN, SCOPE_IMAGES
from ..controller.registry import ImageNotFound, ImageUnauthorized, RegistryError, RegistryUnreachable
from ..imageref import parse_image_reference
from ..controller.buildlog import appended_lines
from ..controller.rebuild import (
    build_again,
    full_log,
    rebuild_for_push,
    roll_back,
    saved_generations,
    start_rebuild,
)
from ..controller.retention import policy_of
from ..controller.statemachine import cancelled
from ..store.base import AlreadyExists, Conflict, NotFound, StoreBusy, StoreFull, modify_status

MAX_BODY_BYTES = 64 * 1024


def scrub_uri(uri: str) -> str:
    """Pure: `uri` for a log line, the value of every query argument that may carry a credential
    (`?token=`, `_xsrf`, OAuth's `code` and `state`) replaced by [secret], the rest as sent.
    The hub's own request log does the same with the same names (its function is private)."""
    path, question, query = uri.partition("?")
    if not question:
        return uri
    arguments = []
    for argument in query.split("&"):
        key, equals, _ = argument.partition("=")
        secret = equals and any(word in unquote(key).lower() for word in SCRUB_PARAM_KEYS)
        arguments.append(f"{key}=[secret]" if secret else argument)
    return f"{path}?{'&'.join(arguments)}"


class ScrubbedSummary:
    """tornado's own log lines (an uncaught error, an HTTPError's message) name the request as
    sent: without the credentials its URL may carry."""

    def _request_summary(self) -> str:
        return f"{self.request.method} {scrub_uri(self.request.uri)} ({self.request.remote_ip})"


class OAuthCallbackHandler(ScrubbedSummary, HubOAuthCallbackHandler):
    """The hub's OAuth callback, its `code` and `state` kept out of the log."""


class BaseHandler(ScrubbedSummary, HubOAuthenticated, web.RequestHandler):
    """Common ground: JSON errors, the caller's identity and scopes, and the app's parts."""

    @property
    def cnbi(self):
        return self.settings["cnbi_app"]

    @property
    def store(self):
        return self.cnbi.store

    def set_default_headers(self):
        self.set_header("Cache-Control", "no-store")

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, (StoreBusy, StoreFull)):
            self.log.warning("%s %s: %s", self.request.method, self.request.path, value.message)
            return
        super().log_exception(typ, value, tb)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_header("Content-Type", "application/json")
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if self._body_still_coming():
            # tornado closes the connection after this answer (the only way not to read the
            # rest): say so, or the hub's proxy reuses it and its next request fails with a 503
            self.set_header("Connection", "close")
        if isinstance(exc, (StoreBusy, StoreFull)):
            # another process holds the database, or its disk is full: nothing was written
            self.set_status(exc.status_code)
            if isinstance(exc, StoreBusy):
                self.set_header("Retry-After", "5")
            self.finish(json.dumps({"message": exc.message}))
            return
        body = {"message": self._reason}
        if isinstance(exc, web.HTTPError) and exc.log_message:
            body["message"] = exc.log_message % exc.args if exc.args else exc.log_message
        field = getattr(exc, "field", None)
        if field:
            body["field"] = field
        related = getattr(exc, "related_field", None)
        if related:
            body["relatedField"] = related
        self.finish(json.dumps(body))

    def _body_still_coming(self) -> bool:
        """Whether a streamed request body has not all arrived (an answer before it: a refusal)."""
        future = getattr(self.request, "_body_future", None)
        return future is not None and not future.done()

    def write_json(self, value, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(value))



def newest_first(items: list[dict]) -> list[dict]:
    """The one order of every image list: newest first, then by name (the Lab panel sorts alike)."""
    by_name = sorted(items, key=model.name_of)
    return sorted(by_name, key=lambda o: o["metadata"].get("creationTimestamp", ""), reverse=True)


class FieldError(web.HTTPError):
    """An HTTP error that names the field at fault (rendered as {"message", "field"})."""

    def __init__(self, status: int, message: str, field: str | None = None, related_field: str | None = None):
        super().__init__(status, message.replace("%", "%%"))
        self.field = field
        self.related_field = related_field

    @classmethod
    def invalid(cls, error: model.InvalidObject, status: int = 422) -> "FieldError":
        return cls(status, error.message, error.field, error.related_field)


class APIHandler(BaseHandler):
    """An API route: a hub token (or the OAuth cookie) with `custom:cnbi:images` is required.

    Unauthenticated API calls get 403 JSON rather than a login redirect: scripts and the Lab
    extension are the callers here, not browsers.
    """

    user_model: dict

    def prepare(self):
        user = self.current_user
        if not user:
            raise FieldError(403, "authentication required: a JupyterHub token or login")
        scopes = set(user.get("scopes", []))
        if SCOPE_IMAGES not in scopes and SCOPE_ADMIN not in scopes:
            raise FieldError(403, f"the {SCOPE_IMAGES} scope is required to use the image builder")
        self.user_model = user

    @property
    def username(self) -> str:
        return self.user_model["name"]

    @property
    def is_admin(self) -> bool:
        """Hub admins (the user model's `admin` flag, read at each request, so it holds however
        the hub's config was ordered) and holders of custom:cnbi:admin."""
        return SCOPE_ADMIN in set(self.user_model.get("scopes", [])) or self.user_model.get("admin") is True

    @property
    def groups(self) -> list[str]:
        """The caller's JupyterHub groups (the hub's identify scopes always include them)."""
        return list(self.user_model.get("groups") or [])

    def may_see(self, obj: dict) -> bool:
        return self.is_admin or model.may_use(obj, self.username, self.groups)

    def may_change(self, obj: dict) -> bool:
        return self.is_admin or model.creator_of(obj) == self.username

    async def visible_image(self, name: str) -> dict:
        try:
            obj = await self.store.get(name)
        except NotFound:
            obj = None
        if obj is None or not self.may_see(obj):
            raise FieldError(404, f"image {name} not found", "metadata.name")
        return obj

    async def changeable_image(self, name: str) -> dict:
        obj = await self.visible_image(name)
        if not self.may_change(obj):
            raise FieldError(403, f"image {name} is shared with you; only its owner or an admin may change it")
        return obj

    async def finished_image(self, name: str) -> dict:
        """An image the caller may change whose run has ended (409 while it works)."""
        obj = await self.changeable_image(name)
        if model.phase_of(obj) not in model.TERMINAL_PHASES:
            raise FieldError(409, f"image {name} is still {model.phase_of(obj)}; wait for it to finish or cancel it")
        return obj

    async def still_stored(self, reference: str, obj: dict) -> bool:
        """Whether a kept build's image is still where it was stored, asked with the image's own
        pull secret (503 when that cannot be asked now): a build is never made current on an
        image that is gone."""
        try:
            await self.cnbi.image_access.pin(reference, obj)
            return True
        except ImageNotFound:
            return False
        except (RegistryError, LookupError) as e:
            raise FieldError(503, f"cannot see whether {reference} is still stored: {e}")


class BodyLimitMixin:
    """Bodies over MAX_BODY_BYTES are drained without being kept, then refused with 413.

    Refusing before the body is read would reset the connection under the hub's proxy, which
    then answers 503 instead of our clear 413.
    """

    _chunks: list

    def prepare_body_limit(self):
        self._chunks = []
        self._received = 0

    max_body_bytes = MAX_BODY_BYTES

    def data_received(self, chunk: bytes):
        if getattr(self, "_chunks", None) is None:
            # refused before prepare read the limit (a 405, a 403): the body is drained all the same
            self.prepare_body_limit()
        self._received += len(chunk)
        if self._received <= self.max_body_bytes:
            self._chunks.append(chunk)
        else:
            self._chunks = []

    def body_bytes(self) -> bytes:
        if self._received > self.max_body_bytes:
            raise FieldError(413, f"the request body is larger than {self.max_body_bytes // 1024} KiB")
        return b"".join(self._chunks)

    def body_json(self):
        """The body as JSON (null when empty); 413 when too large, 400 when not JSON."""
        try:
            return json.loads(self.body_bytes() or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise FieldError(400, f"the request body is not valid JSON: {e}")


@web.stream_request_body
class ImagesHandler(BodyLimitMixin, APIHandler):
    """GET api/images: list; POST api/images: create (`?dryRun=true` validates only)."""

    def prepare(self):
        super().prepare()
        if self.request.method in ("POST",):
            self.prepare_body_limit()

    async def get(self):
        owner = self.get_argument("owner", None)
        phase = self.get_argument("phase", None)
        build_type = self.get_argument("buildType", None)
        if phase and phase not in model.PHASES:
            raise FieldError(422, f"phase must be one of: {', '.join(model.PHASES)}", "phase")
        if build_type and build_type not in model.BUILD_TYPES:
            raise FieldError(422, f"buildType must be one of: {', '.join(model.BUILD_TYPES)}", "buildType")
        visible_to = self.get_argument("visibleTo", None)
        # the spawner hooks pass the user's groups along with visibleTo (they hold the hub's user)
        visible_groups = [g for g in self.get_argument("groups", "").split(",") if g]
        if owner and owner != self.username and not self.is_admin:
            raise FieldError(403, "only admins may list other users' images", "owner")
        if visible_to and not self.is_admin:
            raise FieldError(403, "only admins may list what another user can use", "visibleTo")
        if visible_to:
            # what a spawn form offers this user: their own images and shared ones
            items = await self.store.list(owner=visible_to, include_shared=True, groups=visible_groups,
                                          phase=phase, build_type=build_type)
        elif self.is_admin:
            items = await self.store.list(owner=owner or None, phase=phase, build_type=build_type)
        else:
            items = await self.store.list(
                owner=self.username, include_shared=not owner, groups=self.groups, phase=phase,
                build_type=build_type,
            )
        self.write_json({"items": newest_first(items)})

    async def post(self):
        body = self.body_json()
        try:
            obj = model.validate_new_object(body, creator=self.username, policy=self.cnbi.validation_policy)
        except model.InvalidObject as e:
            raise FieldError.invalid(e)
        await self.check_stack(obj)
        await self.check_git_credential(obj)
        if self.get_argument("dryRun", "false").lower() in ("true", "1", "all"):
            self.write_json(obj)
            return
        if await self.store.count(self.username) >= self.cnbi.max_images_per_user:
            raise FieldError(
                409,
                f"you already have {self.cnbi.max_images_per_user} images, the most allowed; "
                "delete one you no longer need first",
            )
        await check_bytes_quota(self, "build another")
        created = await self.create_with_name(obj)
        self.set_header("Location", url_path_join(self.request.path, created["metadata"]["name"]))
        self.write_json(created, status=201)

    async def check_stack(self, obj: dict) -> None:
        """An image built on another (`cnbi:<name>`): that image exists, the caller may use it,
        and the stack closes no cycle and is not too deep (422 naming the images if it does)."""
        parent = stacks.parent_of(obj["spec"])
        if parent is None:
            return

        async def visible(name: str) -> dict | None:
            try:
                found = await self.store.get(name)
            except NotFound:
                return None
            return found if self.may_see(found) else None

        found = await visible(parent)
        if found is None:  # the same words whether it is missing or not yours
            raise FieldError(422, f"there is no image {parent} that you may build on", "spec.baseImage")
        # the engine builds on this image only, never on a new one that takes its name later
        obj["metadata"]["annotations"][model.ANNOTATION_BASE_UID] = found["metadata"]["uid"]

        hidden: set[str] = set()

        async def parent_of_name(name: str) -> str | None:
            # the whole chain counts, also images the caller cannot see (they are not named)
            try:
                found = await self.store.get(name)
            except NotFound:
                return None
            if not self.may_see(found):
                hidden.add(name)
            return stacks.parent_of(found["spec"])

        try:
            await stacks.check_chain(obj["metadata"].get("name") or "(this image)", parent, parent_of_name,
                                     shown=lambda name: "(an image of someone else)" if name in hidden else name)
        except stacks.StackError as e:
            raise FieldError(422, str(e), "spec.baseImage")

    async def check_git_credential(self, obj: dict) -> None:
        """`spec.gitCredential` names a credential of the caller's own, for the repository's host."""
        name = obj["spec"].get("gitCredential")
        if not name:
            return
        record = await self.store.get_credential(self.username, name)
        if record is None:
            raise FieldError(422, f"you have no git credential named {name}; add it first (api/credentials)",
                             "spec.gitCredential")
        try:
            credentials.check_credential_for_repository(record, obj["spec"]["repository"])
        except model.InvalidObject as e:
            raise FieldError.invalid(e)

    async def create_with_name(self, obj: dict) -> dict:
        if obj["metadata"].get("name"):
            try:
                return await self.store.create(obj)
            except AlreadyExists as e:
                raise FieldError(409, e.message, e.field)
        display_name = obj["metadata"]["annotations"].get(model.ANNOTATION_DISPLAY_NAME)
        for _ in range(10):
            obj["metadata"]["name"] = model.generate_name(display_name)
            try:
                return await self.store.create(obj)
            except AlreadyExists:
                continue  # a random suffix collided: draw another
        raise FieldError(409, "could not find a free name; set metadata.name", "metadata.name")


@web.stream_request_body
class ImageHandler(BodyLimitMixin, APIHandler):
    """GET / PATCH / DELETE api/images/{name}."""

    PATCH_FIELDS = {"displayName", "description", "shared", "sharedWithGroups"}

    def prepare(self):
        super().prepare()
        if self.request.method == "PATCH":
            self.prepare_body_limit()

    async def get(self, name: str):
        self.write_json(await self.visible_image(name))

    async def patch(self, name: str):
        changes = self.body_json()
        if not isinstance(changes, dict):
            raise FieldError(422, "the request body must be a JSON object")
        unknown = sorted(set(changes) - self.PATCH_FIELDS)
        if unknown:
            raise FieldError(
                422, f"unknown field {unknown[0]}; PATCH takes {', '.join(sorted(self.PATCH_FIELDS))}", unknown[0]
            )
        obj = await self.changeable_image(name)
        if "shared" in changes:
            if not self.is_admin:
                raise FieldError(403, f"only admins may share images ({SCOPE_ADMIN})", "shared")
            if not isinstance(changes["shared"], bool):
                raise FieldError(422, "shared must be true or false", "shared")
        if "sharedWithGroups" in changes:
            try:
                groups = model.check_group_names(changes["sharedWithGroups"])
            except model.InvalidObject as e:
                raise FieldError.invalid(e)
            # owners share with their own groups; admins with any group
            foreign = sorted(set(groups) - set(self.groups) - set(model.shared_groups_of(obj)))
            if foreign and not self.is_admin:
                raise FieldError(
                    403, f"you are not a member of the group {foreign[0]}; share only with your own groups",
                    "sharedWithGroups",
                )
        annotations = obj["metadata"].setdefault("annotations", {})
        display_name = changes.get("displayName", annotations.get(model.ANNOTATION_DISPLAY_NAME, ""))
        description = changes.get("description", annotations.get(model.ANNOTATION_DESCRIPTION, ""))
        try:
            model.check_display_text(display_name, description)
        except model.InvalidObject as e:
            field = "displayName" if "name" in e.field else "description"
            raise FieldError(422, e.message, field)
        annotations[model.ANNOTATION_DISPLAY_NAME] = display_name
        annotations[model.ANNOTATION_DESCRIPTION] = description
        if "shared" in changes:
            if changes["shared"]:
                annotations[model.ANNOTATION_SHARED] = "true"
            else:
                annotations.pop(model.ANNOTATION_SHARED, None)
        if "sharedWithGroups" in changes:
            obj["metadata"]["annotations"] = annotations = model.with_shared_groups(annotations, groups)
        # no resourceVersion: a PATCH applies to the current object, as a merge patch does
        obj["metadata"].pop("resourceVersion", None)
        self.write_json(await self.store.replace(obj))

    async def delete(self, name: str):
        await self.changeable_image(name)
        try:
            await self.store.delete(name)
        except NotFound:
            pass  # deleted concurrently: the caller's wish holds
        self.set_status(204)
        self.finish()


class ImageEventsHandler(APIHandler):
    """GET api/images/{name}/events: Server-Sent Events for one image.

    The current object first, then every change (`event: object`), build log lines
    (`event: log`), heartbeat comments, and `event: deleted` before a clean close.
    """

    _closed = False

    def on_connection_close(self):
        self._closed = True

    async def send(self, event: str | None, data=None, comment: str | None = None) -> None:
        if comment is not None:
            chunk = f": {comment}\n\n"
        else:
            chunk = f"event: {event}\ndata: {json.dumps(data)}\n\n"
        self.write(chunk)
        await self.flush()

    async def get(self, name: str):
        # subscribe before reading, so no change between the read and the follow is lost
        with self.cnbi.events.open_subscription() as changes:
            obj = await self.visible_image(name)
            uid = obj["metadata"]["uid"]
            self.set_header("Content-Type", "text/event-stream")
            self.set_header("X-Accel-Buffering", "no")
            try:
                await self.send("object", obj)
                await self.follow(changes, name, uid, int(obj["metadata"]["resourceVersion"]))
            except StreamClosedError:
                return
        if not self._finished:
            self.finish()

    async def follow(self, changes, name: str, uid: str, seen_version: int) -> None:
        relay = None
        if not self.cnbi.reconcile:
            # cluster mode: the operator writes the log to the store; pass on what it adds
            relay = asyncio.create_task(self.relay_stored_log(name))
        try:
            await self._follow(changes, name, uid, seen_version)
        finally:
            if relay is not None:
                relay.cancel()

    async def relay_stored_log(self, name: str) -> None:
        seen = await self.store.get_artifact(name, "log") or ""
        while not self._closed:
            await asyncio.sleep(self.cnbi.log_poll_interval)
            try:
                current = await self.store.get_artifact(name, "log") or ""
            except Exception as e:  # the store's trouble is the object stream's to report
                self.log.debug("log relay for %s: %s", name, e)
                continue
            if current != seen:
                try:
                    for line in appended_lines(seen, current):
                        await self.send("log", {"line": line})
                except StreamClosedError:
                    return
                seen = current

    async def _follow(self, changes, name: str, uid: str, seen_version: int) -> None:
        heartbeat = self.cnbi.heartbeat_interval
        while not self._closed:
            try:
                event = await changes.get(timeout=heartbeat)
            except asyncio.TimeoutError:
                if changes.overflowed:
                    return  # we fell far behind: end the stream, the client reconnects
                await self.send(None, comment="heartbeat")
                continue
            kind, obj = event
            if obj["metadata"]["name"] != name or obj["metadata"].get("uid") != uid:
                continue
            if kind == "log":
                await self.send("log", {"line": obj["line"]})
            elif kind == "DELETED":
                await self.send("deleted", {"name": name})
                return
            else:
                version = int(obj["metadata"]["resourceVersion"])
                if version > seen_version and self.may_see(obj):
                    seen_version = version
                    await self.send("object", obj)


class ImageArtifactHandler(APIHandler):
    """GET api/images/{name}/logs and .../lock: text kept beside the object."""

    def initialize(self, kind: str):
        self.kind = kind

    async def get(self, name: str):
        obj = await self.visible_image(name)
        if self.kind == "log":
            text = await full_log(self.store, obj)
        else:
            text = await self.store.get_artifact(name, self.kind)
        if text is None and self.kind == "lock":
            raise FieldError(404, f"image {name} has no resolved lock (yet)")
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(text or "")


class RebuildHandler(APIHandler):
    """POST api/images/{name}/rebuild: run a Ready or Failed image through its phases again
    (fresh resolution, so newer package versions are picked up). The finished run is kept in
    `status.runs` and its log stays above the new run's."""

    async def post(self, name: str):
        obj = await self.finished_image(name)
        await check_bytes_quota(self, "rebuild one (a rebuild keeps the build it replaces)")
        self.write_json(await start_rebuild(self.store, obj, self.username))


@web.stream_request_body
class StartedHandler(BodyLimitMixin, APIHandler):
    """POST api/images/{name}/started {"image": ref}: the spawner hooks say a server is starting
    on the image (on `image`, its current build or a kept one), so the image records when it was
    last used (`status.lastStartedAt`, `.lastStartedImage`). Admins only: the hooks are one."""

    def prepare(self):
        super().prepare()
        self.prepare_body_limit()

    async def post(self, name: str):
        if not self.is_admin:
            raise FieldError(403, "only the hub's spawner hooks (an admin) record server starts")
        body = self.body_json()
        image = body.get("image") if isinstance(body, dict) else None
        if not isinstance(image, str) or not image or len(image) > 512:
            raise FieldError(422, "image names the reference the server starts on", "image")
        await self.visible_image(name)
        now = model.now_iso()

        def record(current: dict) -> dict:
            return {**(current.get("status") or {}), "lastStartedAt": now, "lastStartedImage": image}

        try:
            written = await modify_status(self.store, name, record)
            # a start pinned to a kept build: that build's last use, which retention reads
            saved = generations.with_start(await saved_generations(self.store, name), image, now)
            if saved is not None:
                await self.store.put_artifact(name, "generations", generations.dump_saved(saved),
                                              uid=written["metadata"]["uid"])
        except NotFound:
            raise FieldError(404, f"image {name} not found", "metadata.name")
        self.write_json(written)


async def usage_by_user(store, objs: list[dict]) -> dict[str, dict]:
    """Per creator: images, Ready ones, kept builds (still stored; and those whose image
    retention removed), their bytes (each build's own size, summed) and the last server start."""
    per_user: dict[str, dict] = {}
    for obj in objs:
        status = obj.get("status") or {}
        saved = await saved_generations(store, model.name_of(obj))
        entry = per_user.setdefault(model.creator_of(obj), {
            "user": model.creator_of(obj), "images": 0, "readyImages": 0, "keptBuilds": 0, "removedBuilds": 0,
            "bytes": 0, "lastStartedAt": None})
        entry["images"] += 1
        if model.phase_of(obj) == model.PHASE_READY:
            entry["readyImages"] += 1
            entry["bytes"] += int(status.get("imageSize") or 0)
        stored = generations.stored(saved)
        entry["keptBuilds"] += len(stored)
        entry["removedBuilds"] += len(saved) - len(stored)
        entry["bytes"] += sum(int(record.get("imageSize") or 0) for record in stored.values())
        started = status.get("lastStartedAt")
        if started and (entry["lastStartedAt"] is None or started > entry["lastStartedAt"]):
            entry["lastStartedAt"] = started
    return per_user


def gigabytes(size: int) -> str:
    return f"{size / 1e9:.1f} GB"


async def check_bytes_quota(handler: "APIHandler", what: str) -> None:
    """409 when the caller's images already take `max_bytes_per_user` or more."""
    limit = handler.cnbi.max_bytes_per_user
    if not limit:
        return
    mine = await handler.store.list(owner=handler.username)
    used = (await usage_by_user(handler.store, mine)).get(handler.username, {}).get("bytes", 0)
    if used >= limit:
        raise FieldError(409, f"your images and their kept builds take {gigabytes(used)}, this hub's limit is "
                              f"{gigabytes(limit)}: delete an image you no longer need before you {what}")


@web.stream_request_body
class RetentionHandler(BodyLimitMixin, APIHandler):
    """GET api/retention (admins): the policy and the last retention pass's report. POST runs a
    pass now, with one-off changes to the policy (`keepGenerations`, `dropUnusedDays`,
    `maxBytesPerUser`), over one `user`'s images only if given, and `dryRun` (say what would
    go, remove nothing). Embedded mode: the
    engine runs here; in cluster mode the operator runs the passes (409)."""

    OVERRIDES = {"keepGenerations": int, "dropUnusedDays": (int, float), "maxBytesPerUser": int}

    def prepare(self):
        super().prepare()
        if self.request.method == "POST":
            self.prepare_body_limit()

    def _admin_engine(self):
        if not self.is_admin:
            raise FieldError(403, f"only admins run retention ({SCOPE_ADMIN})")
        if not self.cnbi.reconcile:
            raise FieldError(409, "retention runs in the operator (cluster mode): see its log and the images' builds")
        return self.cnbi.runner

    async def get(self):
        runner = self._admin_engine()
        self.write_json({"policy": policy_of(runner).__dict__, "intervalSeconds": runner.retention_interval,
                         "lastPass": runner.last_retention})

    async def post(self):
        runner = self._admin_engine()
        body = self.body_json()
        body = {} if body is None else body
        if not isinstance(body, dict):
            raise FieldError(422, "the body is an object, such as {\"dryRun\": true}", "dryRun")
        for key, value in body.items():
            if key == "dryRun":
                if not isinstance(value, bool):
                    raise FieldError(422, "dryRun is true or false", "dryRun")
            elif key == "user":
                if not isinstance(value, str) or not value or len(value) > 255:
                    raise FieldError(422, "user names the hub user whose images the pass looks at", "user")
            elif key not in self.OVERRIDES:
                raise FieldError(422, f"{key} is not a retention setting; these are: "
                                      f"{', '.join([*self.OVERRIDES, 'user', 'dryRun'])}", key)
            elif isinstance(value, bool) or not isinstance(value, self.OVERRIDES[key]) or value < 0:
                raise FieldError(422, f"{key} is a number, 0 or more", key)
        overrides = {k: v for k, v in body.items() if k in self.OVERRIDES}
        self.write_json(await runner.check_retention(overrides, dry_run=body.get("dryRun", False),
                                                     only_owner=body.get("user")))


class UsageHandler(APIHandler):
    """GET api/usage (admins): per user, how many images and kept builds they have, the bytes
    those take, and when a server last started on one of them."""

    async def get(self):
        if not self.is_admin:
            raise FieldError(403, f"only admins see every user's usage ({SCOPE_ADMIN})")
        per_user = await usage_by_user(self.store, await self.store.list())
        self.write_json({"items": sorted(per_user.values(), key=lambda e: (-e["bytes"], e["user"]))})


class GenerationsHandler(APIHandler):
    """GET api/images/{name}/generations: the current Ready build and the earlier ones kept,
    newest first, each with when, why, and what changed in its packages against the one before."""

    async def get(self, name: str):
        obj = await self.visible_image(name)
        saved = await saved_generations(self.store, name)
        self.write_json({"items": generations.listing(obj.get("status") or {}, saved)})


@web.stream_request_body
class RollbackHandler(BodyLimitMixin, APIHandler):
    """POST api/images/{name}/rollback {"run": N}: make run N's kept build current again, without
    a build (its image, packages and lock); the build it replaces is kept in its turn. With
    "rebuild": true (a build whose image retention removed), build it again instead: its commit,
    its base by digest and its lock."""

    def prepare(self):
        super().prepare()
        self.prepare_body_limit()

    async def post(self, name: str):
        body = self.body_json()
        if not isinstance(body, dict) or "run" not in body or set(body) - {"run", "rebuild"}:
            raise FieldError(422, 'the body names the run to go back to: {"run": 2} (and "rebuild": true to '
                                  'build it again from its lock)', "run")
        run, rebuild = body["run"], body.get("rebuild", False)
        if not isinstance(run, int) or isinstance(run, bool) or run < 1:
            raise FieldError(422, "run is the number of an earlier run, such as 2", "run")
        if not isinstance(rebuild, bool):
            raise FieldError(422, "rebuild is true (build that run again from its lock) or false", "rebuild")
        obj = await self.finished_image(name)
        saved = await saved_generations(self.store, name)
        if rebuild and run in saved:
            await check_bytes_quota(self, "build one again")
            try:
                self.write_json(await build_again(self.store, obj, run, self.username))
            except Conflict:
                raise FieldError(409, f"image {name} changed meanwhile; look at it again and retry")
            return
        removed = (saved.get(run) or {}).get("removed")
        if removed:
            raise FieldError(409, f"cannot go back to run {run} at once: its image was removed on "
                                  f"{removed['at'][:10]} ({removed['reason']}); its commit, base and lock are "
                                  f'kept: send {{"run": {run}, "rebuild": true}} to build it again', "run")
        if run not in saved:
            current = (obj.get("status") or {}).get("run", 1)
            why = ("it is the current build" if run == current and model.phase_of(obj) == model.PHASE_READY
                   else f"no build of run {run} is kept; kept: {', '.join(map(str, sorted(saved))) or 'none'}")
            raise FieldError(422, f"cannot go back to run {run}: {why}", "run")
        # no retention pass deletes it between the look and the write (embedded mode; the
        # operator's passes look again before each deletion)
        async with self.cnbi.runner.retention_lock:
            if not await self.still_stored(saved[run]["image"], obj):
                raise FieldError(409, f"cannot go back to run {run}: its image is no longer stored", "run")
            try:
                written = await roll_back(self.store, obj, run, self.username)
            except KeyError:  # retention removed it meanwhile
                raise FieldError(409, f"cannot go back to run {run}: its image was just removed", "run")
            except Conflict:
                raise FieldError(409, f"image {name} changed meanwhile; look at it again and retry")
        self.write_json(written)


class CancelHandler(APIHandler):
    """POST api/images/{name}/cancel: stop a queued or running build. The image ends Failed with
    reason Cancelled; the build's processes and half-made image are removed by the engine."""

    async def post(self, name: str):
        await self.changeable_image(name)
        finished_as = []

        def cancel(current: dict) -> dict | None:
            status = cancelled(current, self.username)
            if status is None:
                finished_as.append(model.phase_of(current))
            return status

        try:
            obj = await modify_status(self.store, name, cancel)
        except NotFound:
            raise FieldError(404, f"image {name} not found", "metadata.name")
        if finished_as:
            raise FieldError(409, f"image {name} already finished ({finished_as[-1]}); there is nothing to cancel")
        self.write_json(obj)


class CheckImageHandler(APIHandler):
    """GET api/check-image?image=REF: whether an image exists (Renku's images?image_url=)."""

    async def get(self):
        text = self.get_argument("image", "")
        try:
            parse_image_reference(text.strip())
        except ValueError as e:
            raise FieldError(422, f"image: {e}", "image")
        try:
            found = await self.cnbi.image_access.check(text.strip())
        except ImageUnauthorized as e:
            result = {"result": "private", "exists": None, "digest": None, "platforms": [],
                      "message": f"{e}; name a pull secret that holds credentials for it"}
        except (RegistryUnreachable, RegistryError) as e:
            raise FieldError(502, str(e), "image")
        else:
            result = {"result": "found" if found["exists"] else "notFound", "message": "", **found}
            if not found["exists"]:
                result["message"] = f"{text.strip()} was not found"
        self.write_json(result)


class MetricsHandler(APIHandler):
    """GET metrics: Prometheus metrics (admins)."""

    def get(self):
        if not self.is_admin:
            raise FieldError(403, f"metrics are for admins ({SCOPE_ADMIN})")
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest())


class SettingsHandler(APIHandler):
    """GET api/settings: what the Lab panel needs to know about the hub."""

    def get(self):
        self.write_json({
            "namedServers": self.cnbi.named_servers,
            "user": {"name": self.username, "admin": self.is_admin, "groups": sorted(self.groups)},
        })


class CredentialsHandler(APIHandler):
    """GET api/credentials: the caller's own git credentials (names and hosts, never a token).
    Everyone, admins too, sees only their own."""

    async def get(self):
        records = await self.store.list_credentials(self.username)
        self.write_json({"items": [credentials.public_view(r) for r in records]})


@web.stream_request_body
class CredentialHandler(BodyLimitMixin, APIHandler):
    """PUT / DELETE api/credentials/{name}: store (or replace) and remove one of the caller's
    git credentials. The token is sealed before it is stored and never returned."""

    max_body_bytes = 16 * 1024

    def prepare(self):
        super().prepare()
        if self.request.method == "PUT":
            self.prepare_body_limit()

    def vault(self) -> credentials.CredentialVault:
        vault = self.cnbi.credential_vault
        if not vault.available:
            raise FieldError(503, "this hub stores no git credentials: its admin has set no credential key "
                                  "(CredentialVault.keys or $CNBI_CRYPT_KEY)")
        return vault

    async def put(self, name: str):
        body = self.body_json()
        try:
            clean = credentials.check_credential_input(name, body)
        except model.InvalidObject as e:
            raise FieldError.invalid(e)
        sealed = self.vault().seal(clean["username"], clean["token"])
        previous = await self.store.get_credential(self.username, name)
        record = credentials.new_record(self.username, name, clean, sealed, previous)
        await self.store.put_credential(record)
        self.write_json(credentials.public_view(record), status=200 if previous else 201)

    async def delete(self, name: str):
        if not await self.store.delete_credential(self.username, name):
            raise FieldError(404, f"you have no git credential named {name}", "name")
        self.set_status(204)
        self.finish()


class BaseImagesHandler(APIHandler):
    async def get(self):
        self.write_json({"items": self.cnbi.base_images})


@web.stream_request_body
class WebhookHandler(BodyLimitMixin, BaseHandler):
    """POST api/webhooks/github, api/webhooks/gitlab: a push rebuilds every GitRepository image
    that tracks the pushed branch; an image building now is rebuilt when its run ends, one
    already built at the pushed commit is left alone. No hub login: the delivery's signature
    (GitHub) or token (GitLab), checked in constant time before the body is read as JSON, is
    the credential. The answer gives counts only, never whose images were rebuilt."""

    max_body_bytes = 2 * 1024 * 1024  # GitHub caps deliveries at 25 MB; a push's is far smaller

    def prepare(self):
        self.prepare_body_limit()

    def check_xsrf_cookie(self):
        pass  # no cookie is used here: the sender signs each delivery

    def secret(self, provider: str) -> str:
        secrets = {"github": self.cnbi.github_webhook_secret, "gitlab": self.cnbi.gitlab_webhook_token}
        if provider not in secrets:
            raise FieldError(404, f"no webhooks from {provider}: only github and gitlab")
        if not secrets[provider]:
            setting = "github_webhook_secret" if provider == "github" else "gitlab_webhook_token"
            raise FieldError(404, f"{provider} webhooks are not enabled on this hub (CNBIService.{setting})")
        return secrets[provider]

    async def post(self, provider: str):
        secret = self.secret(provider)
        body = self.body_bytes()
        headers = self.request.headers
        if provider == "github":
            if not webhooks.github_signature_valid(secret, body, headers.get("X-Hub-Signature-256")):
                raise FieldError(401, "the delivery is not signed with this hub's webhook secret "
                                      "(X-Hub-Signature-256)")
            event = headers.get("X-GitHub-Event", "")
        else:
            if not webhooks.gitlab_token_valid(secret, headers.get("X-Gitlab-Token")):
                raise FieldError(401, "the delivery does not carry this hub's webhook token (X-Gitlab-Token)")
            event = headers.get("X-Gitlab-Event", "")
        delivery = webhooks.delivery_id(provider, headers)
        seen = self.settings.setdefault("webhook_deliveries", OrderedDict())
        if delivery and delivery in seen:
            return self.write_json({"delivery": delivery, "status": "ignored", "reason": "delivered before"})
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise FieldError(400, f"the delivery is not JSON: {e}")
        if provider == "github" and event == "ping":
            return self.write_json({"delivery": delivery, "status": "pong"})
        if not isinstance(payload, dict):
            raise FieldError(400, "the delivery is not a JSON object")
        try:
            push = webhooks.parse_push(provider, event, payload, delivery)
        except webhooks.WebhookRefused as e:
            raise FieldError(e.status, e.message)
        if push is None or push.deleted:
            reason = "the branch was deleted" if push else f"not a push to a branch ({event or 'no event header'})"
            return self.write_json({"delivery": delivery, "status": "ignored", "reason": reason})
        if delivery:  # remembered while it is acted on, so a redelivery racing it starts nothing
            seen[delivery] = True
            while len(seen) > self.cnbi.webhook_deliveries_remembered:
                seen.popitem(last=False)
        counts = {"rebuilding": 0, "afterCurrentRun": 0, "unchanged": 0, "failed": 0}
        try:
            for obj in await self.store.list(build_type="GitRepository"):
                if webhooks.tracks(obj, push):
                    try:
                        counts[await rebuild_for_push(self.store, obj, push)] += 1
                    except Conflict:
                        counts["failed"] += 1  # kept changing: a redelivery tries it again
        except Exception:
            seen.pop(delivery, None)  # not acted on: its redelivery must be
            raise
        self.cnbi.log.info("%s push to %s %s (%s): %s", provider, push.repository_name or "a repository",
                           push.branch, push.after[:12], counts)
        if counts["failed"]:
            seen.pop(delivery, None)
            raise FieldError(503, f"{counts['failed']} images kept changing; deliver the push again "
                                  "(those already rebuilt are not rebuilt twice)")
        self.write_json({"delivery": delivery, "status": "accepted", "branch": push.branch, "commit": push.after,
                         **counts}, 202)

class ImageStreamsHandler(APIHandler):
    """GET api/imagestreams — Open Data Hub notebook ImageStream tags (imported in the
    dashboard, meant for every user) that servers can start on; empty without the image API."""

    async def get(self):
        streams = self.cnbi.imagestreams
        if streams is None:
            self.write_json({"items": [], "available": False})
            return
        try:
            available = await streams.available()
            items = await streams.notebook_tags(self.cnbi.imagestream_namespaces) if available else []
        except Exception as e:  # the cluster's answer, whatever it was, in words
            self.log.warning("could not list ImageStreams: %s", e)
            raise FieldError(503, f"the cluster did not list its notebook ImageStreams: {e}") from None
        self.write_json({"items": items, "available": available})


class NotFoundHandler(BaseHandler):
    """Any path the service has no route for: a JSON 404 like every other answer of the API."""

    def prepare(self):
        raise FieldError(404, "the image builder has no such route; see api/openapi.yaml")


class OpenAPIHandler(BaseHandler):
    """GET api/openapi.yaml — public, like the hub's own API description."""

    def get(self):
        self.set_header("Content-Type", "application/yaml")
        self.finish(resources.files("cnbi_hub.service").joinpath("openapi.yaml").read_text())


class HealthHandler(BaseHandler):
    def get(self):
        self.write_json({"status": "ok", "version": self.cnbi.version})
