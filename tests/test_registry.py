"""RegistryClient against real docker-registry processes (see tests/infra_registry.py)."""

import asyncio
import base64
import json
import socket
import time

import pytest

from cnbi_hub.controller.registry import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    ImageNotFound,
    ImageUnauthorized,
    RegistryClient,
    RegistryCredentials,
    RegistryError,
    RegistryUnreachable,
    credentials_for,
    parse_www_authenticate,
)
from cnbi_hub.imageref import parse_image_reference


def client_for(*registries, **kwargs) -> RegistryClient:
    return RegistryClient(insecure_registries=[r.host for r in registries], **kwargs)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "reference,media_type,platforms",
    [
        ("cnbi-test/hello:v1", OCI_MANIFEST, ["linux/amd64"]),
        ("cnbi-test/hello:docker", DOCKER_MANIFEST, ["linux/amd64"]),
        ("cnbi-test/arm:v1", OCI_MANIFEST, ["linux/arm64"]),
        ("cnbi-test/multi:v1", OCI_INDEX, ["linux/amd64", "linux/arm64"]),
        ("cnbi-test/multi:docker", DOCKER_MANIFEST_LIST, ["linux/amd64", "linux/arm64"]),
    ],
)
async def test_resolve_tag_to_digest(
    local_registry, registry_images, reference, media_type, platforms
):
    ref = parse_image_reference(f"{local_registry.host}/{reference}")
    resolved = await client_for(local_registry).resolve(ref)
    # skopeo is an independent reader of the same registry.
    assert resolved.digest == local_registry.skopeo_inspect(reference)["Digest"]
    assert resolved.digest == registry_images[reference]
    assert resolved.media_type == media_type
    assert resolved.platforms == platforms
    assert resolved.reference == ref
    assert (
        str(resolved.pinned) == f"{local_registry.host}/{reference.split(':')[0]}@{resolved.digest}"
    )


@pytest.mark.asyncio
async def test_resolve_by_digest_and_from_string(local_registry, registry_images):
    digest = registry_images["cnbi-test/multi:v1"]
    client = client_for(local_registry)
    resolved = await client.resolve(f"{local_registry.host}/cnbi-test/multi@{digest}")
    assert resolved.digest == digest
    assert resolved.platforms == ["linux/amd64", "linux/arm64"]


@pytest.mark.asyncio
async def test_missing_tag_is_not_found(local_registry, registry_images):
    ref = parse_image_reference(f"{local_registry.host}/cnbi-test/hello:no-such-tag")
    with pytest.raises(ImageNotFound) as excinfo:
        await client_for(local_registry).resolve(ref)
    message = str(excinfo.value)
    assert local_registry.host in message and "cnbi-test/hello:no-such-tag" in message
    assert excinfo.value.registry == local_registry.host


@pytest.mark.asyncio
async def test_missing_repository_is_not_found(local_registry, registry_images):
    ref = parse_image_reference(f"{local_registry.host}/cnbi-test/nothing-here:v1")
    with pytest.raises(ImageNotFound, match="nothing-here"):
        await client_for(local_registry).resolve(ref)


@pytest.mark.asyncio
async def test_unknown_digest_is_not_found(local_registry, registry_images):
    ref = parse_image_reference(f"{local_registry.host}/cnbi-test/hello@sha256:{'0' * 64}")
    with pytest.raises(ImageNotFound):
        await client_for(local_registry).resolve(ref)


@pytest.mark.asyncio
async def test_closed_port_is_unreachable_without_waiting_for_timeout():
    with socket.socket() as sock:  # bound but not listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        host = f"127.0.0.1:{sock.getsockname()[1]}"
        client = RegistryClient(insecure_registries=[host], timeout=30)
        started = time.monotonic()
        with pytest.raises(RegistryUnreachable) as excinfo:
            await client.resolve(f"{host}/cnbi-test/hello:v1")
        # Refused must be reported as such, not after the 30 s timeout.
        assert time.monotonic() - started < 10
    assert host in str(excinfo.value)
    assert isinstance(excinfo.value, RegistryError)


