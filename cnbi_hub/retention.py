"""Retention, pure: which kept builds have their image deleted from storage, and why.

An image keeps earlier Ready builds to go back to (generations.py). Retention deletes the image
of a kept build when the admin's policy says so — beyond the `keep` newest, unused for
`drop_unused_days`, or the oldest while the owner is over `max_bytes_per_user` — keeping its
record (packages, lock, commit, base digest) so what it was can still be read and built again.

It never deletes the current build of any image, nor any image a running server uses, nor one
that another image's current or kept build still names (identical inputs share one image), nor
one this service did not build (an import's image belongs to its registry). `plan` decides;
the edge (controller/retention.py) asks who uses what, deletes and writes the records.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

from . import model

DAY = 86400.0


@dataclass(frozen=True)
class Policy:
    #: how many kept builds of each image keep their image (0: none)
    keep: int
    #: a kept build no server started on for this many days loses its image (0: never)
    drop_unused_days: float = 0.0
    #: while an owner's builds take more bytes than this, their least recently used kept
    #: builds lose their image (0: no limit)
    max_bytes_per_user: int = 0


@dataclass(frozen=True)
class Removal:
    name: str  # the CustomNBImage
    owner: str
    run: int
    reference: str  # the kept build's image
    reason: str
    bytes: int = 0
    #: whether the image itself is deleted (several records of one image: each says so; the
    #: edge deletes it once); False for an image this service did not build: only the record
    #: is marked
    delete_image: bool = True


@dataclass
class Plan:
    removals: list[Removal] = field(default_factory=list)
    #: kept builds the policy would remove but a running server uses: (name, run, reference)
    in_use: list[tuple[str, int, str]] = field(default_factory=list)
    #: kept builds the policy would remove whose image something else names: left for later
    shared: list[tuple[str, int, str]] = field(default_factory=list)


def digest_of(reference: str | None) -> str:
    """The digest an image reference pins ("" for a tag): images are compared by digest, so a
    reference by another name (a pod's imageID, a registry alias) still counts."""
    return (reference or "").rpartition("@")[2] if "@" in (reference or "") else ""


def _seconds(timestamp: str | None) -> float | None:
    if not timestamp:
        return None
    try:
        return datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def last_used(record: dict) -> float:
    """When a kept build was last of use: a server's start on it, or else when it stopped being
    the current build (an older record without that: when it was built)."""
    times = [_seconds(record.get(key)) for key in ("lastStartedAt", "savedAt", "completionTime")]
    known = [t for t in times if t is not None]
    return max(known) if known else 0.0


def current_references(obj: dict) -> set[str]:
    """Digests an image needs: its current build and its base (an image of a stack stands on
    another's build); until a run ends Ready, also the build it replaces (servers start on that
    one meanwhile, and after a failed run) and the one it installs on top of (`layeredOn`)."""
    status = obj.get("status") or {}
    refs = {status.get("image"), status.get("resolvedBaseImage")}
    if model.phase_of(obj) != model.PHASE_READY:
        refs |= {status.get("rebuildOf"), (status.get("layeredOn") or {}).get("image")}
    return {digest_of(ref) for ref in refs if digest_of(ref)}


def beyond_keep_reason(keep: int) -> str:
    if keep == 0:
        return "this hub keeps no earlier build's image"
    return f"this hub keeps the images of the {keep} newest earlier build{'s' if keep != 1 else ''} only"


def plan(images: list[tuple[dict, dict[int, dict]]], in_use: set[str], policy: Policy, now: float,
         built_here, only_owner: str | None = None) -> Plan:
    """What to remove: `images` is each CustomNBImage with its saved generations ({run: record});
    `in_use` the digests running servers use; `built_here(obj, record)` whether a kept build's
    image is one this service built (only those are deleted from storage). With `only_owner`,
    only that user's kept builds are considered (every image still protects what it names).

    A kept build whose image something else still names (another image's current or kept
    build: identical inputs share one image) is not removed now, and not marked: a later pass,
    once nothing names it, deletes it (`Plan.shared`)."""
    result = Plan()
    chosen: dict[tuple[str, int], str] = {}
    candidates: list[tuple[dict, int, dict]] = []  # every stored kept build: they all protect
    for obj, saved in images:
        considered = only_owner is None or model.creator_of(obj) == only_owner
        stored = sorted(run for run, r in saved.items() if not r.get("removed") and r.get("image"))
        for index, run in enumerate(reversed(stored)):
            candidates.append((obj, run, saved[run]))
            if not considered:
                continue
            if index >= policy.keep:
                chosen[(model.name_of(obj), run)] = beyond_keep_reason(policy.keep)
            elif policy.drop_unused_days > 0 and now - last_used(saved[run]) > policy.drop_unused_days * DAY:
                chosen[(model.name_of(obj), run)] = f"no server started on it for {policy.drop_unused_days:g} days"

    if policy.max_bytes_per_user > 0:
        _over_quota(images, candidates, chosen, policy.max_bytes_per_user, in_use, only_owner)

    # what stays named by something: every current run, every kept build not chosen now
    named: set[str] = set()
    for obj, _ in images:
        named |= current_references(obj)
    for obj, run, record in candidates:
        if (model.name_of(obj), run) not in chosen:
            named.add(digest_of(record.get("image")))
    for obj, run, record in candidates:
        reason = chosen.get((model.name_of(obj), run))
        if reason is None:
            continue
        reference, digest = record["image"], digest_of(record["image"])
        if digest in in_use:
            result.in_use.append((model.name_of(obj), run, reference))
            continue
        ours = bool(digest) and built_here(obj, record)
        if ours and digest in named:
            result.shared.append((model.name_of(obj), run, reference))
            continue
        result.removals.append(Removal(
            name=model.name_of(obj), owner=model.creator_of(obj), run=run, reference=reference, reason=reason,
            bytes=int(record.get("imageSize") or 0), delete_image=ours))
    return result


def _over_quota(images, candidates, chosen, limit: int, in_use: set[str], only_owner: str | None) -> None:
    """Mark, per owner over `limit`, the least recently used kept builds for removal until the
    owner's bytes (current builds and kept ones that keep their image) are within it."""
    used: dict[str, int] = {}
    for obj, _ in images:
        if model.phase_of(obj) == model.PHASE_READY:
            owner = model.creator_of(obj)
            used[owner] = used.get(owner, 0) + int((obj.get("status") or {}).get("imageSize") or 0)
    for obj, run, record in candidates:
        if (model.name_of(obj), run) not in chosen:
            owner = model.creator_of(obj)
            used[owner] = used.get(owner, 0) + int(record.get("imageSize") or 0)
    oldest_first = sorted(candidates, key=lambda c: (last_used(c[2]), c[1]))
    for obj, run, record in oldest_first:
        owner, key = model.creator_of(obj), (model.name_of(obj), run)
        if only_owner is not None and owner != only_owner:
            continue
        if used.get(owner, 0) <= limit or key in chosen or digest_of(record.get("image")) in in_use:
            continue
        chosen[key] = f"its owner's images took {used[owner] / 1e9:.1f} GB, over this hub's {limit / 1e9:.1f} GB"
        used[owner] -= int(record.get("imageSize") or 0)
