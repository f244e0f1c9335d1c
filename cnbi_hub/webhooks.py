"""Push webhooks from GitHub and GitLab, pure: verify a delivery, read the push, and say which
GitRepository images track the pushed branch. The service's handler (service/handlers.py)
does the I/O: it reads the request, asks here, and starts the rebuilds through the store.

GitHub signs each delivery's body with HMAC-SHA256 under the hook's secret
(`X-Hub-Signature-256: sha256=<hex>`); GitLab sends the hook's secret token itself
(`X-Gitlab-Token`). Both are compared in constant time. Each delivery has an id
(`X-GitHub-Delivery`; GitLab's `X-Gitlab-Event-UUID`, or `Idempotency-Key` on newer GitLab)
that a redelivery repeats, so a repeat is recognised and ignored.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from . import model

PROVIDERS = ("github", "gitlab")
# how many triggers an image remembers (each a few hundred bytes of status)
MAX_REMEMBERED_TRIGGERS = 20
_SCP_LIKE = re.compile(r"^(?:[\w.-]+@)?(?P<host>[\w.-]+):(?P<path>(?!//)[^\s]+)$")


class WebhookRefused(Exception):
    """The delivery is not one to act on; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Push:
    """What a push delivery says: to which repository (every URL the host gives for it),
    which branch, from which commit to which, by whom."""

    provider: str
    delivery: str
    repository_urls: frozenset[str]
    branch: str
    before: str
    after: str
    default_branch: str
    pusher: str
    repository_name: str = ""
    deleted: bool = False
    extra: dict = field(default_factory=dict, compare=False)


def github_signature_valid(secret: str, body: bytes, header: str | None) -> bool:
    """Whether `X-Hub-Signature-256` is `sha256=` + HMAC-SHA256(secret, body), in constant time."""
    if not secret or not header or not header.startswith("sha256="):
        return False
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), header.strip().encode())


def gitlab_token_valid(secret: str, header: str | None) -> bool:
    """Whether `X-Gitlab-Token` is the hook's secret token, in constant time."""
    if not secret or not header:
        return False
    return hmac.compare_digest(secret.encode(), header.encode())


def delivery_id(provider: str, headers) -> str:
    """The delivery's id, which a redelivery repeats ("" when the sender gives none)."""
    if provider == "github":
        return headers.get("X-GitHub-Delivery", "")
    return headers.get("Idempotency-Key", "") or headers.get("X-Gitlab-Event-UUID", "")


def normalize_repository_url(url: str) -> str:
    """`host[:port]/path` without scheme, user, `.git` or trailing slashes, host lower-cased:
    the one form in which `https://github.com/Org/Repo.git`, `git@github.com:Org/Repo` and
    `http://github.com/Org/Repo/` compare equal (paths keep their case, as hosts treat them)."""
    text = (url or "").strip()
    scp = _SCP_LIKE.match(text) if "://" not in text else None
    if scp:
        host, path = scp.group("host"), scp.group("path")
    else:
        parts = urlsplit(text)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        path = parts.path
    path = path.strip("/")
    if path.endswith(".git"):
        path = path[:-4]
    return f"{host.lower()}/{path}" if host else ""


def parse_push(provider: str, event: str, payload: dict, delivery: str) -> Push | None:
    """The push in a delivery; None for events that are not pushes to a branch (pings, tags,
    issues...). Raises WebhookRefused(400) for a push whose payload lacks what a push has."""
    if provider == "github":
        if event != "push":
            return None
        repository = payload.get("repository") or {}
        urls = [repository.get(k) for k in ("clone_url", "git_url", "ssh_url", "html_url", "url", "svn_url")]
        default_branch = repository.get("default_branch") or repository.get("master_branch") or ""
        pusher = (payload.get("pusher") or {}).get("name") or (payload.get("sender") or {}).get("login") or ""
        name = repository.get("full_name") or ""
    elif provider == "gitlab":
        if event != "Push Hook" and payload.get("object_kind") != "push":
            return None
        project = payload.get("project") or {}
        repository = payload.get("repository") or {}
        urls = [project.get(k) for k in ("git_http_url", "git_ssh_url", "web_url", "http_url", "ssh_url", "url")]
        urls += [repository.get(k) for k in ("git_http_url", "git_ssh_url", "homepage", "url")]
        default_branch = project.get("default_branch") or ""
        pusher = payload.get("user_username") or payload.get("user_name") or ""
        name = project.get("path_with_namespace") or ""
    else:
        raise WebhookRefused(404, f"no webhooks from {provider}: only {', '.join(PROVIDERS)}")
    ref = payload.get("ref")
    after = payload.get("after") or payload.get("checkout_sha") or ""
    if not isinstance(ref, str) or not isinstance(after, str):
        raise WebhookRefused(400, "a push delivery needs 'ref' and 'after'")
    if not ref.startswith("refs/heads/"):
        return None  # a tag: images track branches
    normalized = frozenset(u for u in (normalize_repository_url(x) for x in urls if isinstance(x, str)) if u)
    if not normalized:
        raise WebhookRefused(400, "the push names no repository URL")
    return Push(
        provider=provider, delivery=delivery, repository_urls=normalized, branch=ref[len("refs/heads/"):],
        before=payload.get("before") or "", after=after, default_branch=default_branch, pusher=str(pusher),
        repository_name=str(name), deleted=bool(payload.get("deleted")) or set(after) == {"0"},
    )


def tracks(obj: dict, push: Push) -> bool:
    """Whether a GitRepository image follows the pushed branch of the pushed repository: its
    `gitRef` names that branch (`main` or `refs/heads/main`), or it has none and the branch is
    the repository's default. Images pinned to a commit or a tag follow nothing."""
    spec = obj.get("spec") or {}
    if spec.get("buildType") != "GitRepository":
        return False
    if normalize_repository_url(spec.get("repository", "")) not in push.repository_urls:
        return False
    ref = spec.get("gitRef") or ""
    if not ref:
        return bool(push.default_branch) and push.branch == push.default_branch
    return ref in (push.branch, f"refs/heads/{push.branch}")


def trigger_record(push: Push, obj: dict, now: str | None = None) -> dict:
    """What the image remembers of this trigger: what, which webhook, when, from -> to."""
    return {
        "kind": "webhook",
        "source": push.provider,
        "delivery": push.delivery,
        "at": now or model.now_iso(),
        "ref": f"refs/heads/{push.branch}",
        "from": (obj.get("status") or {}).get("gitCommit") or push.before,
        "to": push.after,
        "by": push.pusher,
    }


def remember_trigger(status: dict, trigger: dict) -> dict:
    """`status` with `trigger` appended to `status.triggers` (the newest MAX_REMEMBERED_TRIGGERS)."""
    return {**status, "triggers": (list(status.get("triggers", [])) + [trigger])[-MAX_REMEMBERED_TRIGGERS:]}
