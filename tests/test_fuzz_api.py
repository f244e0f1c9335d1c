"""The service's API fuzzed from its own description (schemathesis), through the hub's proxy, as
an authenticated user: a bounded number of generated requests per operation (valid and invalid
ones), and every answer must be no 5xx, a documented status, the documented content type and,
for JSON, match the documented schema."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from cnbi_hub import model
from tests.hubfixtures import ADMIN

#: generated requests per operation: enough to reach each validation branch, bounded for CI
MAX_EXAMPLES = int(os.environ.get("CNBI_FUZZ_EXAMPLES", "25"))
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
FUZZ_USER = "fuzz-user"


async def _schemathesis(hub, token: str, out: Path, *extra: str, config: str | None = None) -> dict:
    """One schemathesis run against the session hub's service; its report (JSON)."""
    return await run_schemathesis(hub.service_url, token, out, *extra, config=config)


async def run_schemathesis(service_url: str, token: str, out: Path, *extra: str, config: str | None = None) -> dict:
    """One schemathesis run against the cnbi API at `service_url` (the service, or a server's
    `cnbi/` forwarding to it), from the API description it serves; its report (JSON)."""
    report = out.with_suffix(".json")
    argv = [str(Path(sys.executable).parent / "schemathesis")]
    if config is not None:
        config_file = out.with_suffix(".toml")
        config_file.write_text(config)
        argv += ["--config-file", str(config_file)]
    argv += [
        "run", service_url + "api/openapi.yaml",
        "--url", service_url.rstrip("/"),
        "--header", f"Authorization: token {token}",
        "--checks", CHECKS,
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", "20261124",
        "--phases", "examples,coverage,fuzzing",
        "--generation-database", "none",
        "--request-timeout", "30",
        "--workers", "1",
        "--no-color",
        # an event stream never ends: its answers are tested in test_service
        "--exclude-path-regex", "/events$",
        "--report", "json", "--report-json-path", str(report),
        *extra,
    ]
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"})
    text = (await asyncio.wait_for(process.communicate(), 1500))[0].decode(errors="replace")
    out.write_text(text)  # every failure with a curl line that reproduces it
    print(text[-3000:])
    assert process.returncode == 0, text[-6000:]
    return json.loads(report.read_text())


async def test_fuzzed_requests_get_no_5xx_and_answers_match_the_api_description(hub, tmp_path):
    token, admin = hub.token(FUZZ_USER), hub.token(ADMIN)
    logs = Path(__file__).resolve().parent.parent / "test-output"
    logs.mkdir(exist_ok=True)
    # an image of the fuzzing user's, so the routes of one image reach past "not found"
    r = await hub.api("POST", "api/images", token, {
        "metadata": {"annotations": {model.ANNOTATION_DISPLAY_NAME: "fuzz target"}},
        "spec": {"buildType": "ImageImport", "fromImage": "localhost/cnbi/notebook-base:py311-user"}})
    assert r.code == 201, r.body
    target = model.name_of(r.json())

    runs = {
        # every operation on the user's own image (not its deletion: that comes with the next run)
        "own image": await _schemathesis(
            hub, token, logs / "fuzz-api-own-image.log", "--exclude-method", "DELETE",
            config=f'[parameters]\n"path.name" = "{target}"\n'),
        # the admins' routes, as an admin (retention's POST only as a dry run: test_generations)
        "admin": await _schemathesis(
            hub, admin, logs / "fuzz-api-admin.log", "--include-path-regex", "usage|metrics|retention|started",
            "--exclude-method", "POST"),
        # every operation, names and bodies generated (schemathesis also reuses names it was
        # given in answers, so this one may delete the image above)
        "user": await _schemathesis(hub, token, logs / "fuzz-api-user.log"),
    }
    for what, run in runs.items():
        cases = run["test_cases"]
        print(what, cases, run["operations"])
        assert run["complete"] and cases["with_failures"] == 0, (what, run)
        assert cases["generated"] >= 10 * run["operations"]["tested"] or what == "admin", (what, run)
    assert runs["user"]["operations"]["tested"] >= 25

    # nothing half-written: what the fuzzer created is whole
    listed = (await hub.api("GET", "api/images", token)).json()["items"]
    for obj in listed:
        assert model.creator_of(obj) == FUZZ_USER and obj["metadata"].get("uid")
        assert obj["spec"]["buildType"] in model.BUILD_TYPES, obj
    for obj in listed:  # leave the session's hub as it was
        assert (await hub.api("DELETE", f"api/images/{model.name_of(obj)}", token)).code in (200, 204)
