"""The cnbi service behind a real JupyterHub: auth, ownership, validation, durability, events."""

import asyncio
import json
import os
import signal
import time

import pytest
import yaml
from jupyterhub.tests.utils import AsyncSession
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from cnbi_hub import model
from tests.hubfixtures import ADMIN

BASE = "quay.io/jupyter/minimal-notebook:2024-10-07"


def package_list(*packages, name=None, display=None):
    body = {"spec": {"buildType": "PackageList", "baseImage": BASE, "packageVersions": list(packages)}}
    meta = {}
    if name:
        meta["name"] = name
    if display:
        meta["annotations"] = {model.ANNOTATION_DISPLAY_NAME: display}
    if meta:
        body["metadata"] = meta
    return body


@pytest.fixture(scope="session")
def tokens(hub):
    return {name: hub.token(name) for name in ("alice", "bob", "carol", ADMIN)}


async def delete_all(hub, token):
    r = await hub.api("GET", "api/images", token)
    for obj in r.json()["items"]:
        await hub.api("DELETE", f"api/images/{obj['metadata']['name']}", token)


@pytest.fixture
async def clean(hub, tokens):
    yield
    await delete_all(hub, tokens[ADMIN])


async def test_health_needs_no_auth(hub):
    r = await hub.api("GET", "health")
    assert r.code == 200 and r.json()["status"] == "ok"


async def test_browser_flow_goes_through_hub_oauth(hub):
    first = await hub.api("GET", "")
    assert first.code == 302
    assert "/hub/api/oauth2/authorize" in first.headers["Location"]
    cookies = await hub.app.login_user("alice")
    session = AsyncSession()
    session.cookies.update(cookies)
    r = await session.get(hub.service_url)
    assert r.status_code == 200
    assert "Signed in as alice" in r.text
    # redirected through the hub's OAuth endpoint and back to the service's callback
    assert any("oauth2/authorize" in h.url for h in r.history)
    assert any("oauth_callback" in h.url for h in r.history)
    # the OAuth cookie then also authenticates API calls from the browser
    api = await session.get(hub.service_url + "api/images")
    assert api.status_code == 200 and api.json() == {"items": []}


async def test_cookie_authenticated_writes_need_the_xsrf_token(hub, tokens, clean):
    """A page on another site can make the browser send the service's cookie, never read it:
    a write that carries the cookie alone is refused and changes nothing."""
    session = AsyncSession()
    session.cookies.update(await hub.app.login_user("alice"))
    assert (await session.get(hub.service_url)).status_code == 200  # OAuth: the service's own cookie
    images = hub.service_url + "api/images"
    forged = await session.post(images, json=package_list("six", name="forged-image"))
    assert forged.status_code == 403, forged.text
    assert (await hub.api("GET", "api/images/forged-image", tokens["alice"])).code == 404

    xsrf = next(c.value for c in session.cookies if c.name == "_xsrf" and c.path.startswith("/services/cnbi"))
    created = await session.post(images, json=package_list("six", name="cookie-image"), headers={"X-XSRFToken": xsrf})
    assert created.status_code == 201, created.text
    for method, path, body in (("PATCH", "api/images/cookie-image", {"displayName": "forged"}),
                               ("DELETE", "api/images/cookie-image", None),
                               ("POST", "api/images/cookie-image/rebuild", None),
                               ("PUT", "api/credentials/forged", {"host": "example.org", "token": "t"})):
        forged = await session.request(method, hub.service_url + path, json=body)
        assert forged.status_code == 403, (method, path, forged.text)
        with_token = await session.request(method, hub.service_url + path, json=body, headers={"X-XSRFToken": "not-it"})
        assert with_token.status_code == 403, (method, path, with_token.text)
    kept = (await hub.api("GET", "api/images/cookie-image", tokens["alice"])).json()
    assert model.display_name_of(kept) != "forged"
    renamed = await session.patch(hub.service_url + "api/images/cookie-image", json={"displayName": "Mine"},
                                  headers={"X-XSRFToken": xsrf})
    assert renamed.status_code == 200 and model.display_name_of(renamed.json()) == "Mine", renamed.text
    assert (await hub.api("GET", "api/credentials", tokens["alice"])).json().get("items", []) == []
    # reads with the cookie alone are fine: they change nothing and another site cannot see them
    assert (await session.get(images)).status_code == 200


