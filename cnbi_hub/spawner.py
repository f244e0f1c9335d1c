"""Start servers on built images: spawn-form hooks for KubeSpawner and DockerSpawner, and PodmanSpawner.

The hub asks the cnbi service which images a user may start (`GET api/images?visibleTo=<user>`:
the user's own images and the shared ones that have a build — Ready, or being rebuilt or failed
to rebuild, on their newest good build) and offers them next to the admin's own choices:

- KubeSpawner 7: `profile_list` (the admin's profiles first, then the images), plus
  `options_from_form` and `apply_user_options` so `?cnbi_image=<name>` on `/hub/spawn`, or
  `{"cnbi_image": "<name>"}` as REST `user_options`, starts that image (with `cnbi_build=<run>`,
  one of its kept earlier builds).
- DockerSpawner 14 (and PodmanSpawner): `allowed_images` as a callable returning
  `{display: image}`, an options form that says when the service is down, and the same
  `cnbi_image` option.

In a jupyterhub_config.py, after `cnbi_hub.hubconfig.configure(c, ...)` (which sets the service
URL and the hooks' token)::

    from cnbi_hub.spawner import configure_kubespawner      # or configure_dockerspawner
    configure_kubespawner(c)
    c.CNBISpawnerHooks.admin_profiles = [{"display_name": "Minimal", "slug": "minimal",
                                          "kubespawner_override": {"image": "quay.io/jupyter/minimal-notebook:2024-10-07"}}]

Servers started on a cnbi image carry `CNBI_IMAGE` (its name) and `JUPYTER_IMAGE` (the
reference with its digest) in their environment, and (KubeSpawner) the label
`cnbi-hub.io/image`.

`PodmanSpawner` is DockerSpawner over podman's API socket on the host network: each server
listens on 127.0.0.1 on a free port, so no bridge network (a private address range) is used.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import html
import json
import time

from jupyterhub.utils import url_path_join
from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.httputil import url_concat
from traitlets import Bool, Dict, Enum, Float, List, Unicode
from traitlets.config import SingletonConfigurable

from . import model

USER_OPTION = "cnbi_image"  # ?cnbi_image=<name> on /hub/spawn, or a REST user_options key
USER_OPTION_BUILD = "cnbi_build"  # with cnbi_image: the run of a kept earlier build (a pin)
USER_OPTION_STARTED = model.USER_OPTION_STARTED  # set by the hooks: the build a server started on, by digest
BUILD_CHOICE_CURRENT = "current"  # the spawn form's "Build" choice that starts the current build
ENV_IMAGE_NAME = "CNBI_IMAGE"
ENV_IMAGE_REFERENCE = "JUPYTER_IMAGE"
LABEL_IMAGE = f"{model.PREFIX}/image"
LAYOUT_PER_IMAGE = "profile-per-image"
LAYOUT_ONE_PROFILE = "one-profile"
SINGLE_PROFILE_OPTION = "image"  # the profile_options key in the one-profile layout
MAX_LISTED_PACKAGES = 8


# -- pure builders ----------------------------------------------------------------------------


def image_reference(obj: dict) -> str | None:
    """The reference a server runs (with its digest): status.image once the image is Ready;
    while a rebuild works, or after it failed, the newest good build (`status.rebuildOf`): a
    rebuild (a push, a moved base, a schedule) never takes an image off the spawn form."""
    status = obj.get("status") or {}
    if model.phase_of(obj) == model.PHASE_READY:
        return status.get("image") or None
    return status.get("rebuildOf") or None


def pinned_to(obj: dict, generation: dict) -> dict:
    """`obj` as a server pinned to `generation` (one of its kept builds) starts it: that build's
    image by digest; the rest (name, description) as it is now."""
    status = {**(obj.get("status") or {}), "phase": model.PHASE_READY, "image": generation["image"],
              "pinnedRun": generation["run"]}
    return {**obj, "status": status}


def previous_build_note(obj: dict) -> str:
    """Why a server starts on the previous build, or "" when it starts on the current one."""
    if model.phase_of(obj) == model.PHASE_READY or not image_reference(obj):
        return ""
    if model.phase_of(obj) == model.PHASE_FAILED:
        return "Its newest build failed: starts on the previous build."
    return "Being rebuilt: starts on the previous build until the new one is ready."


def main_packages(obj: dict) -> list[str]:
    """The packages worth naming: visible entries of status.packages, else spec.packageVersions."""
    packages = (obj.get("status") or {}).get("packages") or []
    visible = [f"{p['name']} {p.get('version', '')}".strip() for p in packages if p.get("visible", True) and p.get("name")]
    return visible or list((obj.get("spec") or {}).get("packageVersions") or [])


def image_description(obj: dict, for_user: str | None = None) -> str:
    """Plain text: the image's description, who shared it, and its main packages."""
    parts = [note] if (note := previous_build_note(obj)) else []
    description = model.description_of(obj)
    if description:
        parts.append(description.rstrip(".") + ".")
    creator = model.creator_of(obj)
    if for_user is not None and creator and creator != for_user:
        parts.append(f"Shared by {creator}.")
    packages = main_packages(obj)
    if packages:
        listed = ", ".join(packages[:MAX_LISTED_PACKAGES])
        more = len(packages) - MAX_LISTED_PACKAGES
        parts.append(f"Packages: {listed}" + (f" and {more} more." if more > 0 else "."))
    return " ".join(parts)


