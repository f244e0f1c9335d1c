"""Spawner hooks against a real hub and cnbi service: the real KubeSpawner class renders its form
from our profile_list, and real DockerSpawner/PodmanSpawner instances resolve allowed images."""

from __future__ import annotations

import asyncio
import copy
import re
import socket

import pytest
from dockerspawner import DockerSpawner
from jupyterhub import orm
from jupyterhub.tests.utils import add_user
from tornado import web
from traitlets.config import Config

from cnbi_hub import model
from cnbi_hub.spawner import (
    LABEL_IMAGE,
    CNBISpawnerHooks,
    PodmanSpawner,
    configure_dockerspawner,
    configure_kubespawner,
)

MINIMAL = "quay.io/jupyter/minimal-notebook:2024-10-07"
ADMIN_PROFILES = [
    {"display_name": "Minimal (admin)", "slug": "minimal", "description": "The admin's own choice",
     "kubespawner_override": {"image": MINIMAL}},
]


def make_hooks(hub, **traits) -> CNBISpawnerHooks:
    """Hooks configured as hubconfig.configure left them in the hub's config, plus `traits`."""
    traits.setdefault("admin_profiles", ADMIN_PROFILES)
    traits.setdefault("cache_seconds", 0)
    return CNBISpawnerHooks(config=hub.app.config, **traits)


def real_user(hub, name):
    orm_user = orm.User.find(hub.app.db, name) or add_user(hub.app.db, hub.app, name=name)
    return hub.app.users[orm_user]


def profile_slugs(form: str) -> list[str]:
    return re.findall(r'name="profile"\s+id="profile-item-([^"]+)"', form)


@pytest.fixture
async def three_images(make_ready_image):
    """kalice's private image, kbob's private image, kcarol's image shared with everyone."""
    alice_img = await make_ready_image("kalice", "Pandas lab", packages=["pandas==2.2.3", "six==1.16.0"],
                                       description="Data frames")
    bob_img = await make_ready_image("kbob", "Bobs secret", packages=["attrs==24.2.0"])
    shared_img = await make_ready_image("kcarol", "Shared <b>stats</b>", packages=["scipy==1.14.1"],
                                        shared=True, description="<script>alert(1)</script>")
    return alice_img, bob_img, shared_img


async def test_kubespawner_form_offers_admin_profiles_then_own_and_shared_images(hub, three_images, make_kubespawner):
    alice_img, bob_img, shared_img = three_images
    spawner = make_kubespawner("kalice", make_hooks(hub))
    form = await spawner.get_options_form()

    slugs = profile_slugs(form)
    alice_slug, shared_slug = f"cnbi-{model.name_of(alice_img)}", f"cnbi-{model.name_of(shared_img)}"
    assert slugs[0] == "minimal"  # the admin's profile first
    assert set(slugs[1:]) == {alice_slug, shared_slug}
    assert f"cnbi-{model.name_of(bob_img)}" not in form and "Bobs secret" not in form
    assert "Pandas lab" in form and "pandas 2.2.3" in form and "Data frames" in form
    assert "Shared by kcarol" in form
    # user-written texts reach other users' forms: they must arrive escaped
    assert "<script>alert" not in form and "&lt;script&gt;alert(1)" in form
    assert "<b>stats</b>" not in form and "Shared &lt;b&gt;stats&lt;/b&gt;" in form
    assert "cnbi-notice" not in form  # the service answered

    # the user picks their image on the form; the hub parses it and KubeSpawner applies it
    spawner.user_options = spawner.run_options_from_form({"profile": [alice_slug]})
    assert spawner.user_options == {"profile": alice_slug}
    await spawner.load_user_options()
    reference = alice_img["status"]["image"]
    assert "@sha256:" in reference and spawner.image == reference
    assert spawner.extra_labels[LABEL_IMAGE] == model.name_of(alice_img)
    env = spawner.get_env()
    assert env["CNBI_IMAGE"] == model.name_of(alice_img)
    assert env["JUPYTER_IMAGE"] == reference


