"""The service's browser pages (/services/cnbi/ and /services/cnbi/images/<name>) behind a real
JupyterHub: OAuth login with cookies, what each user sees, 404 for others' private images, escaping.

Images are written straight into the service's store (the `service_store` fixture), already
Ready or Failed, with a chosen creationTimestamp, build log and lock: the service's reconciler
only picks up Pending images, so none of them is ever built.
"""

from __future__ import annotations

import re
import secrets

import pytest
from jupyterhub import orm
from jupyterhub.tests.utils import AsyncSession, add_user

from cnbi_hub import model
from tests.hubfixtures import ADMIN

BASE = "localhost/cnbi/notebook-base:py311-user"
SCRIPT = '<script>alert("owned")</script>'
LOG = "STEP 1/3: FROM localhost/cnbi/notebook-base\n=== Run 2 · rebuild requested by alice ===\nok & done <3"
LOCK = "six==1.16.0 \\\n    --hash=sha256:1e61c37477a1626458e36f7b1d82aa5c9b094fa4802892072e49de9c60c4c926"


@pytest.fixture
def run_id():
    """A suffix for this test's image names, so leftovers of other tests never collide."""
    return secrets.token_hex(3)


@pytest.fixture
async def put_image(service_store, monkeypatch):
    """Write a finished image to the service's store; removed again after the test."""
    created = []

    async def put(owner, name, display_name, created_at, *, phase=model.PHASE_READY, shared=False,
                  groups=(), packages=("six==1.16.0",), log=None, lock=None, status=None):
        body = {
            "metadata": {"name": name, "annotations": {
                model.ANNOTATION_DISPLAY_NAME: display_name, model.ANNOTATION_DESCRIPTION: f"about {name}"}},
            "spec": {"buildType": "PackageList", "baseImage": BASE, "packageVersions": list(packages)},
        }
        obj = model.validate_new_object(body, creator=owner)
        annotations = obj["metadata"]["annotations"]
        if shared:
            annotations[model.ANNOTATION_SHARED] = "true"
        if groups:
            annotations[model.ANNOTATION_SHARED_WITH_GROUPS] = ",".join(sorted(groups))
        obj["status"] = {"phase": phase, "conditions": [], **(status or {})}
        if phase == model.PHASE_READY and "image" not in obj["status"]:
            obj["status"]["image"] = f"localhost/cnbi/{owner}/{name}@sha256:{'ab' * 32}"
        # the store stamps creationTimestamp with model.now_iso(): choose it, to order the list
        monkeypatch.setattr(model, "now_iso", lambda: created_at)
        stored = await service_store.create(obj)
        monkeypatch.undo()
        created.append(name)
        if log is not None:
            await service_store.put_artifact(name, "log", log)
        if lock is not None:
            await service_store.put_artifact(name, "lock", lock)
        return stored

    yield put
    for name in created:
        try:
            await service_store.delete(name)
        except Exception:
            pass


async def browser(hub, name: str) -> AsyncSession:
    """A browser session of `name`, logged in to the hub and (through OAuth) to the service."""
    cookies = await hub.app.login_user(name)
    session = AsyncSession()
    session.cookies.update(cookies)
    r = await session.get(hub.service_url)
    assert r.status_code == 200, r.text
    assert any("oauth_callback" in h.url for h in r.history)
    return session


def section(html: str, key: str) -> str:
    """The table of one section: 'mine', 'shared' or 'owner:<name>' ('' when absent)."""
    m = re.search(rf'<table[^>]*data-section="{re.escape(key)}".*?</table>', html, re.S)
    return m.group(0) if m else ""


def row_names(html: str) -> list[str]:
    return re.findall(r'<tr class="cnbi-image-row" data-name="([^"]+)"', html)


def only(names: list[str], wanted) -> list[str]:
    """`names` restricted to this test's images (the session's hub is shared with other tests)."""
    return [n for n in names if n in set(wanted)]