def image_environment(obj: dict) -> dict[str, str]:
    return {ENV_IMAGE_NAME: model.name_of(obj), ENV_IMAGE_REFERENCE: image_reference(obj) or ""}


def image_kubespawner_override(obj: dict, extra_override: dict | None = None) -> dict:
    """KubeSpawner settings that run `obj`: the digest reference, plus env and a label naming it."""
    override = copy.deepcopy(extra_override or {})
    override["image"] = image_reference(obj)
    # dict-valued overrides are merged into the spawner's own by KubeSpawner, not replacing them
    override["environment"] = {**override.get("environment", {}), **image_environment(obj)}
    override["extra_labels"] = {**override.get("extra_labels", {}), LABEL_IMAGE: model.name_of(obj)}
    return override


def kept_build_label(generation: dict) -> str:
    """Plain text naming a kept earlier build on a spawn form: "Run 3, built 2026-11-20 10:00 UTC"."""
    built = (generation.get("completionTime") or "")[:16].replace("T", " ")
    return f"Run {generation['run']}, built {built} UTC" if built else f"Run {generation['run']}"


def image_profile(obj: dict, *, slug_prefix: str, for_user: str | None = None, extra_override: dict | None = None,
                  kept: tuple = ()) -> dict:
    """One KubeSpawner profile for one image. KubeSpawner's form template does not escape, and
    these texts come from users (shared images reach other users' forms), so they are escaped
    here. With `kept` builds (earlier generations whose image is stored), a "Build" option
    chooses between the current build (the default) and those, newest first."""
    name = model.name_of(obj)
    profile = {
        "display_name": html.escape(model.display_name_of(obj) or name),
        "description": html.escape(image_description(obj, for_user)),
        "slug": f"{slug_prefix}{name}",
        "kubespawner_override": image_kubespawner_override(obj, extra_override),
    }
    pinned_run = (obj.get("status") or {}).get("pinnedRun")
    if pinned_run is not None and all(g["run"] != pinned_run for g in kept):
        # pinned to a build the (cached) listing does not show yet: KubeSpawner must find it
        kept = ({"run": pinned_run, "image": obj["status"]["image"]}, *kept)
    if kept:
        current = pinned_run is None
        choices = {BUILD_CHOICE_CURRENT: {"display_name": "The current build", "default": current}}
        for generation in kept:
            pinned = pinned_to(obj, generation)
            choices[str(generation["run"])] = {
                "display_name": html.escape(kept_build_label(generation) + ", an earlier build"),
                "kubespawner_override": image_kubespawner_override(pinned, extra_override),
                **({"default": True} if pinned_run == generation["run"] else {}),
            }
        profile["profile_options"] = {USER_OPTION_BUILD: {"display_name": "Build", "choices": choices}}
    return profile


def images_choice_profile(images: list[dict], *, slug: str, display_name: str, description: str,
                          for_user: str | None = None, extra_override: dict | None = None,
                          stream_tags: list[dict] = ()) -> dict:
    """One KubeSpawner profile whose `image` option chooses among `images`, then the
    ImageStream tags `stream_tags` (admin texts as given)."""
    choices = {}
    for obj in images:
        label = model.display_name_of(obj) or model.name_of(obj)
        text = image_description(obj, for_user)
        choices[model.name_of(obj)] = {
            "display_name": html.escape(f"{label} — {text}" if text else label),
            "kubespawner_override": image_kubespawner_override(obj, extra_override),
        }
    for tag in stream_tags:
        text = imagestream_tag_description(tag)
        label = imagestream_tag_label(tag)
        choices[imagestream_tag_key(tag)] = {
            "display_name": html.escape(f"{label} — {text}" if text else label),
            "kubespawner_override": imagestream_tag_override(tag, extra_override),
        }
    return {
        "display_name": display_name,
        "description": description,
        "slug": slug,
        "profile_options": {SINGLE_PROFILE_OPTION: {"display_name": "Image", "choices": choices}},
    }