async def test_kubespawner_refuses_someone_elses_private_image(hub, three_images, make_kubespawner):
    alice_img, bob_img, _ = three_images
    spawner = make_kubespawner("kbob", make_hooks(hub))
    spawner.user_options = spawner.run_options_from_form({"profile": [f"cnbi-{model.name_of(alice_img)}"]})
    with pytest.raises(ValueError, match="No such profile"):
        await spawner.load_user_options()
    assert spawner.image != alice_img["status"]["image"]
    # the REST/query option names the image: a clear 404 before anything starts
    with pytest.raises(web.HTTPError) as e:
        await spawner._run_apply_user_options({"cnbi_image": model.name_of(alice_img)})
    assert e.value.status_code == 404


async def test_kubespawner_one_profile_layout_chooses_the_image_as_an_option(hub, three_images, make_kubespawner):
    alice_img, _, shared_img = three_images
    spawner = make_kubespawner("kalice", make_hooks(hub, layout="one-profile"))
    form = await spawner.get_options_form()
    assert profile_slugs(form) == ["minimal", "cnbi-images"]
    select = re.search(r'<select name="profile-option-cnbi-images--image".*?</select>', form, re.S).group(0)
    assert set(re.findall(r'<option value="([^"]+)"', select)) == {model.name_of(alice_img), model.name_of(shared_img)}

    form_data = {"profile": ["cnbi-images"], "profile-option-cnbi-images--image": [model.name_of(shared_img)]}
    spawner.user_options = spawner.run_options_from_form(form_data)
    await spawner.load_user_options()
    assert spawner.image == shared_img["status"]["image"]
    assert spawner.environment["CNBI_IMAGE"] == model.name_of(shared_img)


@pytest.mark.parametrize("layout", ["profile-per-image", "one-profile"])
async def test_kubespawner_cnbi_image_option_from_query_or_rest_starts_that_image(hub, three_images, make_kubespawner, layout):
    _, _, shared_img = three_images
    name = model.name_of(shared_img)
    spawner = make_kubespawner("kalice", make_hooks(hub, layout=layout))
    # /hub/spawn?cnbi_image=<name>: JupyterHub hands the query to options_from_query
    assert spawner.options_from_query({"cnbi_image": [name]}) == {"cnbi_image": name}
    # REST: POST /hub/api/users/kalice/server {"cnbi_image": name} sets user_options as given;
    # the hub then runs apply_user_options before start, which loads the profile
    spawner.user_options = {"cnbi_image": name}
    await spawner._run_apply_user_options(spawner.user_options)
    await spawner.load_user_options()
    assert spawner.image == shared_img["status"]["image"]
    assert spawner.environment["JUPYTER_IMAGE"] == shared_img["status"]["image"]


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/services/cnbi/"


async def test_service_down_keeps_admin_profiles_with_a_notice(hub, three_images, make_kubespawner):
    hooks = make_hooks(hub, service_url=closed_port_url())
    spawner = make_kubespawner("kalice", hooks)
    form = await spawner.get_options_form()
    assert profile_slugs(form) == ["minimal"]
    assert "cnbi-notice" in form and "Custom images are not available right now" in form
    spawner.user_options = spawner.run_options_from_form({"profile": ["minimal"]})
    await spawner.load_user_options()
    assert spawner.image == MINIMAL
    with pytest.raises(web.HTTPError) as e:
        await spawner._run_apply_user_options({"cnbi_image": model.name_of(three_images[0])})
    assert e.value.status_code == 503


async def test_a_service_that_hangs_is_given_up_on(hub, make_kubespawner):
    # accepts connections and never answers: only the request timeout ends the wait
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/services/cnbi/"
        spawner = make_kubespawner("kalice", make_hooks(hub, service_url=url, request_timeout=0.5))
        form = await asyncio.wait_for(spawner.get_options_form(), timeout=20)
    assert profile_slugs(form) == ["minimal"] and "cnbi-notice" in form


async def test_listing_is_cached_for_cache_seconds(hub, make_ready_image, make_kubespawner):
    hooks = make_hooks(hub, cache_seconds=3600)
    spawner = make_kubespawner("kdave", hooks)
    assert profile_slugs(await spawner.get_options_form()) == ["minimal"]
    new = await make_ready_image("kdave", "Fresh")
    assert profile_slugs(await spawner.get_options_form()) == ["minimal"]  # still the cached list
    hooks.cache_seconds = 0
    assert profile_slugs(await spawner.get_options_form()) == ["minimal", f"cnbi-{model.name_of(new)}"]


