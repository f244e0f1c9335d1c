"""What a user installed into a running server, as requirements for a new image ("Save this
environment as an image").

Pure: the server extension lists the kernel environment's distributions (the same program the
acceptance checks run in an image) and compares them with a baseline — the image's manifest
(`status.packages` of the CustomNBImage the server runs on), or the list taken when the server
started, for servers on other images.
"""

from __future__ import annotations

from packaging.utils import canonicalize_name

from .controller.checks import PIP_LIST_PROGRAM

__all__ = ["PIP_LIST_PROGRAM", "environment_difference"]


def _by_name(packages: list[dict]) -> dict[str, dict]:
    out = {}
    for entry in packages:
        name, version = entry.get("name"), entry.get("version")
        if isinstance(name, str) and isinstance(version, str) and name:
            out[canonicalize_name(name)] = {"name": name, "version": version}
    return out


def environment_difference(baseline: list[dict], current: list[dict]) -> dict:
    """added / changed / removed distributions from `baseline` to `current` (both lists of
    `{name, version}`), and `requirements`: the added and changed ones pinned, in name order —
    what a PackageList image on the server's image must install to match `current`."""
    before, after = _by_name(baseline), _by_name(current)
    added = [after[k] for k in sorted(after) if k not in before]
    changed = [
        {"name": after[k]["name"], "from": before[k]["version"], "to": after[k]["version"]}
        for k in sorted(after)
        if k in before and before[k]["version"] != after[k]["version"]
    ]
    removed = [before[k] for k in sorted(before) if k not in after]
    requirements = [f"{p['name']}=={p['version']}" for p in added]
    requirements += [f"{p['name']}=={p['to']}" for p in changed]
    requirements.sort(key=lambda r: r.lower())
    return {"added": added, "changed": changed, "removed": removed, "requirements": requirements}