def imagestream_tag_label(tag: dict) -> str:
    return f"{tag['displayName']} ({tag['tag']})"


def imagestream_tag_description(tag: dict) -> str:
    """Plain text: the stream's description, its software and its visible Python packages."""
    parts = [tag["description"].rstrip(".") + "."] if tag.get("description") else []
    listed = [f"{p.get('name')} {p.get('version', '')}".strip() for p in tag.get("software", []) + tag.get(
        "dependencies", []) if p.get("visible", True) and p.get("name")]
    if listed:
        more = len(listed) - MAX_LISTED_PACKAGES
        parts.append(f"Includes: {', '.join(listed[:MAX_LISTED_PACKAGES])}" + (f" and {more} more." if more > 0 else "."))
    return " ".join(parts)


def imagestream_tag_override(tag: dict, extra_override: dict | None = None) -> dict:
    override = copy.deepcopy(extra_override or {})
    override["image"] = tag["image"]
    override["environment"] = {**override.get("environment", {}), ENV_IMAGE_REFERENCE: tag["image"]}
    return override


def imagestream_tag_key(tag: dict) -> str:
    return f"imagestream-{tag['stream']}-{tag['tag']}"


def imagestream_tag_profile(tag: dict, *, slug_prefix: str, extra_override: dict | None = None) -> dict:
    """One KubeSpawner profile for an Open Data Hub notebook ImageStream tag (texts escaped:
    whoever imported the image wrote them)."""
    return {
        "display_name": html.escape(imagestream_tag_label(tag)),
        "description": html.escape(imagestream_tag_description(tag)),
        "slug": f"{slug_prefix}{imagestream_tag_key(tag)}",
        "kubespawner_override": imagestream_tag_override(tag, extra_override),
    }


def with_notice(profiles: list[dict], notice_html: str) -> list[dict]:
    """The profiles with `notice_html` added to the first one's description (the form shows it)."""
    if not profiles or not notice_html:
        return profiles
    profiles = copy.deepcopy(profiles)
    first = profiles[0]
    first["description"] = (first.get("description") or "") + notice_html
    return profiles


def allowed_image_key(obj: dict) -> str:
    """The {display: image} key of a cnbi image; the name keeps two "My image"s apart."""
    name = model.name_of(obj)
    label = model.display_name_of(obj) or name
    return f"{label} ({name})" if label != name else name


def kept_build_key(obj: dict, generation: dict) -> str:
    """The {display: image} key of an earlier build of a cnbi image, listed under the image:
    what tells it apart first (a select shows the start of a long entry)."""
    name = model.name_of(obj)
    label = model.display_name_of(obj) or name
    built = (generation.get("completionTime") or "")[:16].replace("T", " ")
    when = f" of {built} UTC" if built else ""
    return f"{label} — earlier build, run {generation['run']}{when}" + (f" ({name})" if label != name else "")