@pytest.mark.asyncio
async def test_silent_server_times_out_as_unreachable():
    with socket.socket() as sock:  # listening, never answering: the kernel completes connects
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        host = f"127.0.0.1:{sock.getsockname()[1]}"
        client = RegistryClient(insecure_registries=[host], timeout=0.5)
        with pytest.raises(RegistryUnreachable, match="[Tt]imeout"):
            await client.resolve(f"{host}/cnbi-test/hello:v1")


@pytest.mark.asyncio
async def test_https_to_plain_http_registry_hints_insecure_registries(local_registry):
    client = RegistryClient()  # 127.0.0.1:PORT not declared insecure: https is tried
    assert client.timeout == 10
    with pytest.raises(RegistryUnreachable, match="insecure_registries"):
        await client.resolve(f"{local_registry.host}/cnbi-test/hello:v1")


@pytest.mark.asyncio
async def test_exists(local_registry, registry_images):
    client = client_for(local_registry)
    found = await client.exists(f"{local_registry.host}/cnbi-test/multi:v1")
    assert found == {
        "exists": True,
        "digest": registry_images["cnbi-test/multi:v1"],
        "platforms": ["linux/amd64", "linux/arm64"],
    }
    missing = await client.exists(f"{local_registry.host}/cnbi-test/multi:v404")
    assert missing == {"exists": False, "digest": None, "platforms": []}


# -- Basic auth (htpasswd) ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_basic_auth_registry_without_credentials_is_unauthorized(auth_registry):
    with pytest.raises(ImageUnauthorized) as excinfo:
        await client_for(auth_registry).resolve(f"{auth_registry.host}/cnbi-test/hello:v1")
    assert "pull secret" in str(excinfo.value) and auth_registry.host in str(excinfo.value)


@pytest.mark.asyncio
async def test_basic_auth_registry_with_credentials_resolves(auth_registry):
    ref = parse_image_reference(f"{auth_registry.host}/cnbi-test/hello:v1")
    auth = credentials_for(ref.registry, [auth_registry.auth_json])
    assert auth == RegistryCredentials(*auth_registry.credentials)
    resolved = await client_for(auth_registry).resolve(ref, auth=auth)
    assert resolved.digest == auth_registry.images["cnbi-test/hello:v1"]
    assert resolved.platforms == ["linux/amd64"]  # the config blob was read with the same auth


@pytest.mark.asyncio
async def test_basic_auth_registry_with_wrong_password_is_unauthorized(auth_registry):
    with pytest.raises(ImageUnauthorized, match="given credentials"):
        await client_for(auth_registry).resolve(
            f"{auth_registry.host}/cnbi-test/hello:v1", auth=("cnbi-tester", "wrong")
        )


@pytest.mark.asyncio
async def test_exists_raises_when_unauthorized(auth_registry):
    # "Not allowed to look" is not "does not exist".
    with pytest.raises(ImageUnauthorized):
        await client_for(auth_registry).exists(f"{auth_registry.host}/cnbi-test/hello:v1")


# -- Bearer token auth ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_token_registry_without_credentials_is_unauthorized(token_registry):
    with pytest.raises(ImageUnauthorized, match="anonymous"):
        await client_for(token_registry).resolve(f"{token_registry.host}/cnbi-test/hello:v1")


@pytest.mark.asyncio
async def test_token_registry_with_credentials_resolves(token_registry):
    requests = token_registry.token_service.requests
    before = len(requests)
    auth = credentials_for(token_registry.host, [token_registry.auth_json])
    resolved = await client_for(token_registry).resolve(
        f"{token_registry.host}/cnbi-test/hello:v1", auth=auth
    )
    assert resolved.digest == token_registry.images["cnbi-test/hello:v1"]
    assert resolved.platforms == ["linux/amd64"]
    # One token, asked for pull on this repository, as this user, reused for the config blob.
    assert requests[before:] == [
        {
            "user": "cnbi-tester",
            "service": ["cnbi-test-registry"],
            "scope": ["repository:cnbi-test/hello:pull"],
        }
    ]