def test_the_request_log_never_holds_a_credential_sent_in_the_url():
    """A client may send its token as `?token=` (the hub accepts it) and the Lab panel's event
    stream sends `_xsrf`; the OAuth callback carries `code` and `state`. None reaches the log."""
    from tornado.httputil import HTTPServerRequest

    from cnbi_hub.service.app import CNBIService

    app = CNBIService()
    sent = {"/services/cnbi/api/images/x/events?token=cnbi-secret-1&_xsrf=2%7Ccnbi-secret-2&phase=Ready": 403,
            "/services/cnbi/oauth_callback?code=cnbi-secret-3&state=cnbi-secret-4": 302,
            "/services/cnbi/api/images?access_token=cnbi-secret-5": 200}
    import io
    import logging

    written = io.StringIO()
    app.log.addHandler(logging.StreamHandler(written))  # the service's log, wherever it goes
    app.log.setLevel("DEBUG")
    for uri, status in sent.items():
        handler = type("Handler", (), {"request": HTTPServerRequest(method="GET", uri=uri),
                                       "get_status": lambda self, status=status: status})()
        app._log_request(handler)
    # tornado's own lines (an uncaught error, an HTTPError's message) name the request too
    from cnbi_hub.service import handlers

    for handler_class in (handlers.BaseHandler, handlers.OAuthCallbackHandler, handlers.ImagesHandler):
        assert handler_class._request_summary is handlers.ScrubbedSummary._request_summary, handler_class
    for uri in sent:
        fake = type("Handler", (), {"request": HTTPServerRequest(method="GET", uri=uri)})()
        app.log.warning("%s", handlers.ScrubbedSummary._request_summary(fake))
    logged = written.getvalue()
    assert "cnbi-secret" not in logged, logged
    assert "events?token=[secret]&_xsrf=[secret]&phase=Ready" in logged and "code=[secret]&state=[secret]" in logged


async def test_token_without_scope_is_refused(hub, tokens):
    limited = hub.token("alice", scopes=["access:services!service=cnbi"])
    r = await hub.api("GET", "api/images", limited)
    assert r.code == 403
    assert "custom:cnbi:images" in r.json()["message"]
    anonymous = await hub.api("GET", "api/images")
    assert anonymous.code == 403
    assert (await hub.api("GET", "api/images", tokens["alice"])).code == 200