def first_value(value) -> str | None:
    """Form and query data arrive as lists of strings, REST user_options as plain values."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value if isinstance(value, str) and value else None


def kubespawner_form_options(formdata: dict) -> dict:
    """KubeSpawner's form fields (`profile`, `profile-option-<slug>--<option>`) as user_options,
    keeping `cnbi_image` (KubeSpawner's own parser drops unknown fields)."""
    options = {}
    profile = first_value(formdata.get("profile"))
    if profile:
        options["profile"] = profile
        prefix = f"profile-option-{profile}--"
        for key, values in formdata.items():
            if key.startswith(prefix) and first_value(values):
                options[key[len(prefix):]] = first_value(values)
    for key in (USER_OPTION, USER_OPTION_BUILD):
        value = first_value(formdata.get(key))
        if value:
            options[key] = value
    return options


def dockerspawner_form_options(formdata: dict) -> dict:
    options = {}
    for key in ("image", USER_OPTION, USER_OPTION_BUILD):
        value = first_value(formdata.get(key))
        if value:
            options[key] = value
    return options


@dataclasses.dataclass(frozen=True)
class ImageListing:
    """What the service said one user may start, and when; `error` is set if it did not answer."""

    images: tuple = ()
    error: str | None = None
    fetched_at: float = 0.0
    stream_tags: tuple = ()  # Open Data Hub notebook ImageStream tags (cluster mode, OpenShift)
    #: image name -> its earlier builds a server can start on (stored, not removed), newest first
    kept: dict = dataclasses.field(default_factory=dict)

    def find(self, name: str) -> dict | None:
        return next((obj for obj in self.images if model.name_of(obj) == name), None)


# -- the hooks --------------------------------------------------------------------------------


class CNBISpawnerHooks(SingletonConfigurable):
    """Spawner hooks offering a user's Ready cnbi images. One instance per hub (`instance()`)."""

    service_url = Unicode(
        "",
        help="""Where the hub reaches the cnbi service, including its prefix.

        `cnbi_hub.hubconfig.configure` sets it to the service's own address, e.g.
        `http://127.0.0.1:10101/services/cnbi/` (the hub talks to the service directly, not
        through the proxy).
        """,
    ).tag(config=True)

    api_token = Unicode(
        "",
        help="""The token the hooks send to the service: it needs `custom:cnbi:admin` (to ask
        what another user may start, `visibleTo=`) and `access:services!service=cnbi`.

        `cnbi_hub.hubconfig.configure` registers a token-only service `cnbi-hooks` with a fresh
        random token every time the config loads, and sets it here.
        """,
    ).tag(config=True)

    cache_seconds = Float(
        10.0,
        help="""How long one user's image list is reused, in seconds.

        The spawn form and the start that follows it ask once; a new image shows up at most this
        late. 0 asks the service every time.
        """,
    ).tag(config=True)

    request_timeout = Float(
        2.0,
        help="""Seconds to wait for the service. When it does not answer in time the form still
        offers the admin's own profiles, with `unavailable_notice`.""",
    ).tag(config=True)

    layout = Enum(
        [LAYOUT_PER_IMAGE, LAYOUT_ONE_PROFILE],
        default_value=LAYOUT_PER_IMAGE,
        help=f"""How KubeSpawner's form lists cnbi images.

        - `{LAYOUT_PER_IMAGE}`: one profile per image, slug `<profile_slug_prefix><name>`
          (e.g. `cnbi-pandas-x7k2p`), with the image's description and packages.
        - `{LAYOUT_ONE_PROFILE}`: one profile (`<profile_slug_prefix>images`) whose
          `{SINGLE_PROFILE_OPTION}` option chooses the image: a shorter form for users with many images.
        """,
    ).tag(config=True)

    profile_slug_prefix = Unicode(
        "cnbi-", help="Prefix of the slugs of cnbi profiles; keep it apart from the admin's own slugs."
    ).tag(config=True)

    admin_profiles = List(
        Dict(),
        help="""The admin's own KubeSpawner profiles, listed first (the first is the default
        unless one says `"default": True`). Same shape as `KubeSpawner.profile_list`, e.g.::

            c.CNBISpawnerHooks.admin_profiles = [
                {"display_name": "Minimal", "slug": "minimal", "default": True,
                 "kubespawner_override": {"image": "quay.io/jupyter/minimal-notebook:2024-10-07"}},
                {"display_name": "Data science", "slug": "datascience",
                 "kubespawner_override": {"image": "quay.io/jupyter/datascience-notebook:2024-10-07",
                                          "cpu_limit": 2}},
            ]

        Their texts are HTML as given (KubeSpawner does not escape); cnbi images' texts are escaped.
        """,
    ).tag(config=True)

    image_override = Dict(
        help="""Extra KubeSpawner settings for every cnbi image's profile, under the image and
        environment the hooks set, e.g. `{"image_pull_policy": "IfNotPresent", "default_url": "/lab"}`."""
    ).tag(config=True)

    one_profile_display_name = Unicode(
        "My custom images", help=f"Title of the single cnbi profile in the `{LAYOUT_ONE_PROFILE}` layout."
    ).tag(config=True)

    one_profile_description = Unicode(
        "Images you built with the Image Builder, and images shared with everyone.",
        help=f"Description (HTML) of the single cnbi profile in the `{LAYOUT_ONE_PROFILE}` layout.",
    ).tag(config=True)

    admin_images = Dict(
        help="""DockerSpawner: the admin's own images, `{display: image}`, offered first, e.g.
        `{"Notebook base (Python 3.11)": "localhost/cnbi/notebook-base:py311-user"}`.
        cnbi images follow as `"<display name> (<name>)": <reference with digest>`.""",
    ).tag(config=True)

    include_imagestreams = Bool(
        True,
        help="""KubeSpawner: also offer Open Data Hub notebook ImageStream tags the service lists
        (`api/imagestreams`: images imported in the dashboard, for every user), after the
        user's cnbi images. Where the cluster has no image API the list is empty.""",
    ).tag(config=True)

    unavailable_notice = Unicode(
        "Custom images are not available right now (the image service did not answer); "
        "the standard choices still work. Reload this page in a minute to see your images.",
        help="Plain text shown on the spawn form when the service cannot be asked.",
    ).tag(config=True)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._listings: dict[str, ImageListing] = {}

    # -- the service --------------------------------------------------------------------------

    def _service_request(self, url: str, body: dict | None = None) -> HTTPRequest:
        """A request to the cnbi service with the hooks' token: GET, or POST of `body` as JSON."""
        headers = {"Authorization": f"token {self.api_token}", "Accept": "application/json"}
        if body is None:
            return HTTPRequest(url, headers=headers, connect_timeout=self.request_timeout,
                               request_timeout=self.request_timeout)
        return HTTPRequest(url, method="POST", body=json.dumps(body),
                           headers={**headers, "Content-Type": "application/json"},
                           connect_timeout=self.request_timeout, request_timeout=self.request_timeout)

    async def images_for(self, username: str, groups=()) -> ImageListing:
        """The Ready images `username` (a member of `groups`) may start: their own, and those
        shared with everyone or with one of the groups; cached `cache_seconds`."""
        now = time.monotonic()
        cached = self._listings.get(username)
        if cached is not None and now - cached.fetched_at < self.cache_seconds:
            return cached
        listing = await self._fetch(username, sorted(groups), now)
        self._listings[username] = listing
        return listing

    def cached_images_for(self, username: str) -> ImageListing:
        """The last listing fetched for `username`, without asking (for synchronous hooks)."""
        return self._listings.get(username) or ImageListing()

    async def _fetch(self, username: str, groups: list[str], now: float) -> ImageListing:
        if not (self.service_url and self.api_token):
            return ImageListing(error="the cnbi service URL or token is not configured", fetched_at=now)
        # no phase filter: images being rebuilt stay startable on their previous build
        query = {"visibleTo": username}
        if groups:
            query["groups"] = ",".join(groups)
        url = url_concat(url_path_join(self.service_url, "api/images"), query)
        request = self._service_request(url)
        try:
            response = await AsyncHTTPClient().fetch(request)
            items = json.loads(response.body)["items"]
        except Exception as e:  # any failure means the same to a spawn form: no custom images now
            self.log.warning("cnbi: could not list the images of %s from %s: %s", username, self.service_url, e)
            return ImageListing(error=str(e) or type(e).__name__, fetched_at=now)
        ready = tuple(obj for obj in items if image_reference(obj))
        stream_tags = await self._fetch_stream_tags() if self.include_imagestreams else ()
        return ImageListing(images=ready, fetched_at=now, stream_tags=stream_tags, kept=await self._fetch_kept(ready))

    async def _fetch_kept(self, images: tuple) -> dict:
        """The earlier builds of `images` a server can start on, for the form's build choice:
        asked only of images that ran more than once (the others have none)."""
        rebuilt = [obj for obj in images if (obj.get("status") or {}).get("run", 1) > 1]

        async def kept_of(obj: dict) -> tuple:
            url = url_path_join(self.service_url, f"api/images/{model.name_of(obj)}/generations")
            try:
                items = json.loads((await AsyncHTTPClient().fetch(self._service_request(url))).body)["items"]
            except Exception as e:  # the image itself can still be started: offer its current build
                self.log.warning("cnbi: could not read the builds of %s: %s", model.name_of(obj), e)
                return ()
            return tuple(g for g in items if not g.get("current") and not g.get("removed") and g.get("image"))

        found = await asyncio.gather(*(kept_of(obj) for obj in rebuilt))
        return {model.name_of(obj): builds for obj, builds in zip(rebuilt, found) if builds}

    async def _fetch_stream_tags(self) -> tuple:
        request = self._service_request(url_path_join(self.service_url, "api/imagestreams"))
        try:
            response = await AsyncHTTPClient().fetch(request)
            return tuple(tag for tag in json.loads(response.body)["items"] if tag.get("image"))
        except Exception as e:  # the user's own images still count: offer those
            self.log.warning("cnbi: could not list notebook ImageStreams from %s: %s", self.service_url, e)
            return ()

    async def chosen_image(self, username: str, name: str, groups=()) -> dict:
        """The Ready image `name` that `username` may start, or an HTTP error they can act on."""
        listing = await self.images_for(username, groups)
        obj = listing.find(name)
        if obj is None and listing.error:
            raise web.HTTPError(503, f"Image {name} cannot be started now: the image service did not answer. Try again in a minute.")
        if obj is None:
            raise web.HTTPError(404, f"No ready image named {name} that you may use.")
        return obj

    async def chosen_build(self, spawner, user_options: dict) -> dict | None:
        """The image `user_options` names (`cnbi_image`), pinned to the kept build `cnbi_build`
        names if it names one; None without `cnbi_image`. An HTTP error the user can act on when
        the image is not theirs to start or no such build is kept."""
        spawner.cnbi_pinned_image = None  # the hub reuses spawner objects: no pin from an earlier start
        name = first_value((user_options or {}).get(USER_OPTION))
        if not name:
            return None
        obj = await self.chosen_image(spawner.user.name, name, groups_of(spawner.user))
        run = (user_options or {}).get(USER_OPTION_BUILD)
        if run in (None, "", []):
            return obj
        run = first_value(run) if isinstance(run, (list, tuple)) else run
        try:
            run = int(run)
        except (TypeError, ValueError):
            raise web.HTTPError(400, f"cnbi_build must be the number of a run of {name}, such as 2") from None
        request = self._service_request(url_path_join(self.service_url, f"api/images/{name}/generations"))
        try:
            generations = json.loads((await AsyncHTTPClient().fetch(request)).body)["items"]
        except Exception as e:
            self.log.warning("cnbi: could not read the builds of %s: %s", name, e)
            raise web.HTTPError(503, f"The builds of {name} cannot be read now. Try again in a minute.") from None
        startable = [g for g in generations if not g.get("removed")]
        found = next((g for g in startable if g.get("run") == run), None)
        if found is None:
            kept = ", ".join(str(g["run"]) for g in startable) or "none"
            gone = next((g["removed"] for g in generations if g.get("run") == run and g.get("removed")), None)
            why = f"its image was removed ({gone['reason']})" if gone else "it keeps no such build"
            raise web.HTTPError(404, f"Image {name} cannot start run {run}: {why} (kept: {kept}).")
        pinned = pinned_to(obj, found)
        spawner.cnbi_pinned_image = pinned  # profile_list and allowed_images read it later
        return pinned

    async def record_start(self, spawner, obj: dict) -> None:
        """Tell the service a server starts on `obj` (its last use, for usage and retention)
        and keep the exact build in the server's user_options (`cnbi_started`, which the hub
        stores and lists with the server). Never in the way of the start: a failure is logged."""
        reference = image_reference(obj)
        spawner.user_options = {**(spawner.user_options or {}), USER_OPTION_STARTED: reference}
        request = self._service_request(
            url_path_join(self.service_url, f"api/images/{model.name_of(obj)}/started"), body={"image": reference})
        try:
            await AsyncHTTPClient().fetch(request)
        except Exception as e:
            self.log.warning("cnbi: could not record a start of %s: %s", model.name_of(obj), e)

    def _pinned(self, spawner, name: str) -> dict | None:
        pinned = getattr(spawner, "cnbi_pinned_image", None)
        return pinned if pinned is not None and model.name_of(pinned) == name else None

    def _notice_html(self, listing: ImageListing) -> str:
        if not listing.error:
            return ""
        return f'<p class="text-warning cnbi-notice">{html.escape(self.unavailable_notice)}</p>'

    # -- KubeSpawner ----------------------------------------------------------------------------

    async def profile_list(self, spawner) -> list[dict]:
        """KubeSpawner.profile_list: the admin's profiles, then the user's images."""
        username = spawner.user.name
        listing = await self.images_for(username, groups_of(spawner.user))
        images = sorted(listing.images, key=lambda o: (model.display_name_of(o).lower(), model.name_of(o)))
        # a server pinned to a kept build (cnbi_build): its profile runs that build
        images = [self._pinned(spawner, model.name_of(o)) or o for o in images]
        profiles = copy.deepcopy(list(self.admin_profiles))
        if self.layout == LAYOUT_ONE_PROFILE:
            if images or listing.stream_tags:
                profiles.append(images_choice_profile(
                    images, slug=f"{self.profile_slug_prefix}images", display_name=self.one_profile_display_name,
                    description=self.one_profile_description, for_user=username, extra_override=self.image_override,
                    stream_tags=list(listing.stream_tags),
                ))
        else:
            profiles.extend(
                image_profile(obj, slug_prefix=self.profile_slug_prefix, for_user=username,
                              extra_override=self.image_override, kept=listing.kept.get(model.name_of(obj), ()))
                for obj in images
            )
            profiles.extend(
                imagestream_tag_profile(tag, slug_prefix=self.profile_slug_prefix, extra_override=self.image_override)
                for tag in listing.stream_tags
            )
        return with_notice(profiles, self._notice_html(listing))

    def profile_options_for(self, name: str) -> dict:
        """The KubeSpawner user_options that select image `name`."""
        if self.layout == LAYOUT_ONE_PROFILE:
            return {"profile": f"{self.profile_slug_prefix}images", SINGLE_PROFILE_OPTION: name}
        return {"profile": f"{self.profile_slug_prefix}{name}"}

    def kubespawner_options_from_form(self, formdata: dict) -> dict:
        """KubeSpawner.options_from_form (also used for /hub/spawn query arguments)."""
        return kubespawner_form_options(formdata)

    def image_named_by_profile(self, user_options: dict) -> str | None:
        """The cnbi image a KubeSpawner form choice names (its profile, or the one-profile
        layout's image option); None for the admin's profiles and ImageStream tags."""
        profile = first_value(user_options.get("profile")) or ""
        prefix = self.profile_slug_prefix
        if not profile.startswith(prefix) or profile.startswith(f"{prefix}imagestream-"):
            return None
        if self.layout == LAYOUT_ONE_PROFILE:
            chosen = first_value(user_options.get(SINGLE_PROFILE_OPTION)) or ""
            return chosen if profile == f"{prefix}images" and not chosen.startswith("imagestream-") else None
        return profile[len(prefix):]

    async def kubespawner_apply_user_options(self, spawner, user_options: dict) -> None:
        """Spawner.apply_user_options: `cnbi_image` becomes the profile that runs it; a cnbi
        profile chosen on the form (with its "Build" choice) is pinned and recorded the same way.

        Runs before KubeSpawner.start, which applies the profile (load_user_options).
        """
        user_options = dict(user_options or {})
        spawner.cnbi_pinned_image = None  # the hub reuses spawner objects: no pin from an earlier start
        if first_value(user_options.get(USER_OPTION_BUILD)) == BUILD_CHOICE_CURRENT:
            del user_options[USER_OPTION_BUILD]
        if not first_value(user_options.get(USER_OPTION)) and (named := self.image_named_by_profile(user_options)):
            user_options[USER_OPTION] = named
        obj = await self.chosen_build(spawner, user_options)
        if obj is None:
            return
        pinned = (obj.get("status") or {}).get("pinnedRun")
        if pinned is not None:  # as the profile's "Build" option names it (REST may send a number)
            user_options[USER_OPTION_BUILD] = str(pinned)
        spawner.user_options = {**user_options, **self.profile_options_for(model.name_of(obj))}
        await self.record_start(spawner, obj)

    # -- DockerSpawner --------------------------------------------------------------------------

    def allowed_images(self, spawner) -> dict[str, str]:
        """DockerSpawner.allowed_images: `{display: image}`, the admin's images first.

        DockerSpawner calls this synchronously, so it reads the listing the options form or
        `apply_user_options` fetched just before.
        """
        listing = self.cached_images_for(spawner.user.name)
        allowed = dict(self.admin_images)
        for obj in sorted(listing.images, key=lambda o: (model.display_name_of(o).lower(), model.name_of(o))):
            obj = self._pinned(spawner, model.name_of(obj)) or obj
            allowed[allowed_image_key(obj)] = image_reference(obj)
            for generation in listing.kept.get(model.name_of(obj), ()):
                allowed[kept_build_key(obj, generation)] = generation["image"]
        return allowed

    async def dockerspawner_options_form(self, spawner) -> str:
        """DockerSpawner.options_form: a choice of image, with a notice when the service is down."""
        listing = await self.images_for(spawner.user.name, groups_of(spawner.user))
        allowed = self.allowed_images(spawner)
        if len(allowed) <= 1 and not listing.error:
            return ""  # nothing to choose: start straight away, as DockerSpawner does
        options = "\n".join(
            '<option value="{0}"{1}>{0}</option>'.format(html.escape(key), " selected" if i == 0 else "")
            for i, key in enumerate(allowed)
        )
        return (
            f"{self._notice_html(listing)}"
            '<label for="cnbi-image-select">Select an image:</label>\n'
            f'<select class="form-control" id="cnbi-image-select" name="image" required autofocus>\n{options}\n</select>'
        )

    def dockerspawner_options_from_form(self, formdata: dict) -> dict:
        return dockerspawner_form_options(formdata)

    async def dockerspawner_apply_user_options(self, spawner, user_options: dict) -> None:
        """Spawner.apply_user_options: refresh the listing allowed_images reads, map `cnbi_image`
        to its allowed_images key, and name the chosen cnbi image in the server's environment."""
        user_options = dict(user_options or {})
        spawner.cnbi_pinned_image = None  # the hub reuses spawner objects: no pin from an earlier start
        listing = await self.images_for(spawner.user.name, groups_of(spawner.user))
        name = first_value(user_options.get(USER_OPTION))
        if name:
            obj = await self.chosen_build(spawner, user_options)
            user_options["image"] = allowed_image_key(obj)
            spawner.user_options = user_options
        else:
            key = first_value(user_options.get("image"))
            obj = next((o for o in listing.images if key and allowed_image_key(o) == key), None)
            kept = next(((o, g) for o in listing.images for g in listing.kept.get(model.name_of(o), ())
                         if key and kept_build_key(o, g) == key), None)
            if kept is not None:  # an earlier build chosen on the form: pinned as cnbi_build pins it
                obj = await self.chosen_build(spawner, {USER_OPTION: model.name_of(kept[0]),
                                                        USER_OPTION_BUILD: str(kept[1]["run"])})
                spawner.user_options = {**user_options, "image": kept_build_key(obj, kept[1])}
        if obj is not None:
            spawner.environment = {**spawner.environment, **image_environment(obj)}
            await self.record_start(spawner, obj)


def groups_of(user) -> list[str]:
    """The JupyterHub group names of a hub user (jupyterhub.user.User or its orm row)."""
    return sorted(getattr(group, "name", str(group)) for group in (getattr(user, "groups", None) or []))


def hooks_for(spawner) -> CNBISpawnerHooks:
    """The hub's hooks instance, configured from the hub's config (`c.CNBISpawnerHooks`)."""
    return CNBISpawnerHooks.instance(config=spawner.config)


# Module-level entry points for config files: they find the hub's instance through the spawner.


async def profile_list(spawner):
    return await hooks_for(spawner).profile_list(spawner)


async def kubespawner_apply_user_options(spawner, user_options):
    return await hooks_for(spawner).kubespawner_apply_user_options(spawner, user_options)


def allowed_images(spawner):
    return hooks_for(spawner).allowed_images(spawner)


async def dockerspawner_options_form(spawner):
    return await hooks_for(spawner).dockerspawner_options_form(spawner)


async def dockerspawner_apply_user_options(spawner, user_options):
    return await hooks_for(spawner).dockerspawner_apply_user_options(spawner, user_options)


def configure_kubespawner(c, spawner_class: str = "KubeSpawner") -> None:
    """Set the cnbi hooks on KubeSpawner (or a subclass's config section) in config `c`."""
    section = c[spawner_class]
    section.profile_list = profile_list
    section.options_from_form = kubespawner_form_options
    section.apply_user_options = kubespawner_apply_user_options


def configure_dockerspawner(c, spawner_class: str = "DockerSpawner") -> None:
    """Set the cnbi hooks on DockerSpawner (or PodmanSpawner, ...) in config `c`."""
    section = c[spawner_class]
    section.allowed_images = allowed_images
    section.options_form = dockerspawner_options_form
    section.options_from_form = dockerspawner_form_options
    section.apply_user_options = dockerspawner_apply_user_options


def __getattr__(name):
    # PodmanSpawner moved to cnbi_hub.podmanspawner; configs naming
    # "cnbi_hub.spawner.PodmanSpawner" keep working, without importing docker for everyone else
    if name in ("PodmanSpawner", "PodmanService", "free_port_in", "DEFAULT_PODMAN_SOCKET"):
        from . import podmanspawner

        return getattr(podmanspawner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