@pytest.mark.asyncio
async def test_token_registry_with_wrong_password_is_unauthorized(token_registry):
    with pytest.raises(ImageUnauthorized, match="rejected the credentials"):
        await client_for(token_registry).resolve(
            f"{token_registry.host}/cnbi-test/hello:v1", auth=("cnbi-tester", "wrong")
        )


@pytest.mark.asyncio
async def test_concurrent_resolves(local_registry, registry_images, token_registry):
    client = client_for(local_registry, token_registry)
    results = await asyncio.gather(
        client.resolve(f"{local_registry.host}/cnbi-test/hello:v1"),
        client.resolve(f"{local_registry.host}/cnbi-test/multi:docker"),
        client.resolve(
            f"{token_registry.host}/cnbi-test/hello:v1", auth=token_registry.credentials
        ),
    )
    assert [r.digest for r in results] == [
        registry_images["cnbi-test/hello:v1"],
        registry_images["cnbi-test/multi:docker"],
        token_registry.images["cnbi-test/hello:v1"],
    ]


# -- pure helpers ---------------------------------------------------------------------------


def _auth(user, password):
    return base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    "registry,repository,auth_jsons,expected",
    [
        (
            "127.0.0.1:5000",
            None,
            [{"auths": {"127.0.0.1:5000": {"auth": _auth("u", "p")}}}],
            ("u", "p"),
        ),
        ("127.0.0.1:5000", None, [{"auths": {"127.0.0.1": {"auth": _auth("u", "p")}}}], None),
        (
            "docker.io",
            None,
            [{"auths": {"https://index.docker.io/v1/": {"auth": _auth("d", "h")}}}],
            ("d", "h"),
        ),
        (
            "registry-1.docker.io",
            None,
            [{"auths": {"docker.io": {"auth": _auth("d", "h")}}}],
            ("d", "h"),
        ),
        ("quay.io", None, [{"auths": {"quay.io": {"username": "q", "password": "w"}}}], ("q", "w")),
        # a password may contain ':'
        ("quay.io", None, [{"auths": {"quay.io": {"auth": _auth("q", "a:b")}}}], ("q", "a:b")),
        # first file wins
        (
            "quay.io",
            None,
            [
                {"auths": {}},
                {"auths": {"quay.io": {"auth": _auth("1", "1")}}},
                {"auths": {"quay.io": {"auth": _auth("2", "2")}}},
            ],
            ("1", "1"),
        ),
        # namespace-scoped keys: most specific matching one wins, non-matching ignored
        (
            "quay.io",
            "org/team/img",
            [
                {
                    "auths": {
                        "quay.io": {"auth": _auth("host", "x")},
                        "quay.io/org": {"auth": _auth("org", "x")},
                        "quay.io/org/team": {"auth": _auth("team", "x")},
                        "quay.io/other": {"auth": _auth("other", "x")},
                    }
                }
            ],
            ("team", "x"),
        ),
        ("quay.io", "orgx/img", [{"auths": {"quay.io/org": {"auth": _auth("org", "x")}}}], None),
        ("quay.io", None, [{"auths": {"quay.io": {"auth": "!!notbase64"}}}], None),
        ("quay.io", None, [{"auths": {"quay.io": {"auth": _auth("", "")[:-4]}}}], None),
        ("quay.io", None, [{}, {"auths": "nonsense"}], None),
    ],
)
def test_credentials_for(registry, repository, auth_jsons, expected):
    assert credentials_for(registry, auth_jsons, repository=repository) == (
        RegistryCredentials(*expected) if expected else None
    )


