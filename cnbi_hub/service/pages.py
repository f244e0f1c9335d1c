"""Browser pages of the cnbi service, for users who are not in JupyterLab.

`/services/cnbi/` lists the signed-in user's images (grouped as the Lab panel groups them) and
`/services/cnbi/images/<name>` shows one image. Server-rendered Jinja2 templates (package data in
`templates/`, autoescaped) in the hub's own look: they link the hub's stylesheet and logo.

The handlers are the API's, with browser manners: the hub's OAuth login (a redirect, not a JSON
403) and HTML error pages. Who may see what is decided by the API's own `may_see` and
`visible_image`, so someone else's private image is a 404 page here too.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from functools import lru_cache
from typing import Any
from urllib.parse import quote, urlencode

from jinja2 import Environment, PackageLoader
from jupyterhub.utils import url_path_join
from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from .. import model
from ..store.base import NotFound
from .handlers import APIHandler, FieldError, full_log, newest_first

PHASE_BADGES = {
    model.PHASE_PENDING: "text-bg-secondary",
    model.PHASE_PREPARE: "text-bg-info",
    model.PHASE_RESOLVING: "text-bg-info",
    model.PHASE_BUILDING: "text-bg-primary",
    model.PHASE_READY: "text-bg-success",
    model.PHASE_FAILED: "text-bg-danger",
}


@lru_cache(maxsize=1)
def template_env() -> Environment:
    env = Environment(
        loader=PackageLoader("cnbi_hub.service", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["badge_class"] = lambda phase: PHASE_BADGES.get(phase, "text-bg-secondary")
    env.filters["when"] = format_time
    env.filters["display_name"] = model.display_name_of
    env.filters["creator"] = model.creator_of
    env.filters["phase"] = model.phase_of
    env.filters["is_shared"] = model.is_shared
    env.filters["shared_groups"] = model.shared_groups_of
    return env


# --- what the pages show (plain functions of objects) -------------------------------------


def format_time(iso: str | None) -> str:
    """'2026-11-22T02:00:00Z' → '2026-11-22 02:00:00 UTC'."""
    if not iso:
        return ""
    return iso.replace("T", " ").removesuffix("Z") + (" UTC" if iso.endswith("Z") else "")


def group_images(items: list[dict], username: str, is_admin: bool, groups=()) -> dict:
    """The Lab panel's sections: my images, shared with me, and (admins) everyone else's by owner.

    `items` are what the user may see. Each image appears once: "Shared with me" holds the other
    users' images the user could use without being an admin (shared with everyone or with one of
    their groups), an admin's "All users' images" the rest, by owner.
    """
    mine, shared, others = [], [], {}
    for obj in newest_first(items):
        creator = model.creator_of(obj)
        if not creator or creator == username:
            mine.append(obj)
        elif not is_admin or model.may_use(obj, username, groups):
            shared.append(obj)
        else:
            others.setdefault(creator, []).append(obj)
    return {"mine": mine, "shared": shared, "others": sorted(others.items())}


def failure_message(obj: dict) -> str | None:
    """Why a Failed image failed: the newest error condition's message (as the Lab panel shows)."""
    if model.phase_of(obj) != model.PHASE_FAILED:
        return None
    conditions = sorted(
        (obj.get("status") or {}).get("conditions", []),
        key=lambda c: c.get("lastTransitionTime") or "",
        reverse=True,
    )
    for c in conditions:
        kind = c.get("type", "")
        if (kind.startswith("Error") or kind.endswith("Failed")) and c.get("status") == "True" and c.get("message"):
            return c["message"]
    for c in conditions:
        if c.get("status") == "False" and c.get("message"):
            return c["message"]
    return "The build failed; see the build log for details."


# --- handlers ------------------------------------------------------------------------------


class PageHandler(APIHandler):
    """An API handler that answers browsers: login redirect, HTML pages and HTML errors."""

    def prepare(self):
        # signed out: @web.authenticated on the method sends the browser to the hub's login;
        # signed in: the API's own checks (the scope), which also set user_model for may_see
        if self.current_user is not None:
            super().prepare()

    def render_page(self, template: str, http_status: int = 200, **context: Any) -> None:
        hub_prefix = self.hub_auth.hub_prefix
        user = getattr(self, "user_model", None) or self.current_user or {}
        values = {
            "hub_prefix": hub_prefix,
            "service_prefix": url_path_join(self.cnbi.service_prefix, ""),
            "lab_url": url_path_join(hub_prefix, "user-redirect/lab"),
            "username": user.get("name", ""),
            "is_admin": bool(getattr(self, "user_model", None)) and self.is_admin,
            **context,
        }
        self.set_status(http_status)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(template_env().get_template(template).render(**values))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = ""
        if isinstance(exc, FieldError):
            message = exc.log_message % ()  # FieldError doubles any % in its message
        elif isinstance(exc, web.HTTPError) and exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        self.render_page("error.html", http_status=status_code, status_code=status_code,
                         status_message=self._reason, message=message)