async def test_config_file_entry_points_use_the_hubs_config(hub, three_images, kubeconfig_without_cluster):
    from kubespawner import KubeSpawner

    alice_img = three_images[0]
    c = copy.deepcopy(hub.app.config)
    c.CNBISpawnerHooks.admin_profiles = ADMIN_PROFILES
    configure_kubespawner(c)
    CNBISpawnerHooks.clear_instance()
    try:
        spawner = KubeSpawner(user=real_user(hub, "kalice"), hub=hub.app.hub, config=c)
        form = await spawner.get_options_form()
        assert profile_slugs(form)[0] == "minimal"
        assert f"cnbi-{model.name_of(alice_img)}" in profile_slugs(form)
        await spawner._run_apply_user_options(spawner.options_from_query({"cnbi_image": [model.name_of(alice_img)]}))
        await spawner.load_user_options()
        assert spawner.image == alice_img["status"]["image"]
    finally:
        CNBISpawnerHooks.clear_instance()


@pytest.mark.parametrize("spawner_class", [DockerSpawner, PodmanSpawner])
async def test_dockerspawner_allowed_images_and_cnbi_image_option(hub, three_images, spawner_class):
    alice_img, bob_img, shared_img = three_images
    base = "localhost/cnbi/notebook-base:py311-user"
    c = copy.deepcopy(hub.app.config)
    c.CNBISpawnerHooks.admin_images = {"Notebook base": base}
    c.CNBISpawnerHooks.cache_seconds = 0
    configure_dockerspawner(c, spawner_class.__name__)
    CNBISpawnerHooks.clear_instance()
    try:
        spawner = spawner_class(user=real_user(hub, "kalice"), hub=hub.app.hub, config=c)
        form = await spawner.get_options_form()
        allowed = spawner._get_allowed_images()  # DockerSpawner's own evaluation of the callable
        assert list(allowed)[0] == "Notebook base" and allowed["Notebook base"] == base
        assert allowed[f"Pandas lab ({model.name_of(alice_img)})"] == alice_img["status"]["image"]
        assert shared_img["status"]["image"] in allowed.values()
        assert bob_img["status"]["image"] not in allowed.values()
        assert "&lt;b&gt;stats" in form and "<b>stats" not in form

        # the form posts a display key; DockerSpawner resolves it with check_allowed
        options = spawner.run_options_from_form({"image": [f"Pandas lab ({model.name_of(alice_img)})"]})
        await spawner._run_apply_user_options(options)
        assert await spawner.check_allowed(options["image"]) == alice_img["status"]["image"]
        assert spawner.environment["CNBI_IMAGE"] == model.name_of(alice_img)

        # ?cnbi_image=<name> (or REST user_options) names the image instead
        spawner = spawner_class(user=real_user(hub, "kalice"), hub=hub.app.hub, config=c)
        spawner.user_options = spawner.options_from_query({"cnbi_image": [model.name_of(shared_img)]})
        await spawner._run_apply_user_options(spawner.user_options)
        assert await spawner.check_allowed(spawner.user_options["image"]) == shared_img["status"]["image"]
        assert spawner.environment["JUPYTER_IMAGE"] == shared_img["status"]["image"]

        with pytest.raises(web.HTTPError) as e:
            await spawner._run_apply_user_options({"cnbi_image": model.name_of(bob_img)})
        assert e.value.status_code == 404
    finally:
        CNBISpawnerHooks.clear_instance()


async def test_dockerspawner_form_when_the_service_is_down(hub):
    c = Config()
    c.CNBISpawnerHooks.service_url = closed_port_url()
    c.CNBISpawnerHooks.api_token = "unused"
    c.CNBISpawnerHooks.admin_images = {"Notebook base": "localhost/cnbi/notebook-base:py311-user"}
    configure_dockerspawner(c, "PodmanSpawner")
    CNBISpawnerHooks.clear_instance()
    try:
        spawner = PodmanSpawner(user=real_user(hub, "kalice"), hub=hub.app.hub, config=c)
        form = await spawner.get_options_form()
        assert "cnbi-notice" in form and "Notebook base" in form
        assert spawner._get_allowed_images() == {"Notebook base": "localhost/cnbi/notebook-base:py311-user"}
    finally:
        CNBISpawnerHooks.clear_instance()