@pytest.fixture
async def images(put_image, run_id):
    """alice: two Ready images and a Failed one; bob: a private and a shared one."""
    n = {
        "alice_old": f"zz-alice-old-{run_id}",  # name order is the reverse of time order
        "alice_failed": f"mm-alice-failed-{run_id}",
        "alice_new": f"aa-alice-new-{run_id}",
        "bob_private": f"bob-private-{run_id}",
        "bob_shared": f"bob-shared-{run_id}",
    }
    await put_image("alice", n["alice_old"], "Old analysis", "2026-01-01T10:00:00Z", log=LOG, lock=LOCK,
                    packages=("six==1.16.0",),
                    status={"packages": [{"name": "six", "version": "1.16.0", "visible": True}],
                            "resolvedBaseImage": f"{BASE}@sha256:{'cd' * 32}"})
    await put_image("alice", n["alice_failed"], SCRIPT, "2026-01-02T10:00:00Z", phase=model.PHASE_FAILED,
                    packages=("nonexistent-pkg-cnbi==1",), log="resolving...\nerror: no solution",
                    status={"failedPhase": "Resolving", "conditions": [{
                        "type": model.CONDITION_ERROR_RESOLVING, "status": "True", "reason": "ResolutionFailed",
                        "message": "Because nonexistent-pkg-cnbi was not found in the package registry\n"
                                   "and you require nonexistent-pkg-cnbi==1, we can conclude <that> fails.",
                        "lastTransitionTime": "2026-01-02T10:00:05Z"}]})
    await put_image("alice", n["alice_new"], "New analysis", "2026-01-03T10:00:00Z")
    await put_image("bob", n["bob_private"], "Bob's secret image", "2026-01-02T12:00:00Z", log="bob's log")
    await put_image("bob", n["bob_shared"], "Bob's team image", "2026-01-01T12:00:00Z", shared=True)
    return n


async def test_list_page_shows_own_images_newest_first_and_shared_ones(hub, images):
    alice = await browser(hub, "alice")
    r = await alice.get(hub.service_url)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/html")
    html = r.text
    # the hub's look: its stylesheet, logo, and a way back to the hub
    assert 'href="/hub/static/css/style.min.css"' in html
    assert 'src="/hub/logo"' in html and 'href="/hub/home"' in html
    assert "Signed in as alice" in html
    # the way to Lab, where images are built
    assert re.search(r'<a id="open-lab"[^>]*href="/hub/user-redirect/lab"[^>]*>Open JupyterLab</a>', html)
    assert "Image Builder</strong> panel in JupyterLab" in html

    mine = section(html, "mine")
    assert only(row_names(mine), images.values()) == [
        images["alice_new"], images["alice_failed"], images["alice_old"]]
    assert "PackageList" in mine
    assert f'<a href="/services/cnbi/images/{images["alice_new"]}">New analysis</a>' in mine
    assert '<time datetime="2026-01-03T10:00:00Z">2026-01-03 10:00:00 UTC</time>' in mine
    assert re.search(r'class="badge text-bg-danger cnbi-phase" data-phase="Failed"', mine)
    assert re.search(r'class="badge text-bg-success cnbi-phase" data-phase="Ready"', mine)

    # bob's shared image is shared with alice; his private one appears nowhere
    assert only(row_names(section(html, "shared")), images.values()) == [images["bob_shared"]]
    assert "by bob" in section(html, "shared") and "shared with everyone" in section(html, "shared")
    assert images["bob_private"] not in html and "Bob&#39;s secret image" not in html
    assert 'id="all-users"' not in html and "All users' images" not in html and 'data-section="owner:' not in html

    # the stylesheet and logo links point at what the hub really serves
    for path in ("hub/static/css/style.min.css", "hub/logo"):
        assert (await alice.get(hub.url + path)).status_code == 200


async def test_admin_sees_all_users_images_grouped_by_owner(hub, images):
    admin = await browser(hub, ADMIN)
    html = (await admin.get(hub.service_url)).text
    assert re.search(r'<section id="all-users">\s*<h2>All users\' images</h2>', html)
    assert re.search(r'<h3[^>]*data-owner="alice"[^>]*>alice</h3>', html)
    assert re.search(r'<h3[^>]*data-owner="bob"[^>]*>bob</h3>', html)
    assert only(row_names(section(html, "owner:alice")), images.values()) == [
        images["alice_new"], images["alice_failed"], images["alice_old"]]
    # bob's shared image is under "Shared with me", his private one under his name: each once
    assert only(row_names(section(html, "owner:bob")), images.values()) == [images["bob_private"]]
    assert only(row_names(section(html, "shared")), images.values()) == [images["bob_shared"]]
    assert only(row_names(section(html, "mine")), images.values()) == []
    assert only(row_names(html), images.values()).count(images["bob_private"]) == 1
    # owners in alphabetical order
    assert html.index('data-owner="alice"') < html.index('data-owner="bob"')
    # and the admin opens anyone's image
    r = await admin.get(hub.service_url + f"images/{images['bob_private']}")
    assert r.status_code == 200 and "bob&#39;s log" in r.text