async def test_create_isolation_sharing_and_admin(hub, tokens, clean):
    alice, bob, admin = tokens["alice"], tokens["bob"], tokens[ADMIN]
    body = package_list("six", display="Alice's data science")
    # someone trying to create in another's name is overridden by the hub identity
    body["metadata"]["annotations"][model.ANNOTATION_CREATOR] = "bob"
    r = await hub.api("POST", "api/images", alice, body)
    assert r.code == 201, r.body
    obj = r.json()
    name = obj["metadata"]["name"]
    assert name.startswith("alice-s-data-science-")
    assert obj["status"]["phase"] == "Pending"
    assert model.creator_of(obj) == "alice"
    assert r.headers["Location"].endswith(f"/api/images/{name}")

    # bob cannot see alice's private image: 404, not 403
    assert (await hub.api("GET", f"api/images/{name}", bob)).code == 404
    assert (await hub.api("DELETE", f"api/images/{name}", bob)).code == 404
    assert (await hub.api("GET", f"api/images/{name}/events", bob)).code == 404
    assert (await hub.api("GET", "api/images", bob)).json()["items"] == []

    # only admins share
    r = await hub.api("PATCH", f"api/images/{name}", alice, {"shared": True})
    assert r.code == 403 and r.json()["field"] == "shared"
    r = await hub.api("PATCH", f"api/images/{name}", admin, {"shared": True})
    assert r.code == 200 and model.is_shared(r.json())

    # shared: bob reads it, cannot change it
    assert (await hub.api("GET", f"api/images/{name}", bob)).code == 200
    assert [model.name_of(o) for o in (await hub.api("GET", "api/images", bob)).json()["items"]] == [name]
    assert (await hub.api("PATCH", f"api/images/{name}", bob, {"displayName": "mine now"})).code == 403
    assert (await hub.api("DELETE", f"api/images/{name}", bob)).code == 403

    # the owner renames it
    r = await hub.api("PATCH", f"api/images/{name}", alice, {"displayName": "Renamed", "description": "d"})
    assert r.code == 200 and model.display_name_of(r.json()) == "Renamed"

    # admin lists everything, and filters by owner; non-admins may not filter by another owner
    await hub.api("POST", "api/images", bob, package_list("attrs", name="bobs-image"))
    everything = (await hub.api("GET", "api/images", admin)).json()["items"]
    assert {name, "bobs-image"} <= {model.name_of(o) for o in everything}
    assert {model.creator_of(o) for o in everything} >= {"alice", "bob"}
    only_bob = (await hub.api("GET", "api/images?owner=bob", admin)).json()["items"]
    assert [model.name_of(o) for o in only_bob] == ["bobs-image"]
    r = await hub.api("GET", "api/images?owner=bob", alice)
    assert r.code == 403 and r.json()["field"] == "owner"
    usable_by_bob = (await hub.api("GET", "api/images?visibleTo=bob", admin)).json()["items"]
    assert {model.name_of(o) for o in usable_by_bob} == {name, "bobs-image"}  # own + shared
    usable_by_carol = (await hub.api("GET", "api/images?visibleTo=carol", admin)).json()["items"]
    assert [model.name_of(o) for o in usable_by_carol] == [name]  # only the shared one
    r = await hub.api("GET", "api/images?visibleTo=bob", alice)
    assert r.code == 403 and r.json()["field"] == "visibleTo"
    # the filters narrow the list (the reconciler moves phases on, so filter on what it sets)
    for obj in (await hub.api("GET", "api/images", bob)).json()["items"]:
        phase = model.phase_of(obj)
        filtered = (await hub.api("GET", f"api/images?phase={phase}&buildType=PackageList", bob)).json()["items"]
        assert all(model.phase_of(o) == phase for o in filtered) or not filtered
    assert (await hub.api("GET", "api/images?buildType=ImageImport", bob)).json()["items"] == []

    # admin deletes alice's image
    assert (await hub.api("DELETE", f"api/images/{name}", admin)).code == 204
    assert (await hub.api("GET", f"api/images/{name}", alice)).code == 404


BAD_REQUESTS = [
    ({"spec": {"buildType": "PackageList", "baseImage": BASE, "packageVersions": ["numpy; rm -rf /"]}}, 422,
     "spec.packageVersions[0]"),
    ({"spec": {"buildType": "PackageList", "baseImage": BASE, "packageVersions": ["six", "--index-url=http://x"]}},
     422, "spec.packageVersions[1]"),
    ({"spec": {"buildType": "PackageList", "baseImage": BASE, "runtimeEnvironment": {"pythonVersion": "3.11"},
               "packageVersions": ["six"]}}, 422, "spec.baseImage"),
    ({"spec": {"buildType": "ImageImport"}}, 422, "spec.fromImage"),
    ({"spec": {"buildType": "GitRepository", "repository": "ssh://host/repo"}}, 422, "spec.repository"),
    ({"spec": {"buildType": "ImageImport", "fromImage": "x:y", "colour": "red"}}, 422, "spec.colour"),
    ({"metadata": {"name": "Ωmega"}, "spec": {"buildType": "ImageImport", "fromImage": "a/b"}}, 422, "metadata.name"),
    ([1, 2, 3], 422, None),
]


@pytest.mark.parametrize("body,status,field", BAD_REQUESTS)
async def test_bad_input_gets_4xx_with_field_and_stores_nothing(hub, tokens, body, status, field, clean):
    r = await hub.api("POST", "api/images", tokens["carol"], body)
    assert r.code == status, r.body
    error = r.json()
    assert error["message"]
    assert error.get("field") == field
    assert (await hub.api("GET", "api/images", tokens["carol"])).json()["items"] == []


PLAIN_MESSAGES = [
    (["pandas", "numpy", "pandas>=2"], "spec.packageVersions[2]", "pandas is already listed", "spec.packageVersions[0]"),
    (["numpy=="], "spec.packageVersions[0]", "a version is missing after ==", None),
    (["six", "numpy pandas"], "spec.packageVersions[1]",
     "'numpy pandas' looks like several packages: put one package on each line", None),
]