class ImageListPage(PageHandler):
    """GET /services/cnbi/: the user's images, newest first, grouped like the Lab panel."""

    @web.authenticated
    async def get(self):
        if self.is_admin:
            items = await self.store.list()
        else:  # the API's query, then the API's rule (so the list never shows what the detail 404s)
            candidates = await self.store.list(owner=self.username, include_shared=True, groups=self.groups)
            items = [o for o in candidates if self.may_see(o)]
        sections = group_images(items, self.username, self.is_admin, self.groups)
        self.render_page("images.html", **sections)


class ImagePage(PageHandler):
    """GET /services/cnbi/images/<name>: one image, its spec, status, build log and lock."""

    @web.authenticated
    async def get(self, name: str):
        obj = await self.visible_image(name)  # 404 for someone else's private image, as the API
        try:
            log = await full_log(self.store, obj)  # every run, as the API's logs route
            lock = await self.store.get_artifact(name, "lock")
        except NotFound:  # deleted while we read it
            raise FieldError(404, f"image {name} not found")
        hub_prefix = self.hub_auth.hub_prefix
        self.render_page(
            "image.html",
            image=obj,
            name=model.name_of(obj),
            display_name=model.display_name_of(obj),
            description=model.description_of(obj),
            creator=model.creator_of(obj),
            shared=model.is_shared(obj),
            shared_groups=model.shared_groups_of(obj),
            phase=model.phase_of(obj),
            spec=obj.get("spec") or {},
            status=obj.get("status") or {},
            failure=failure_message(obj),
            log=log,
            lock=lock,
            spawn_url=url_path_join(hub_prefix, "spawn") + "?" + urlencode({"opt-cnbi_image": model.name_of(obj)}),
            api_url=url_path_join(self.cnbi.service_prefix, "api/images", quote(model.name_of(obj))),
        )


# JupyterHub's own rule for server names: no '/', and not more than 255 characters
_SERVER_NAME = re.compile(r"^[^/?#\s]{0,255}$")


async def server_state(api_url: str, token: str, user: str, server: str) -> str:
    """What the hub says of `user`'s server `server` ('' the default one): "running",
    "stopping", "stopped", or "unknown" (the hub did not say: no such right, no answer)."""
    request = HTTPRequest(url_path_join(api_url, "users", quote(user, safe="")),
                          headers={"Authorization": f"token {token}"}, request_timeout=10)
    try:
        servers = json.loads((await AsyncHTTPClient().fetch(request)).body).get("servers")
    except Exception:
        return "unknown"
    if servers is None:
        return "unknown"
    model_ = servers.get(server)
    if not model_ or model_.get("stopped"):
        return "stopped"
    if model_.get("pending") == "stop":
        return "stopping"
    return "running" if model_.get("ready") or model_.get("pending") else "stopped"


class RestartingPage(PageHandler):
    """GET /services/cnbi/restarting/<name>?server=<server>: where "Restart on it" (the Lab panel
    of a server on an earlier build of <name>) sends the browser while the hub stops that server.
    It waits — here, at most `restart_wait_seconds` — until the hub says the server has stopped,
    then sends the browser to the hub's spawn page for it with `opt-cnbi_image`, which starts it
    on the image's current build. (The hub's own pending page, reloaded while a named server
    stops, ends at a 404 once it has stopped.)"""

    @web.authenticated
    async def get(self, name: str):
        await self.visible_image(name)  # 404 for an image the user may not start, as the API
        server = self.get_argument("server", "")
        if not _SERVER_NAME.match(server):
            raise FieldError(400, "server is a server name (no '/', at most 255 characters)")
        deadline = time.monotonic() + self.cnbi.restart_wait_seconds
        while time.monotonic() < deadline:
            state = await server_state(self.hub_auth.api_url, self.hub_auth.api_token, self.username, server)
            if state in ("stopped", "unknown"):
                break
            await asyncio.sleep(self.cnbi.restart_poll_seconds)
        user = quote(self.username, safe="")
        named = f"/{quote(server, safe='')}" if server else ""
        self.redirect(url_path_join(self.hub_auth.hub_prefix, "spawn", user) + named + "?"
                      + urlencode({"opt-cnbi_image": name}))