async def test_an_image_being_rebuilt_or_whose_rebuild_failed_starts_on_its_previous_build(
        hub, make_ready_image, make_kubespawner, service_store):
    """A rebuild (a push, a moved base, a schedule) never takes an image off the spawn form:
    while it works, and after it failed, servers start on the newest good build."""
    from cnbi_hub.controller.statemachine import advance, rebuilt, Outcome

    rebuilding = await make_ready_image("krebuild", "Rebuilding one")
    failed = await make_ready_image("krebuild", "Failed rebuild")
    never_built = await make_ready_image("krebuild", "Never built")
    for obj, outcome in ((rebuilding, None), (failed, Outcome(False, "BuildFailed", "no"))):
        # Building, not Pending: the hub's own engine drives only what it sees begin
        status = {**rebuilt(obj, "a test"), "phase": model.PHASE_BUILDING}
        if outcome is not None:
            status = advance({**obj, "status": status}, outcome)
        await service_store.update_status(model.name_of(obj), status)
    first_failed = {**never_built["status"], "phase": model.PHASE_FAILED}
    first_failed.pop("image")
    await service_store.update_status(model.name_of(never_built), first_failed)

    spawner = make_kubespawner("krebuild", make_hooks(hub))
    form = await spawner.get_options_form()
    slugs = set(profile_slugs(form))
    assert {f"cnbi-{model.name_of(rebuilding)}", f"cnbi-{model.name_of(failed)}"} <= slugs
    assert f"cnbi-{model.name_of(never_built)}" not in slugs  # no build ever: nothing to start
    assert "Being rebuilt: starts on the previous build" in form
    assert "Its newest build failed: starts on the previous build" in form
    for obj in (rebuilding, failed):
        spawner.user_options = {"profile": f"cnbi-{model.name_of(obj)}"}
        await spawner.load_user_options()
        assert spawner.image == obj["status"]["image"]  # the build it had before the rebuild


async def _with_a_kept_build(service_store, obj: dict) -> str:
    """Give `obj` a kept run-1 build (as a rebuild would) and a current run 2; run 1's image."""
    from cnbi_hub import generations

    name = model.name_of(obj)
    old = f"localhost/cnbi/{name}@sha256:" + "1" * 64
    record = {"run": 1, "image": old, "completionTime": "2026-11-22T10:00:00Z", "packages": []}
    await service_store.put_artifact(name, "generations", generations.dump_saved({1: record}))
    current = await service_store.get(name)
    await service_store.update_status(name, {**current["status"], "run": 2})
    return old


@pytest.mark.parametrize("layout", ["profile-per-image", "one-profile"])
async def test_kubespawner_pins_a_kept_build_with_cnbi_build(hub, three_images, make_kubespawner, service_store,
                                                              layout):
    _, _, shared_img = three_images
    name = model.name_of(shared_img)
    old = await _with_a_kept_build(service_store, shared_img)
    spawner = make_kubespawner("kalice", make_hooks(hub, layout=layout))
    # /hub/spawn?cnbi_image=<name>&cnbi_build=1 (or REST user_options)
    options = spawner.options_from_query({"cnbi_image": [name], "cnbi_build": ["1"]})
    assert options == {"cnbi_image": name, "cnbi_build": "1"}
    spawner.user_options = options
    await spawner._run_apply_user_options(spawner.user_options)
    await spawner.load_user_options()
    assert spawner.image == old != shared_img["status"]["image"]
    assert spawner.environment["JUPYTER_IMAGE"] == old
    # the start is recorded: on the image (its last use) and with the server (the exact build)
    assert spawner.user_options["cnbi_started"] == old
    recorded = (await service_store.get(name))["status"]
    assert recorded["lastStartedImage"] == old and recorded["lastStartedAt"]
    # REST may send the run as a number; the same spawner object, used again without a pin
    # (the hub keeps one per server), starts the current build
    again = make_kubespawner("kalice", make_hooks(hub, layout=layout))
    again.user_options = {"cnbi_image": name, "cnbi_build": 1}
    await again._run_apply_user_options(again.user_options)
    await again.load_user_options()
    assert again.image == old
    again.user_options = {"cnbi_image": name}
    await again._run_apply_user_options(again.user_options)
    await again.load_user_options()
    assert again.image == shared_img["status"]["image"] == again.user_options["cnbi_started"]
    # without the pin, the same spawner class starts the current build
    plain = make_kubespawner("kalice", make_hooks(hub, layout=layout))
    plain.user_options = {"cnbi_image": name}
    await plain._run_apply_user_options(plain.user_options)
    await plain.load_user_options()
    assert plain.image == shared_img["status"]["image"]
    for build, status in (("9", 404), ("two", 400)):
        refused = make_kubespawner("kalice", make_hooks(hub, layout=layout))
        with pytest.raises(web.HTTPError) as e:
            await refused._run_apply_user_options({"cnbi_image": name, "cnbi_build": build})
        assert e.value.status_code == status, build