@pytest.mark.parametrize("packages,field,message,related", PLAIN_MESSAGES)
async def test_package_messages_are_plain_words_without_the_field_path(hub, tokens, packages, field, message,
                                                                       related, clean):
    body = {"spec": {"buildType": "PackageList", "baseImage": BASE, "packageVersions": packages}}
    r = await hub.api("POST", "api/images?dryRun=true", tokens["carol"], body)
    assert r.code == 422
    assert r.json() == {"message": message, "field": field, **({"relatedField": related} if related else {})}


@pytest.mark.parametrize("spec", [
    {"buildType": "GitRepository", "repository": "ssh://host/repo"},
    {"buildType": "GitRepository", "repository": "https://github.com/a/b", "gitRef": "--upload-pack=x"},
    {"buildType": "PackageList", "baseImage": BASE, "packageVersions": []},
    {"buildType": "ImageImport", "fromImage": "UPPER/case"},
])
async def test_no_message_starts_with_its_field_path(hub, tokens, spec, clean):
    r = await hub.api("POST", "api/images?dryRun=true", tokens["carol"], {"spec": spec})
    assert r.code == 422
    error = r.json()
    assert not error["message"].startswith(error["field"]), error
    assert error["message"].count("spec.") == 0, error


async def test_malformed_json_and_huge_bodies(hub, tokens, clean):
    r = await hub.api("POST", "api/images", tokens["carol"], raw=b"{not json")
    assert r.code == 400 and "JSON" in r.json()["message"]
    huge = json.dumps(package_list("six", display="x" * (10 * 1024 * 1024))).encode()
    r = await hub.api("POST", "api/images", tokens["carol"], raw=huge)
    assert r.code == 413
    assert (await hub.api("GET", "api/images", tokens["carol"])).json()["items"] == []


async def test_unicode_display_names_and_name_collisions(hub, tokens, clean):
    carol = tokens["carol"]
    r = await hub.api("POST", "api/images", carol, package_list("six", display="Données für 数据"))
    assert r.code == 201
    assert model.display_name_of(r.json()) == "Données für 数据"
    assert model.check_dns_label(r.json()["metadata"]["name"])
    r = await hub.api("POST", "api/images", carol, package_list("six", name="fixed-name"))
    assert r.code == 201
    r = await hub.api("POST", "api/images", tokens["alice"], package_list("six", name="fixed-name"))
    assert r.code == 409 and r.json()["field"] == "metadata.name"
    # same display name twice: two distinct generated names
    names = set()
    for _ in range(2):
        r = await hub.api("POST", "api/images", carol, package_list("six", display="Same"))
        names.add(r.json()["metadata"]["name"])
    assert len(names) == 2


async def test_dry_run_validates_without_storing(hub, tokens, clean):
    r = await hub.api("POST", "api/images?dryRun=true", tokens["carol"], package_list("six"))
    assert r.code == 200 and r.json()["spec"]["packageVersions"] == ["six"]
    assert (await hub.api("GET", "api/images", tokens["carol"])).json()["items"] == []


async def test_per_user_limit(hub, tokens, clean):
    carol = tokens["carol"]
    for i in range(5):  # the test hub allows 5
        assert (await hub.api("POST", "api/images", carol, package_list("six"))).code == 201
    r = await hub.api("POST", "api/images", carol, package_list("six"))
    assert r.code == 409 and "5 images" in r.json()["message"]
    # other users are not affected by carol's count
    assert (await hub.api("POST", "api/images", tokens["bob"], package_list("six"))).code == 201