async def test_detail_page_shows_spec_status_log_lock_and_spawn_link(hub, images):
    alice = await browser(hub, "alice")
    name = images["alice_old"]
    r = await alice.get(hub.service_url + f"images/{name}")
    assert r.status_code == 200, r.text
    html = r.text
    assert '<span id="display-name">Old analysis</span>' in html
    assert 'data-phase="Ready"' in html
    assert f"about {name}" in html  # the description
    # spec: build type, base image (and its pinned digest), packages
    spec = html[html.index('id="spec"'):]
    assert "PackageList" in spec and f"<code>{BASE}</code>" in spec
    assert f"<code>{BASE}@sha256:{'cd' * 32}</code>" in spec
    assert "<code>six==1.16.0</code>" in spec
    # the image reference with its digest, and the packages manifest
    assert f'<code id="image-ref">localhost/cnbi/alice/{name}@sha256:{"ab" * 32}</code>' in html
    assert re.search(r'id="packages".*<td>six</td><td>1.16.0</td>', html, re.S)
    # log and lock, escaped, in <pre>
    assert re.search(r'<pre[^>]*id="log">STEP 1/3: FROM .*ok &amp; done &lt;3</pre>', html, re.S)
    assert "=== Run 2 · rebuild requested by alice ===" in html
    assert re.search(r'<pre[^>]*id="lock">six==1.16.0 \\\n    --hash=sha256:1e61c3', html)
    # Ready: start a server on it (the hub wants spawn options prefixed with opt-)
    assert f'href="/hub/spawn?opt-cnbi_image={name}"' in html
    assert "Start a server with this image" in html
    assert f'href="/services/cnbi/api/images/{name}"' in html


async def test_failed_image_shows_why_and_no_spawn_link(hub, images):
    alice = await browser(hub, "alice")
    r = await alice.get(hub.service_url + f"images/{images['alice_failed']}")
    assert r.status_code == 200
    html = r.text
    failure = html[html.index('id="failure"'):html.index("</div>", html.index('id="failure"'))]
    assert "The build failed in Resolving." in failure
    assert "Because nonexistent-pkg-cnbi was not found in the package registry\nand you require" in failure
    assert "we can conclude &lt;that&gt; fails." in failure
    assert "Start a server with this image" not in html and "spawn?opt-cnbi_image" not in html
    assert "error: no solution" in html
    assert 'id="lock-empty"' in html  # no lock was resolved


async def test_others_private_image_is_404_like_a_missing_one(hub, images):
    alice = await browser(hub, "alice")
    hidden = await alice.get(hub.service_url + f"images/{images['bob_private']}")
    missing = await alice.get(hub.service_url + "images/no-such-image-here")
    assert hidden.status_code == 404 and missing.status_code == 404
    assert hidden.headers["Content-Type"].startswith("text/html")
    assert "404 : Not Found" in hidden.text and 'href="/hub/static/css/style.min.css"' in hidden.text
    assert "Bob&#39;s secret image" not in hidden.text and "bob&#39;s log" not in hidden.text
    # the two pages differ only in the name asked for: nothing tells that bob's exists
    assert hidden.text.replace(images["bob_private"], "X") == missing.text.replace("no-such-image-here", "X")
    # a shared image of bob's is alice's to read
    shared = await alice.get(hub.service_url + f"images/{images['bob_shared']}")
    assert shared.status_code == 200 and "Bob&#39;s team image" in shared.text


async def test_display_names_are_escaped(hub, images):
    alice = await browser(hub, "alice")
    listing = (await alice.get(hub.service_url)).text
    detail = (await alice.get(hub.service_url + f"images/{images['alice_failed']}")).text
    escaped = "&lt;script&gt;alert(&#34;owned&#34;)&lt;/script&gt;"
    for html in (listing, detail):
        assert "<script" not in html.lower()
        assert escaped in html
    assert f"<title>{escaped} - JupyterHub</title>" in detail


async def test_image_shared_with_a_group_is_listed_for_its_members(hub, put_image, run_id):
    group_name = f"pages-team-{run_id}"
    db = hub.app.db
    for user in ("carol", "dave"):
        if not orm.User.find(db, user):
            add_user(db, hub.app, name=user)
    group = orm.Group(name=group_name)
    db.add(group)
    group.users.append(orm.User.find(db, "carol"))
    db.commit()
    name = f"bob-team-only-{run_id}"
    try:
        await put_image("bob", name, "Team image", "2026-01-04T10:00:00Z", groups=[group_name])
        carol = await browser(hub, "carol")
        shared = section((await carol.get(hub.service_url)).text, "shared")
        assert row_names(shared).count(name) == 1 and f"shared with {group_name}" in shared
        assert (await carol.get(hub.service_url + f"images/{name}")).status_code == 200
        dave = await browser(hub, "dave")
        assert name not in (await dave.get(hub.service_url)).text
        assert (await dave.get(hub.service_url + f"images/{name}")).status_code == 404
    finally:
        db.delete(group)
        db.commit()


async def test_pages_send_browsers_to_the_hub_login(hub, images):
    for path in ("", f"images/{images['alice_new']}"):
        r = await hub.api("GET", path)
        assert r.code == 302, path
        assert "/hub/api/oauth2/authorize" in r.headers["Location"]