async def test_kubespawner_form_offers_an_images_kept_builds_and_records_each_start(
        hub, three_images, make_kubespawner, service_store):
    alice_img, _, shared_img = three_images
    name, slug = model.name_of(alice_img), f"cnbi-{model.name_of(alice_img)}"
    old = await _with_a_kept_build(service_store, alice_img)
    spawner = make_kubespawner("kalice", make_hooks(hub))
    form = await spawner.get_options_form()
    select = re.search(rf'<select name="profile-option-{slug}--cnbi_build".*?</select>', form, re.S).group(0)
    assert re.findall(r'<option value="([^"]+)"', select) == ["current", "1"]
    assert "Run 1, built 2026-11-22 10:00 UTC, an earlier build" in select
    assert f"profile-option-cnbi-{model.name_of(shared_img)}--cnbi_build" not in form  # it has none

    # the user picks run 1 on the form: that build starts, and the start is recorded on it
    form_data = {"profile": [slug], f"profile-option-{slug}--cnbi_build": ["1"]}
    spawner.user_options = spawner.run_options_from_form(form_data)
    assert spawner.user_options == {"profile": slug, "cnbi_build": "1"}
    await spawner._run_apply_user_options(spawner.user_options)
    await spawner.load_user_options()
    assert spawner.image == old and spawner.environment["JUPYTER_IMAGE"] == old
    assert spawner.user_options["cnbi_started"] == old
    assert (await service_store.get(name))["status"]["lastStartedImage"] == old

    # the default choice, and a plain profile choice, start the current build: recorded as well
    for choice in (["current"], None):
        plain = make_kubespawner("kalice", make_hooks(hub))
        data = {"profile": [slug], **({f"profile-option-{slug}--cnbi_build": choice} if choice else {})}
        plain.user_options = plain.run_options_from_form(data)
        await plain._run_apply_user_options(plain.user_options)
        await plain.load_user_options()
        assert plain.image == alice_img["status"]["image"] == plain.user_options["cnbi_started"], choice


async def test_dockerspawner_pins_a_kept_build_with_cnbi_build(hub, three_images, service_store):
    alice_img, _, _ = three_images
    name = model.name_of(alice_img)
    old = await _with_a_kept_build(service_store, alice_img)
    c = copy.deepcopy(hub.app.config)
    c.CNBISpawnerHooks.cache_seconds = 0
    configure_dockerspawner(c, "PodmanSpawner")
    CNBISpawnerHooks.clear_instance()
    try:
        spawner = PodmanSpawner(user=real_user(hub, "kalice"), hub=hub.app.hub, config=c)
        spawner.user_options = spawner.options_from_query({"cnbi_image": [name], "cnbi_build": ["1"]})
        await spawner._run_apply_user_options(spawner.user_options)
        assert await spawner.check_allowed(spawner.user_options["image"]) == old
        assert spawner.environment["JUPYTER_IMAGE"] == old

        # the form lists the earlier build under the image; choosing it there pins it the same way
        chooser = PodmanSpawner(user=real_user(hub, "kalice"), hub=hub.app.hub, config=c)
        form = await chooser.get_options_form()
        keys = re.findall(r'<option value="([^"]+)"', form)
        kept_key = next(k for k in keys if "— earlier build, run 1 of 2026-11-22 10:00 UTC" in k)
        assert kept_key.startswith(model.display_name_of(alice_img)) and kept_key.endswith(f"({name})")
        assert keys.index(kept_key) == keys.index(next(k for k in keys if k.endswith(f"({name})"))) + 1
        chooser.user_options = chooser.options_from_form({"image": [kept_key]})
        await chooser._run_apply_user_options(chooser.user_options)
        assert await chooser.check_allowed(chooser.user_options["image"]) == old
        assert chooser.environment["JUPYTER_IMAGE"] == old and chooser.user_options["cnbi_started"] == old
    finally:
        CNBISpawnerHooks.clear_instance()