async def test_cancel_stops_the_work_and_says_who(hub, tokens, clean):
    """An import whose registry accepts the connection and never answers hangs in Prepare:
    cancelling it ends Failed/Cancelled "cancelled by alice", the engine drops the registry
    connection (its work stopped), never overwrites the cancellation, and a second cancel is 409."""
    connected, dropped = asyncio.Event(), asyncio.Event()

    async def silent_registry(reader, writer):
        connected.set()
        await reader.read()  # until the client goes away
        dropped.set()
        writer.close()

    server = await asyncio.start_server(silent_registry, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        body = {"spec": {"buildType": "ImageImport", "fromImage": f"127.0.0.1:{port}/silent/image:1"}}
        name = (await hub.api("POST", "api/images", tokens["alice"], body)).json()["metadata"]["name"]
        await asyncio.wait_for(connected.wait(), 60)
        assert model.phase_of((await hub.api("GET", f"api/images/{name}", tokens["alice"])).json()) == "Prepare"
        assert (await hub.api("POST", f"api/images/{name}/cancel", tokens["bob"], {})).code == 404
        r = await hub.api("POST", f"api/images/{name}/cancel", tokens["alice"], {})
        assert r.code == 200, r.body
        obj = r.json()
        assert model.phase_of(obj) == "Failed" and obj["status"]["failedPhase"] == "Prepare"
        cancelled = [c for c in obj["status"]["conditions"] if c["reason"] == "Cancelled"]
        assert cancelled and cancelled[0]["message"] == "cancelled by alice"
        await asyncio.wait_for(dropped.wait(), 30)  # the engine's work on it stopped
        await asyncio.sleep(0.5)
        again = (await hub.api("GET", f"api/images/{name}", tokens["alice"])).json()
        assert model.phase_of(again) == "Failed" and again["status"]["conditions"] == obj["status"]["conditions"]
        logs = (await hub.api("GET", f"api/images/{name}/logs", tokens["alice"])).body.decode()
        assert "==> cancelled by alice" in logs
        r = await hub.api("POST", f"api/images/{name}/cancel", tokens["alice"], {})
        assert r.code == 409 and "already finished" in r.json()["message"]
    finally:
        server.close()


async def test_settings_tell_the_panel_about_named_servers(hub, tokens):
    r = await hub.api("GET", "api/settings", tokens["alice"])
    assert r.code == 200
    assert r.json() == {"namedServers": False,  # the test hub does not allow them
                        "user": {"name": "alice", "admin": False, "groups": []}}
    assert (await hub.api("GET", "api/settings", tokens[ADMIN])).json()["user"]["admin"] is True


async def test_base_images_lists_the_admin_choice(hub, tokens):
    r = await hub.api("GET", "api/base-images", tokens["alice"])
    assert r.code == 200
    assert r.json()["items"][0]["image"] == "localhost/cnbi/notebook-base:py311-user"


async def test_objects_survive_a_service_restart(hub, tokens, service_proc, clean):
    r = await hub.api("POST", "api/images", tokens["alice"], package_list("six", name="survivor"))
    assert r.code == 201
    old_pid = service_proc.proc.pid
    os.kill(old_pid, signal.SIGTERM)
    # the hub notices the managed service exited and starts it again
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        proc = service_proc.proc
        if proc is not None and proc.pid != old_pid:
            try:
                if (await hub.api("GET", "health", timeout=2)).code == 200:
                    break
            except Exception:
                pass
        await asyncio.sleep(0.3)
    else:
        pytest.fail("the service did not come back")
    assert service_proc.proc.pid != old_pid
    r = await hub.api("GET", "api/images/survivor", tokens["alice"])
    assert r.code == 200 and model.creator_of(r.json()) == "alice"


async def read_events(hub, token, name, received: list, stop_after: int, timeout: float = 20):
    """Follow the events stream, collecting (event, data, time) until `stop_after` events."""
    buffer = b""
    done = asyncio.get_running_loop().create_future()

    def on_chunk(chunk):
        nonlocal buffer
        buffer += chunk
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            lines = block.decode().split("\n")
            if lines[0].startswith(":"):
                received.append(("comment", lines[0], time.monotonic()))
                continue
            event = lines[0].split(": ", 1)[1]
            data = json.loads(lines[1].split(": ", 1)[1])
            received.append((event, data, time.monotonic()))
            if len([r for r in received if r[0] != "comment"]) >= stop_after and not done.done():
                done.set_result(None)

    request = HTTPRequest(
        hub.service_url + f"api/images/{name}/events",
        headers={"Authorization": f"token {token}"},
        streaming_callback=on_chunk,
        request_timeout=timeout,
    )
    fetch = asyncio.ensure_future(AsyncHTTPClient().fetch(request, raise_error=False))
    await asyncio.wait([fetch, done], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    return fetch


async def test_events_stream_current_object_changes_heartbeats_and_close(hub, tokens, clean):
    alice = tokens["alice"]
    name = (await hub.api("POST", "api/images", alice, package_list("six"))).json()["metadata"]["name"]
    received = []
    reader = asyncio.ensure_future(read_events(hub, alice, name, received, stop_after=10**6))
    while not received:
        await asyncio.sleep(0.05)
    assert received[0][0] == "object" and received[0][1]["metadata"]["name"] == name

    written_at = time.monotonic()
    r = await hub.api("PATCH", f"api/images/{name}", alice, {"displayName": "changed"})
    assert r.code == 200
    # the reconciler also writes status meanwhile: wait for the object event carrying our change
    def renamed():
        return [e for e in received if e[0] == "object" and model.display_name_of(e[1]) == "changed"]
    while not renamed():
        await asyncio.sleep(0.02)
        assert time.monotonic() - written_at < 1.0, "change not delivered within a second"
    assert renamed()[0][2] - written_at < 1.0

    await asyncio.sleep(1.5)  # the test hub's heartbeat interval is 1 s
    assert any(e[0] == "comment" and "heartbeat" in e[1] for e in received)

    assert (await hub.api("DELETE", f"api/images/{name}", alice)).code == 204
    fetch = await reader
    response = await asyncio.wait_for(fetch, 5)  # the stream closed cleanly
    assert response.code == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    assert received[-1][0] == "deleted"


async def test_openapi_document_is_valid_and_covers_every_route(hub):
    from openapi_spec_validator import validate

    r = await hub.api("GET", "api/openapi.yaml")
    assert r.code == 200
    document = yaml.safe_load(r.body)
    validate(document)
    documented = set(document["paths"])

    from cnbi_hub.service.app import CNBIService

    app = CNBIService()
    app.service_prefix = "/services/cnbi/"
    app.hub_auth = type("Auth", (), {"login_url": "/hub/login"})()
    tornado_app = app.make_tornado_app()
    registered = set()
    for rule in tornado_app.default_router.rules[0].target.rules:
        pattern = rule.matcher.regex.pattern.rstrip("$")
        path = pattern.replace("/services/cnbi", "", 1)
        path = path.replace("(?P<name>[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)", "{name}")
        path = path.replace("(?P<provider>[a-z]+)", "{provider}")
        registered.add(path if path not in ("/?", "") else "/")
    assert registered == documented, registered ^ documented


def _registered_routes() -> list[str]:
    """Every route the service registers, as a path under the service with sample parameters."""
    from cnbi_hub.service.app import CNBIService

    app = CNBIService()
    app.service_prefix = "/services/cnbi/"
    app.hub_auth = type("Auth", (), {"login_url": "/hub/login"})()
    paths = []
    for rule in app.make_tornado_app().default_router.rules[0].target.rules:
        pattern = rule.matcher.regex.pattern.rstrip("$").replace("/services/cnbi/", "", 1)
        pattern = pattern.replace("(?P<name>[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)", "someones-image")
        pattern = pattern.replace("(?P<provider>[a-z]+)", "github")
        paths.append("" if pattern in ("/?", "") else pattern)
    return paths


async def test_every_route_and_method_refuses_a_caller_without_hub_credentials(hub, tokens):
    """A walk over every registered route with every method, without a token or a login (and
    with a token without the image builder's scope): nothing answers but the health check, the
    API description, browser pages that send to the hub's login, and webhooks that want a
    signature; the rest is 403 (or 405 for a method the route does not have)."""
    public = {("GET", "health"): 200, ("GET", "api/openapi.yaml"): 200}
    no_scope = hub.token("walk-no-scope", scopes=["access:services!service=cnbi"])
    routes = _registered_routes()
    assert len(routes) >= 25 and "api/retention" in routes and "api/webhooks/github" in routes
    for path in routes:
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            body = {} if method in ("POST", "PUT", "PATCH") else None
            for token in (None, no_scope):
                r = await hub.api(method, path, token, body)
                where = (method, path, "no token" if token is None else "no scope", r.code, r.body[:200])
                if (method, path) in public:
                    assert r.code == public[(method, path)], where
                elif path.startswith("api/webhooks/") and method == "POST":
                    assert r.code == 401, where  # unsigned: refused before the body is read
                elif path == "oauth_callback":
                    assert r.code in (400, 403, 405), where  # no OAuth state: nothing is set
                elif r.code == 302:  # a page: the browser goes to the hub's OAuth (its login)
                    assert method == "GET" and token is None, where
                    assert r.headers["Location"].startswith("/hub/api/oauth2/authorize?client_id=service-cnbi"), where
                else:
                    assert r.code in (403, 405), where
                    assert b'"items"' not in r.body and b"someones-image" not in r.body, where


async def test_another_user_reaches_nothing_of_a_private_image_by_any_route(hub, tokens, clean):
    """A walk over every route that names an image, every method, as bob on alice's private
    image: 404 (or 405), never a word of hers, and her image, log and credential unchanged."""
    alice, bob = tokens["alice"], tokens["bob"]
    r = await hub.api("POST", "api/images", alice, package_list("six", name="alices-private-image",
                                                                display="alice-marker-display"))
    assert r.code == 201, r.body
    assert (await hub.api("PUT", "api/credentials/alices-cred", alice,
                          {"host": "git.example.org", "token": "alice-marker-token"})).code == 201
    before = (await hub.api("GET", "api/images/alices-private-image", alice)).json()
    routes = [path.replace("someones-image", "alices-private-image") for path in _registered_routes()
              if "someones-image" in path and path.startswith("api/images/")]
    assert {"api/images/alices-private-image/logs", "api/images/alices-private-image/lock",
            "api/images/alices-private-image/events", "api/images/alices-private-image/generations"} <= set(routes)
    for path in routes:
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            body = {} if method in ("POST", "PUT", "PATCH") else None
            if path.endswith("/rollback"):
                body = {"run": 1} if method == "POST" else body
            answer = await hub.api(method, path, bob, body)
            where = (method, path, answer.code, answer.body[:200])
            assert answer.code in (403, 404, 405), where
            assert b"alice" not in answer.body.replace(b"alices-private-image", b""), where
    # bob's credentials are his own: alice's name is free for him, and hers stays hers
    assert (await hub.api("GET", "api/credentials", bob)).json()["items"] == []
    assert (await hub.api("DELETE", "api/credentials/alices-cred", bob)).code == 404
    assert [c["name"] for c in (await hub.api("GET", "api/credentials", alice)).json()["items"]] == ["alices-cred"]
    after = (await hub.api("GET", "api/images/alices-private-image", alice)).json()
    assert model.display_name_of(after) == "alice-marker-display"
    assert after["metadata"]["uid"] == before["metadata"]["uid"] and "cancel" not in json.dumps(after["status"]).lower()
    assert (await hub.api("DELETE", "api/credentials/alices-cred", alice)).code == 204


async def test_an_image_on_another_names_one_you_may_use_and_closes_no_cycle(hub, tokens, clean):
    """`spec.baseImage: cnbi:<name>` stacks an image on another: that one must exist and be
    yours (or shared with you), and the stack must not lead back to the new image."""
    alice, bob = tokens["alice"], tokens["bob"]

    def on(parent, name=None):
        body = package_list("attrs", name=name)
        body["spec"]["baseImage"] = f"cnbi:{parent}"
        return body

    assert (await hub.api("POST", "api/images", alice, package_list("six", name="stack-bottom"))).code == 201
    r = await hub.api("POST", "api/images?dryRun=true", alice, on("stack-bottom"))
    assert r.code == 200 and r.json()["spec"]["baseImage"] == "cnbi:stack-bottom"
    for who, parent in ((alice, "no-such-image"), (bob, "stack-bottom")):  # missing, or not yours: same words
        r = await hub.api("POST", "api/images", who, on(parent))
        assert r.code == 422 and r.json()["field"] == "spec.baseImage", r.body
        assert r.json()["message"] == f"there is no image {parent} that you may build on"
    r = await hub.api("POST", "api/images", alice, on("Not_A_Name"))
    assert r.code == 422 and r.json()["field"] == "spec.baseImage" and "does not name an image" in r.json()["message"]

    # stack-middle on stack-bottom, pinned to that image (a uid sent by the client counts for nothing)
    bottom_uid = (await hub.api("GET", "api/images/stack-bottom", alice)).json()["metadata"]["uid"]
    forged = on("stack-bottom", "stack-middle")
    forged["metadata"]["annotations"] = {model.ANNOTATION_BASE_UID: "someone-elses-uid"}
    r = await hub.api("POST", "api/images", alice, forged)
    assert r.code == 201 and r.json()["metadata"]["annotations"][model.ANNOTATION_BASE_UID] == bottom_uid
    # stack-bottom deleted and made again on stack-middle: a cycle
    assert (await hub.api("DELETE", "api/images/stack-bottom", alice)).code == 204
    r = await hub.api("POST", "api/images", alice, on("stack-middle", "stack-bottom"))
    assert r.code == 422 and r.json()["field"] == "spec.baseImage", r.body
    assert "stack-bottom → stack-middle → stack-bottom" in r.json()["message"]
    assert (await hub.api("GET", "api/images/stack-bottom", alice)).code == 404  # nothing stored
    # shared with everyone, bob may build on it
    assert (await hub.api("PATCH", "api/images/stack-middle", tokens[ADMIN], {"shared": True})).code == 200
    assert (await hub.api("POST", "api/images?dryRun=true", bob, on("stack-middle"))).code == 200


async def test_usage_per_user_is_for_admins_and_starts_are_recorded_by_the_hooks_only(hub, tokens, clean):
    alice, bob, admin = tokens["alice"], tokens["bob"], tokens[ADMIN]
    r = await hub.api("POST", "api/images", alice, package_list("six==1.16.0", name="usage-one"))
    assert r.code == 201, r.body
    assert (await hub.api("GET", "api/usage", alice)).code == 403
    # a user cannot pretend a server started; the hooks (admins) can
    started = {"image": "localhost/cnbi/usage-one@sha256:" + "a" * 64}
    assert (await hub.api("POST", "api/images/usage-one/started", alice, started)).code == 403
    r = await hub.api("POST", "api/images/usage-one/started", admin, {"image": ""})
    assert r.code == 422 and r.json()["field"] == "image"
    assert (await hub.api("POST", "api/images/no-such-image/started", admin, started)).code == 404
    r = await hub.api("POST", "api/images/usage-one/started", admin, started)
    assert r.code == 200 and r.json()["status"]["lastStartedImage"] == started["image"]
    usage = (await hub.api("GET", "api/usage", admin)).json()["items"]
    mine = next(u for u in usage if u["user"] == "alice")
    assert mine["images"] >= 1 and mine["lastStartedAt"] == r.json()["status"]["lastStartedAt"]
    assert (await hub.api("GET", "api/usage", bob)).code == 403


async def test_a_user_over_the_bytes_quota_can_neither_build_nor_rebuild_until_they_delete(hub, service_store):
    from tests.hubfixtures import QUOTA_BYTES

    token = hub.token("quota-user")
    big = model.validate_new_object(package_list("six==1.16.0", name="quota-big"), creator="quota-user")
    big["status"] = {**model.initial_status(), "phase": "Ready", "image": "localhost/cnbi/q@sha256:" + "c" * 64,
                     "imageSize": QUOTA_BYTES + 5_000_000_000}
    await service_store.create(big)  # as if built: the store is the service's own database
    r = await hub.api("POST", "api/images", token, package_list("toolz==0.12.1"))
    assert r.code == 409, r.body
    assert "take 25.0 GB, this hub's limit is 20.0 GB" in r.json()["message"]
    r = await hub.api("POST", "api/images/quota-big/rebuild", token)
    assert r.code == 409 and "a rebuild keeps the build it replaces" in r.json()["message"]
    assert (await hub.api("GET", "api/images/quota-big", token)).json()["status"]["phase"] == "Ready"
    assert (await hub.api("DELETE", "api/images/quota-big", token)).code == 204
    r = await hub.api("POST", "api/images", token, package_list("toolz==0.12.1"))
    assert r.code == 201, r.body
    assert (await hub.api("DELETE", f"api/images/{r.json()['metadata']['name']}", token)).code == 204


async def test_the_api_waits_out_another_process_holding_the_database_lock(hub, tokens, clean):
    """Another process (a backup, sqlite3 on the command line) holds the write lock: a create
    waits for it, while the service keeps answering; nothing is lost."""
    import sqlite3

    other = sqlite3.connect(hub.data_dir / "cnbi.sqlite", timeout=30, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        create = asyncio.ensure_future(hub.api("POST", "api/images", tokens["alice"],
                                               package_list("six", display="made while locked")))
        await asyncio.sleep(1.5)
        assert not create.done()
        assert (await hub.api("GET", "health", timeout=5)).code == 200
        assert (await hub.api("GET", "api/images", tokens["alice"], timeout=5)).code == 200  # reads go on
    finally:
        other.execute("ROLLBACK")
        other.close()
    r = await create
    assert r.code == 201, r.body
    listed = (await hub.api("GET", "api/images", tokens["alice"])).json()["items"]
    assert [model.display_name_of(o) for o in listed if model.name_of(o) == r.json()["metadata"]["name"]] == [
        "made while locked"]
