"""Who sees which image: hub admins (however the config was ordered), JupyterHub groups, the
owner, everyone else — through the real hub and the cnbi service process."""

from __future__ import annotations

import asyncio
import json

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from traitlets.config import Config

from cnbi_hub import model
from cnbi_hub.hubconfig import configure
from tests.hubfixtures import ADMIN

BASE = "quay.io/jupyter/minimal-notebook:2024-10-07"


async def hub_api(hub, method, path, token, body=None):
    request = HTTPRequest(
        hub.url + "hub/api/" + path, method=method, headers={"Authorization": f"token {token}"},
        body=json.dumps(body) if body is not None else None, allow_nonstandard_methods=True,
    )
    response = await AsyncHTTPClient().fetch(request, raise_error=False)
    assert response.code < 300, (method, path, response.code, response.body)
    return json.loads(response.body) if response.body else None


async def create(hub, token, display, package="tabulate"):
    body = {"metadata": {"annotations": {model.ANNOTATION_DISPLAY_NAME: display}},
            "spec": {"buildType": "PackageList", "baseImage": BASE, "packageVersions": [package]}}
    # dryRun-free create of an image that will fail to pull: sharing does not care about its phase
    r = await hub.api("POST", "api/images", token, body)
    assert r.code == 201, r.body
    return model.name_of(r.json())


def names(response) -> list[str]:
    return [model.name_of(o) for o in response.json()["items"]]


@pytest.fixture
async def cleanup(hub):
    made = []
    yield made
    admin = hub.token(ADMIN)
    for name in made:
        await hub.api("DELETE", f"api/images/{name}", admin)


@pytest.mark.parametrize("admin_users_first", [True, False])
def test_configure_leaves_hub_admins_to_the_hub_whatever_the_order(admin_users_first):
    """The role no longer copies Authenticator.admin_users: a snippet that sets admin_users after
    configure() (z2jh's order) and one that sets it before give the same config."""
    c = Config()
    if admin_users_first:
        c.Authenticator.admin_users = {"root-admin"}
    configure(c)
    if not admin_users_first:
        c.Authenticator.admin_users = {"root-admin"}
    role = [r for r in c.JupyterHub.load_roles if r["name"] == "cnbi-admin"][0]
    assert role["users"] == []  # nothing frozen at config time
    # what makes a hub admin a cnbi admin is read from the user model at each request
    service = [s for s in c.JupyterHub.services if s["name"] == "cnbi"][0]
    assert "custom:cnbi:admin" in service["oauth_client_allowed_scopes"]


async def test_a_hub_admin_made_after_configure_is_a_cnbi_admin(hub, cleanup):
    """An admin the hub learned of after configure() ran (set later in the config, or made
    admin through the hub's API): not in the cnbi-admin role, still sees everyone's images."""
    alice = hub.token("share-alice")
    cleanup.append(await create(hub, alice, "alice's private image"))
    await hub_api(hub, "POST", "users/late-admin", hub.token(ADMIN), {"admin": True})
    late_admin = hub.token("late-admin")
    settings = (await hub.api("GET", "api/settings", late_admin)).json()
    assert settings["user"] == {"name": "late-admin", "admin": True, "groups": []}
    listing = await hub.api("GET", "api/images", late_admin)
    assert cleanup[0] in names(listing)
    r = await hub.api("PATCH", f"api/images/{cleanup[0]}", late_admin, {"shared": True})
    assert r.code == 200 and model.is_shared(r.json())
    # and a user who is no admin still sees only their own
    assert (await hub.api("GET", "api/settings", alice)).json()["user"]["admin"] is False