def test_parse_www_authenticate():
    scheme, params = parse_www_authenticate(
        'Bearer realm="https://auth.example.com/token",service="registry.example.com",'
        'scope="repository:org/img:pull",error="insufficient_scope"'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.example.com/token",
        "service": "registry.example.com",
        "scope": "repository:org/img:pull",
        "error": "insufficient_scope",
    }
    assert parse_www_authenticate('Basic realm="x, y"') == ("basic", {"realm": "x, y"})
    assert parse_www_authenticate("") == ("", {})


# -- digests by HEAD, and pins that overlap ----------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("reference", ["cnbi-test/hello:v1", "cnbi-test/hello:docker", "cnbi-test/multi:v1",
                                       "cnbi-test/multi:docker"])
async def test_digest_of_agrees_with_resolve_and_skopeo(local_registry, registry_images, reference):
    client = client_for(local_registry)
    digest = await client.digest_of(f"{local_registry.host}/{reference}")
    assert digest == registry_images[reference] == local_registry.skopeo_inspect(reference)["Digest"]
    assert digest == (await client.resolve(f"{local_registry.host}/{reference}")).digest


@pytest.mark.asyncio
async def test_digest_of_a_missing_tag_says_what_resolve_says(local_registry, registry_images):
    # a HEAD's 404 has no body to tell tag from repository: the GET that follows does
    client = client_for(local_registry)
    for reference in ("cnbi-test/hello:nope", "cnbi-test/nothing-here:v1"):
        with pytest.raises(ImageNotFound) as by_head:
            await client.digest_of(f"{local_registry.host}/{reference}")
        with pytest.raises(ImageNotFound) as by_get:
            await client.resolve(f"{local_registry.host}/{reference}")
        assert str(by_head.value) == str(by_get.value) and reference in str(by_head.value)


@pytest.mark.asyncio
async def test_digest_of_a_token_registry_takes_one_token(token_registry):
    requests = token_registry.token_service.requests
    before = len(requests)
    digest = await client_for(token_registry).digest_of(f"{token_registry.host}/cnbi-test/hello:v1",
                                                        auth=token_registry.credentials)
    assert digest == token_registry.images["cnbi-test/hello:v1"]
    assert len(requests) == before + 1


@pytest.mark.asyncio
async def test_overlapping_pins_of_one_image_ask_the_registry_once(token_registry, tmp_path):
    from cnbi_hub.controller.imageaccess import ImageAccess

    auth_file = tmp_path / "auth.json"
    auth_file.write_text(json.dumps(token_registry.auth_json))
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "wrong.json").write_text(
        json.dumps({"auths": {token_registry.host: {"auth": _auth("cnbi-tester", "wrong")}}}))
    access = ImageAccess(auth_file=str(auth_file), pull_secrets_dir=str(secrets),
                         insecure_registries=[token_registry.host])
    requests = token_registry.token_service.requests
    before = len(requests)
    reference = f"{token_registry.host}/cnbi-test/hello:v1"
    pins = await asyncio.gather(*(access.pin(reference, None) for _ in range(20)))
    digest = token_registry.images["cnbi-test/hello:v1"]
    assert {p[1] for p in pins} == {digest} and {p[0] for p in pins} == {f"{reference.split(':v1')[0]}@{digest}"}
    assert len(requests) == before + 1  # one exchange for the twenty
    # nothing is kept once answered: the next pin asks again (a moved tag is seen at once)
    await access.pin(reference, None)
    assert len(requests) == before + 2
    # an image naming other credentials (its pull secret) never shares a request with these
    with_wrong_secret = {"spec": {"imagePullSecret": {"name": "wrong"}}}
    results = await asyncio.gather(access.pin(reference, None), access.pin(reference, with_wrong_secret),
                                   return_exceptions=True)
    assert results[0][1] == digest and isinstance(results[1], ImageUnauthorized), results