async def test_sharing_with_a_group_reaches_its_members_only(hub, cleanup):
    admin = hub.token(ADMIN)
    # tokens first (they create the users); none is used before the groups are set, so the
    # service's short cache of each token's user model cannot hold an older group list
    owner, member, outsider = hub.token("grp-owner"), hub.token("grp-member"), hub.token("grp-outsider")
    await hub_api(hub, "POST", "groups/cnbi-team", admin)
    await hub_api(hub, "POST", "groups/cnbi-team/users", admin, {"users": ["grp-member", "grp-owner"]})
    await hub_api(hub, "POST", "groups/other-team", admin)
    await hub_api(hub, "POST", "groups/other-team/users", admin, {"users": ["grp-outsider"]})
    name = await create(hub, owner, "team image")
    cleanup.append(name)

    # before: private
    assert (await hub.api("GET", f"api/images/{name}", member)).code == 404
    # the owner may share with a group they are in, not with one they are not in, nor with everyone
    r = await hub.api("PATCH", f"api/images/{name}", owner, {"sharedWithGroups": ["other-team"]})
    assert r.code == 403 and r.json()["field"] == "sharedWithGroups" and "other-team" in r.json()["message"]
    assert (await hub.api("PATCH", f"api/images/{name}", owner, {"shared": True})).code == 403
    r = await hub.api("PATCH", f"api/images/{name}", owner, {"sharedWithGroups": ["bad name"]})
    assert r.code == 422 and r.json()["field"] == "sharedWithGroups[0]"
    r = await hub.api("PATCH", f"api/images/{name}", owner, {"sharedWithGroups": ["cnbi-team"]})
    assert r.code == 200, r.body
    assert model.shared_groups_of(r.json()) == ["cnbi-team"] and not model.is_shared(r.json())

    # a member sees it in the list and by name, and the spawn listing for them offers it
    assert (await hub.api("GET", "api/settings", member)).json()["user"]["groups"] == ["cnbi-team"]
    assert name in names(await hub.api("GET", "api/images", member))
    assert (await hub.api("GET", f"api/images/{name}", member)).code == 200
    # but may not change it
    assert (await hub.api("PATCH", f"api/images/{name}", member, {"displayName": "mine now"})).code == 403
    # anyone else: 404, as if it did not exist
    assert name not in names(await hub.api("GET", "api/images", outsider))
    assert (await hub.api("GET", f"api/images/{name}", outsider)).code == 404
    assert (await hub.api("GET", f"api/images/{name}/logs", outsider)).code == 404

    # what the spawner hooks ask for a user: visibleTo + the user's groups (admin-only query)
    hooks_view = await hub.api("GET", "api/images?visibleTo=grp-member&groups=cnbi-team", admin)
    assert name in names(hooks_view)
    hooks_view = await hub.api("GET", "api/images?visibleTo=grp-outsider&groups=other-team", admin)
    assert name not in names(hooks_view)

    # an admin may share with any group; [] unshares
    r = await hub.api("PATCH", f"api/images/{name}", admin, {"sharedWithGroups": ["other-team", "cnbi-team"]})
    assert model.shared_groups_of(r.json()) == ["cnbi-team", "other-team"]
    assert (await hub.api("GET", f"api/images/{name}", outsider)).code == 200
    r = await hub.api("PATCH", f"api/images/{name}", owner, {"sharedWithGroups": []})
    assert r.code == 200 and model.shared_groups_of(r.json()) == []
    assert (await hub.api("GET", f"api/images/{name}", member)).code == 404


async def test_a_client_cannot_create_an_image_already_shared(hub, cleanup):
    token = hub.token("grp-sneaky")
    body = {"metadata": {"annotations": {model.ANNOTATION_SHARED_WITH_GROUPS: "everyone-group",
                                         model.ANNOTATION_SHARED: "true"}},
            "spec": {"buildType": "PackageList", "baseImage": BASE, "packageVersions": ["six"]}}
    r = await hub.api("POST", "api/images", token, body)
    assert r.code == 201
    cleanup.append(model.name_of(r.json()))
    assert model.shared_groups_of(r.json()) == [] and not model.is_shared(r.json())


async def test_lists_are_newest_first(hub, cleanup):
    token = hub.token("order-user")
    for display in ("first", "second", "third"):
        cleanup.append(await create(hub, token, display))
        await asyncio.sleep(1.05)  # creationTimestamp has one-second resolution
    items = (await hub.api("GET", "api/images", token)).json()["items"]
    assert [model.display_name_of(o) for o in items] == ["third", "second", "first"]
