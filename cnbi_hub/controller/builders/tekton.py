"""Cluster mode's builder: each build is a Tekton PipelineRun running the shared build plan.

One PipelineRun per object, generation and run, named deterministically
(`cnbi-<name>-g<generation>-r<run>`, owned by the CustomNBImage), so an operator that is killed
and restarted finds the run it had started instead of creating a second one. Its `Succeeded`
condition is read with Tekton's semantics: Unknown while it runs, True when done, False with
Tekton's reason (Failed, Cancelled, PipelineRunTimeout, CreateRunFailed, ...) and message.

The plan travels in a ConfigMap bound as the pipeline's `plan` workspace (see
manifests/tekton.yaml); the validation task runs the built image itself and prints one JSON
line per acceptance check, which this builder reads from the step's log. Base images are
inspected with a one-step TaskRun on the image (cached per digest).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import time
from pathlib import Path

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from traitlets import Bool, Float, Unicode, default

from ... import model
from ...credentials import GitCredential
from ...kubeclient import api_client, api_message, retrying, transient
from ..buildplan import BuildPlan, images_named_by
from ..checks import Check
from .base import BaseImageInfo, BuildError, Builder, LogFn, PullAccess, StoredImage
from .podman import _FIND_PYTHON, _INSPECT_PROGRAM

TEKTON_GROUP, TEKTON_VERSION = "tekton.dev", "v1"
LABEL_BUILD = f"{model.PREFIX}/build"
LABEL_IMAGE = f"{model.PREFIX}/image"

# Runs in the validated image with its own python: reads the checks (argv lists) and prints one
# JSON line per check. Fixed text; the checks' argv never passes through a shell.
CHECK_RUNNER = r"""
import json, subprocess, sys
for check in json.load(open(sys.argv[1])):
    try:
        done = subprocess.run(check["argv"], capture_output=True, text=True, timeout=check.get("timeout", 120))
        result = {"name": check["name"], "code": done.returncode, "stdout": done.stdout[-200000:], "stderr": done.stderr[-20000:]}
    except FileNotFoundError as e:
        result = {"name": check["name"], "code": 127, "stdout": "", "stderr": str(e)}
    except subprocess.TimeoutExpired:
        result = {"name": check["name"], "code": 124, "stdout": "", "stderr": "the check took too long"}
    print("CNBI-CHECK " + json.dumps(result), flush=True)
"""


# Pods that run a user's code (a build, an image's checks, an inspection) get no ServiceAccount
# token: nothing they run has business with the apiserver.
_USER_CODE_POD = {"automountServiceAccountToken": False}


class PipelineRunFailed(BuildError):
    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message_text = message


def configmap_key(path: str) -> str:
    """ConfigMap keys cannot hold '/': context paths travel with '__' instead."""
    return path.replace("/", "__")


def run_name(obj_name: str, generation, run) -> str:
    name = f"cnbi-{obj_name}-g{generation}-r{run}"
    return name[:63].rstrip("-")


def succeeded_condition(run_obj: dict) -> tuple[str, str, str]:
    """(status, reason, message) of a PipelineRun's or TaskRun's Succeeded condition."""
    for condition in (run_obj.get("status") or {}).get("conditions", []):
        if condition.get("type") == "Succeeded":
            return condition.get("status", "Unknown"), condition.get("reason", ""), condition.get("message", "")
    return "Unknown", "Pending", ""


class TektonBuilder(Builder):
    """Builds with Tekton PipelineRuns in the operator's namespace."""

    keeps_images_locally = False
    fetches_repository = True  # the fetch step of cnbi-build checks the commit out in the pod

    namespace = Unicode(help="Namespace the PipelineRuns run in. Default: $POD_NAMESPACE, else 'default'.").tag(config=True)

    @default("namespace")
    def _default_namespace(self):
        return os.environ.get("POD_NAMESPACE", "default")

    kubeconfig = Unicode(help="kubeconfig file; default $KUBECONFIG, else in-cluster.").tag(config=True)

    builder_image = Unicode(
        "localhost/cnbi/builder:1",
        help="""The image the build steps run in: buildah, git and uv (at /usr/local/bin/uv).
        `python -m cnbi_hub.builderimage` makes one from Debian packages.""",
    ).tag(config=True)

    build_timeout = Float(1800.0, help="Seconds a PipelineRun may take (its spec.timeouts.pipeline).").tag(config=True)

    poll_interval = Float(1.0, help="Seconds between looks at a running PipelineRun.").tag(config=True)

    insecure_registries_plain_http = Bool(
        True, help="Push to and pull from loopback registries over plain http (tls-verify=false)."
    ).tag(config=True)

    service_account = Unicode(
        "cnbi-build", help="""The ServiceAccount every build, check and inspection pod runs as (the
        manifests make `cnbi-build`, holding nothing). Not the namespace's `default`: Tekton
        mounts the git and registry Secrets annotated `tekton.dev/*` on a run's ServiceAccount into
        each of its steps, and another pipeline's credentials must not reach a user's build.
        The kubelet pulls images for these pods with `dockerconfig_secret`, or with this
        account's imagePullSecrets (add them to it). Empty: `default`.""",
    ).tag(config=True)

    dockerconfig_secret = Unicode(
        "", help="""A kubernetes.io/dockerconfigjson Secret bound as the builds' `dockerconfig`
        workspace: mounted only in the steps that pull and push, never in the one that runs the
        user's Containerfile.""",
    ).tag(config=True)

    host_network = Bool(
        False, help="""Run the build task's pod on the node's network (hostNetwork), for a
        registry reached at the node's 127.0.0.1 (a one-node test cluster). The user's build
        still runs in a network namespace of its own that cannot reach the node's loopback.
        Validation and inspection pods, which run the user's image itself, never do.""",
    ).tag(config=True)

    build_memory_limit = Unicode(
        "4Gi", help="Memory the build step may use (a Kubernetes quantity); over it the step is OOM-killed.",
    ).tag(config=True)

    build_cpu_limit = Unicode("2", help="CPUs the build step may use (a Kubernetes quantity); it is slowed, not stopped.").tag(config=True)

    build_disk_limit = Unicode(
        "20Gi", help="""Ephemeral storage the build task's pod may fill (its image storage and
        context are emptyDirs); over it the kubelet evicts the pod. Empty: no limit.""",
    ).tag(config=True)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._api_client = None
        self._inspections: dict[str, BaseImageInfo] = {}
        self._validated: dict[str, list] = {}  # image -> results of the validation its pipeline ran

    async def _api(self):
        if self._api_client is None:
            self._api_client = await api_client(self.kubeconfig)
        return self._api_client

    async def close(self) -> None:
        if self._api_client is not None:
            await self._api_client.close()
            self._api_client = None

    # --- the Builder interface ----------------------------------------------------------------

    async def stored_image(self, reference: str) -> StoredImage | None:
        return None  # a cluster has no image storage of its own: images live in registries

    async def inspect_base(self, reference: str, access: PullAccess | None = None) -> BaseImageInfo:
        if reference in self._inspections:
            return self._inspections[reference]
        digest = reference.split("@sha256:")[-1][:16]
        name = f"cnbi-inspect-{digest}"
        # the first line names the image's user (the step runs as it), then the report
        spec = {"taskSpec": {"steps": [{
            "name": "inspect", "image": reference,
            "command": ["sh", "-c", "id -un 2>/dev/null || id -u; " + _FIND_PYTHON, _INSPECT_PROGRAM],
        }]}, **self._run_template()}
        run = await self._run_to_end("taskruns", name, spec, labels={LABEL_BUILD: "inspect"})
        status, reason, message = succeeded_condition(run)
        if status != "True":
            raise BuildError(f"could not inspect {reference}: {reason}: {message}")
        output = await self._step_log(run, "inspect")
        lines = [line for line in output.splitlines() if line.strip()]
        try:
            data = json.loads([line for line in lines if line.startswith("{")][-1])
        except (IndexError, ValueError):
            raise BuildError(f"could not inspect {reference}: unexpected output {output[-300:]!r}")
        user = lines[0].strip() if lines and not lines[0].startswith("{") else ""
        info = BaseImageInfo(user="" if user in ("root", "0") else user, **data)
        self._inspections[reference] = info
        return info

    async def build(self, plan: BuildPlan, checkout: Path | None, secrets: dict[str, str], log: LogFn, *,
                    obj: dict, checks: list[Check], git_credential: GitCredential | None = None) -> str:
        status = obj.get("status") or {}
        name = run_name(model.name_of(obj), obj["metadata"].get("generation", 1), status.get("run", 1))
        data = {
            configmap_key("context/" + plan.containerfile_path): plan.containerfile or "",
            "containerfile-path": plan.containerfile_path,
        }
        if plan.containerfile is None:
            data.pop(configmap_key("context/" + plan.containerfile_path))
        for rel, content in plan.context_files.items():
            data[configmap_key("context/" + rel)] = content.decode()
        if plan.builder_files:
            data["builder-files"] = "".join(f"{rel} {what}\n" for rel, what in plan.builder_files.items())
        for secret_id in plan.secrets:
            data[f"secret__{secret_id}"] = secrets.get(secret_id, "")
        if plan.containerfile is None and plan.labels:
            data["labels"] = "".join(f"{k}={v}\n" for k, v in plan.labels.items())
        data.update(_check_files(checks))
        pulls = self._images_to_pull(plan, checkout)
        if pulls is not None:
            data["pull-images"] = "".join(f"{image}\n" for image in pulls)
        await self._apply_configmap(name, data, obj)
        tls_verify = "false" if self._plain_http(plan.target) else "true"
        params = [{"name": "image", "value": plan.target}, {"name": "builder-image", "value": self.builder_image},
                  {"name": "tls-verify", "value": tls_verify}]
        pipeline = "cnbi-package-list"
        if status.get("gitCommit"):
            pipeline = "cnbi-gitrepo"
            params += [{"name": "git-url", "value": obj["spec"]["repository"]},
                       {"name": "git-commit", "value": status["gitCommit"]},
                       {"name": "repo-dir", "value": plan.repo_dir if plan.repo_dir is not None else "-"}]
            if git_credential is not None:
                # the step that fetches reads it from a Secret that lives as long as this run
                await self._apply_credential_secret(f"{name}-git", git_credential, obj)
                params.append({"name": "git-credential-secret", "value": f"{name}-git"})
        workspaces = [{"name": "plan", "configMap": {"name": name}}]
        if self.dockerconfig_secret:
            # a kubernetes.io/dockerconfigjson Secret keeps it as .dockerconfigjson; buildah reads config.json
            workspaces.append({"name": "dockerconfig", "secret": {
                "secretName": self.dockerconfig_secret, "items": [{"key": ".dockerconfigjson", "path": "config.json"}]}})
        spec = {
            "pipelineRef": {"name": pipeline}, "params": params, "workspaces": workspaces,
            "timeouts": {"pipeline": f"{int(self.build_timeout)}s"},
            "taskRunTemplate": self._run_template(),
            "taskRunSpecs": [self._build_task_spec()],
        }
        log(f"PipelineRun {name} ({pipeline})")
        # the build step's log reaches the user as it is written, not when the run ends
        ended = asyncio.Event()
        build_lines: collections.deque[str] = collections.deque(maxlen=2000)
        relayed = {"lines": 0}  # how many of the step's log lines reached `log` (kept across cuts)
        follower = asyncio.create_task(self._follow_step_log(name, "build", "build", log, build_lines, ended,
                                                             relayed))
        try:
            run = await self._run_to_end("pipelineruns", name, spec, owner=obj,
                                         labels={LABEL_BUILD: "true", LABEL_IMAGE: model.name_of(obj)}, log=log)
        finally:
            if git_credential is not None:
                await self._delete_secret(f"{name}-git")
            ended.set()
            try:
                await asyncio.wait_for(follower, 15)  # the stream ends with the container
            except asyncio.TimeoutError:
                pass  # wait_for cancelled it: what was streamed so far is what there is
        state, reason, message = succeeded_condition(run)
        # what the stream did not relay (the pod ended before it was followed, a cut it could not
        # take up, a stream ended early): the step's whole log, from where the stream stopped
        whole = await self._step_log(await self._task_run_of(run, "build"), "build")
        for line in whole.splitlines()[relayed["lines"]:]:
            _relay(line.encode(), relayed, build_lines, log)
        build_output = "\n".join(build_lines)
        if state != "True":
            # Tekton's message counts tasks; what the user can act on is the step's own words:
            # the build step's, or those of the step before it that failed (fetch, pull)
            failed_step = await self._failed_step(run, "build")
            if failed_step not in (None, "build"):
                log(f"the {failed_step} step failed:")
                build_output = await self._step_log(await self._task_run_of(run, "build"), failed_step)
                for line in build_output.splitlines()[-200:]:
                    log(line)
            tail = "\n".join([line for line in build_output.splitlines() if line.strip()][-15:])
            raise PipelineRunFailed(reason or "Failed", f"{message}\n{tail}" if tail else message)
        results = {r["name"]: r["value"] for r in (run.get("status") or {}).get("results", [])}
        digest = results.get("IMAGE_DIGEST", "").strip()
        if not digest.startswith("sha256:"):
            raise BuildError(f"PipelineRun {name} succeeded without an image digest")
        image = f"{plan.target.rsplit(':', 1)[0]}@{digest}"
        self._validated[image] = await self._check_results(run, "validate")
        return digest

    async def validate(self, image: str, checks: list[Check], *, obj: dict) -> list[tuple[int, str, str]]:
        """The results of the validation task of the image's own PipelineRun; for an import
        (nothing built), a `cnbi-import` PipelineRun validates it."""
        results = self._validated.pop(image, None)
        if results is None:
            results = await self._validate_import(image, checks, obj)
        by_name = {r["name"]: r for r in results}
        answers = []
        for check in checks:
            result = by_name.get(check.name)
            if result is None:
                answers.append((1, "", f"the validation run did not run the check {check.name}"))
            else:
                answers.append((result["code"], result["stdout"], result["stderr"]))
        return answers

    async def push(self, reference: str, *, tls_verify: bool = True) -> str:
        raise BuildError("the Tekton pipeline pushes as it builds")

    async def remove_image(self, reference: str) -> None:
        pass  # registries keep what was pushed; nothing half-made is left by a cancelled run

    async def cancel_build(self, obj: dict) -> None:
        """Stop the object's running PipelineRun (Tekton: spec.status = Cancelled)."""
        status = obj.get("status") or {}
        name = run_name(model.name_of(obj), obj["metadata"].get("generation", 1), status.get("run", 1))
        api = client.CustomObjectsApi(await self._api())
        try:
            await api.patch_namespaced_custom_object(
                TEKTON_GROUP, TEKTON_VERSION, self.namespace, "pipelineruns", name, {"spec": {"status": "Cancelled"}},
                _content_type="application/merge-patch+json")
        except ApiException as e:
            if e.status != 404:
                raise

    # --- the checks -------------------------------------------------------------------------

    async def _validate_import(self, image: str, checks: list[Check], obj: dict) -> list:
        status = obj.get("status") or {}
        name = run_name(model.name_of(obj), obj["metadata"].get("generation", 1), status.get("run", 1))
        await self._apply_configmap(name, _check_files(checks), obj)
        spec = {"pipelineRef": {"name": "cnbi-import"}, "params": [{"name": "image", "value": image}],
                "workspaces": [{"name": "plan", "configMap": {"name": name}}],
                "taskRunTemplate": self._run_template()}
        run = await self._run_to_end("pipelineruns", name, spec, owner=obj,
                                     labels={LABEL_BUILD: "true", LABEL_IMAGE: model.name_of(obj)})
        state, reason, message = succeeded_condition(run)
        if state != "True":
            raise PipelineRunFailed(reason or "Failed", message)
        return await self._check_results(run, "validate")

    async def _check_results(self, pipeline_run: dict, task: str) -> list:
        output = await self._step_log(await self._task_run_of(pipeline_run, task), "validate")
        results = []
        for line in output.splitlines():
            if line.startswith("CNBI-CHECK "):
                results.append(json.loads(line[len("CNBI-CHECK "):]))
        return results

    # --- Tekton objects -----------------------------------------------------------------------

    def _run_template(self) -> dict:
        """What every run's pods share: no ServiceAccount token, and the builds' own account
        (a TaskRun's spec and a PipelineRun's taskRunTemplate take the same two fields)."""
        template = {"podTemplate": self._pod_template()}
        if self.service_account:
            template["serviceAccountName"] = self.service_account
        return template

    def _pod_template(self) -> dict:
        pod = dict(_USER_CODE_POD)
        if self.dockerconfig_secret:
            # the kubelet pulls the built image (validation) and a base (inspection) with the
            # registry credentials, as it did with `default`'s imagePullSecrets before cnbi-build
            pod["imagePullSecrets"] = [{"name": self.dockerconfig_secret}]
        return pod

    def _build_task_spec(self) -> dict:
        """The build task's pod and its build step's limits (Tekton's taskRunSpecs, beta)."""
        limits = {"memory": self.build_memory_limit, "cpu": self.build_cpu_limit}
        pod = self._pod_template()
        if self.host_network:
            pod["hostNetwork"] = True
        task = {"pipelineTaskName": "build", "podTemplate": pod,
                "stepSpecs": [{"name": "build", "computeResources": {
                    "requests": {"cpu": "250m", "memory": "512Mi"}, "limits": limits}}]}
        if self.build_disk_limit:
            task["stepSpecs"][0]["computeResources"]["limits"]["ephemeral-storage"] = self.build_disk_limit
        return task

    def _images_to_pull(self, plan: BuildPlan, checkout: Path | None) -> list[str] | None:
        """What the Containerfile's FROM lines name: the pull step fetches them, with the
        registry credentials, before the build step runs without any."""
        text = plan.containerfile
        if text is None:
            path = (checkout / plan.containerfile_path) if checkout is not None else None
            if path is None or not path.is_file():
                self.log.warning("no checkout of %s here: its images are not pulled ahead", plan.target)
                return None
            text = path.read_text(errors="replace")
        return images_named_by(text, plan.build_args)

    def _plain_http(self, reference: str) -> bool:
        host = reference.split("/", 1)[0]
        return self.insecure_registries_plain_http and host.split(":")[0] in ("127.0.0.1", "localhost")

    async def _apply_configmap(self, name: str, data: dict, owner: dict | None) -> None:
        core = client.CoreV1Api(await self._api())
        metadata = client.V1ObjectMeta(name=name, labels={LABEL_BUILD: "plan"})
        if owner:
            metadata.owner_references = [_owner_reference(owner)]
        await self._create_or_replace(core.create_namespaced_config_map, core.replace_namespaced_config_map,
                                      client.V1ConfigMap(metadata=metadata, data=data), "store the build plan")

    async def _create_or_replace(self, create, replace, body, doing: str) -> None:
        """Create `body` in the namespace, or replace the one a run before a restart made."""
        try:
            await retrying(lambda: create(self.namespace, body), log=self.log)
        except ApiException as e:
            if e.status != 409:
                raise BuildError(f"could not {doing}: {e.status} {e.reason}") from None
            await retrying(lambda: replace(body.metadata.name, self.namespace, body), log=self.log)

    async def _apply_credential_secret(self, name: str, credential: GitCredential, owner: dict) -> None:
        core = client.CoreV1Api(await self._api())
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(name=name, labels={LABEL_BUILD: "git-credential"},
                                         owner_references=[_owner_reference(owner)]),
            type="Opaque",
            string_data={"host": credential.host, "username": credential.username, "token": credential.token},
        )
        await self._create_or_replace(core.create_namespaced_secret, core.replace_namespaced_secret, body,
                                      "hand the git credential to the build")

    async def _delete_secret(self, name: str) -> None:
        core = client.CoreV1Api(await self._api())
        try:
            await core.delete_namespaced_secret(name, self.namespace)
        except ApiException as e:
            if e.status != 404:  # the image's deletion takes it with it (owner reference)
                self.log.warning("could not delete the build's git credential Secret %s: %s", name, e.reason)

    async def _run_to_end(self, plural: str, name: str, spec: dict, *, owner: dict | None = None,
                          labels: dict | None = None, log: LogFn | None = None) -> dict:
        """Create the run (or find the one created before a restart) and wait until it ends."""
        api = client.CustomObjectsApi(await self._api())
        kind = "PipelineRun" if plural == "pipelineruns" else "TaskRun"
        body = {"apiVersion": f"{TEKTON_GROUP}/{TEKTON_VERSION}", "kind": kind,
                "metadata": {"name": name, "labels": labels or {}}, "spec": spec}
        if owner:
            body["metadata"]["ownerReferences"] = [_owner_reference(owner, as_dict=True)]
        try:
            await retrying(lambda: api.create_namespaced_custom_object(
                TEKTON_GROUP, TEKTON_VERSION, self.namespace, plural, body), log=self.log)
        except ApiException as e:
            if e.status != 409:
                raise BuildError(f"could not create {kind} {name}: {e.status} {api_message(e)}") from None
            if log:
                log(f"{kind} {name} already exists (started before a restart): following it")
        deadline = time.monotonic() + self.build_timeout + 120
        last_reason = None
        refused_since = None
        while True:
            try:
                run = await api.get_namespaced_custom_object(TEKTON_GROUP, TEKTON_VERSION, self.namespace, plural,
                                                             name)
                refused_since = None
            except Exception as e:
                # an apiserver just started again answers 403 until its authorizer has read the
                # RBAC objects: the run we made or found is ours to read, so that passes too
                refused = isinstance(e, ApiException) and e.status in (401, 403)
                if refused:
                    refused_since = refused_since or time.monotonic()
                if not (transient(e) or (refused and time.monotonic() - refused_since < 60)) \
                        or time.monotonic() > deadline:
                    raise
                # the connection cut or the apiserver away a moment: the run goes on meanwhile
                self.log.info("could not read %s %s (%s: %s); looking again", kind, name, type(e).__name__, e)
                await asyncio.sleep(self.poll_interval)
                continue
            state, reason, message = succeeded_condition(run)
            if state in ("True", "False"):
                return run
            if log and reason != last_reason:
                log(f"{kind} {name}: {reason or 'Pending'}")
                last_reason = reason
            if time.monotonic() > deadline:
                return {"status": {"conditions": [{"type": "Succeeded", "status": "False", "reason": "Timeout",
                                                   "message": f"{kind} {name} did not finish in time"}]}}
            await asyncio.sleep(self.poll_interval)

    async def _task_run_of(self, pipeline_run: dict, task: str) -> dict:
        api = client.CustomObjectsApi(await self._api())
        for ref in (pipeline_run.get("status") or {}).get("childReferences", []):
            if ref.get("pipelineTaskName") == task and ref.get("kind") == "TaskRun":
                return await retrying(lambda: api.get_namespaced_custom_object(
                    TEKTON_GROUP, TEKTON_VERSION, self.namespace, "taskruns", ref["name"]), log=self.log)
        return {}

    async def _failed_step(self, pipeline_run: dict, task: str) -> str | None:
        """The first step of the task's run that ended with a non-zero exit code."""
        task_run = await self._task_run_of(pipeline_run, task)
        for step in (task_run.get("status") or {}).get("steps", []):
            terminated = step.get("terminated") or {}
            if terminated.get("exitCode", 0) != 0 and terminated.get("reason") != "TaskRunCancelled":
                return step.get("name")
        return None

    async def _step_log(self, task_run: dict, step: str) -> str:
        pod = (task_run.get("status") or {}).get("podName")
        if not pod:
            return ""
        core = client.CoreV1Api(await self._api())
        try:
            return await retrying(lambda: core.read_namespaced_pod_log(pod, self.namespace, container=f"step-{step}"),
                                  log=self.log)
        except ApiException as e:
            self.log.info("no log from %s (%s): %s %s", pod, step, e.status, e.reason)
            return ""  # a pod that never ran its step has none: the run's own message says why

    async def _follow_step_log(self, run_name: str, task: str, step: str, log: LogFn,
                               lines: collections.deque, ended: asyncio.Event, relayed: dict) -> None:
        """Stream the step's container log into `log` (and `lines`) from the moment its pod
        runs until the container ends; give up quietly once the run has `ended` without one.
        A stream cut off (the network, the apiserver restarting) is read again from its start
        and taken up after the lines already relayed: the follower never fails the build, nor
        repeats a line (a container's log only grows; the kubelet rotates it past 10 MiB, and a
        stream taken up after that skips as many new lines as were relayed: a log that long is
        beyond what a user reads live). `relayed` counts the lines relayed."""
        while True:
            try:
                if await self._follow_step_log_once(run_name, task, step, log, lines, ended, relayed):
                    return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # aiohttp's errors for a connection cut mid-stream, or the API's
                self.log.info("following the %s step's log of %s broke off (%s: %s); taking it up again",
                              step, run_name, type(e).__name__, e)
            await asyncio.sleep(self.poll_interval)

    async def _follow_step_log_once(self, run_name: str, task: str, step: str, log: LogFn,
                                    lines: collections.deque, ended: asyncio.Event, relayed: dict) -> bool:
        """One try at following the step's log; whether there is nothing more to follow."""
        api = client.CustomObjectsApi(await self._api())
        core = client.CoreV1Api(await self._api())
        pod = None
        while pod is None:
            try:
                run = await api.get_namespaced_custom_object(TEKTON_GROUP, TEKTON_VERSION, self.namespace,
                                                             "pipelineruns", run_name)
                pod = ((await self._task_run_of(run, task)).get("status") or {}).get("podName")
            except ApiException:
                pod = None
            if pod is None:
                if ended.is_set():
                    return True
                await asyncio.sleep(self.poll_interval)
        while True:
            try:
                response = await core.read_namespaced_pod_log(pod, self.namespace, container=f"step-{step}",
                                                              follow=True, _preload_content=False)
            except ApiException:
                return True
            if response.status != 200:  # unread (not raised): 400 while the container waits to start
                response.release()
                if response.status in (400, 404) and not ended.is_set():
                    await asyncio.sleep(self.poll_interval)
                    continue
                if transient(ApiException(status=response.status)) and not ended.is_set():
                    raise ApiException(status=response.status, reason="log stream refused")  # taken up again
                return True
            try:
                pending, read = b"", 0
                async for chunk in response.content.iter_any():
                    pending += chunk
                    *complete, pending = pending.split(b"\n")
                    for raw in complete:
                        read += 1
                        if read > relayed["lines"]:  # not relayed by a stream before a cut
                            _relay(raw, relayed, lines, log)
                if pending and read + 1 > relayed["lines"]:  # a last line without its newline
                    _relay(pending, relayed, lines, log)
            finally:
                response.release()
            return True


def _check_files(checks: list[Check]) -> dict:
    """The plan ConfigMap's entries for the validation task: the checks and their runner."""
    listed = [{"name": c.name, "argv": list(c.argv)} for c in checks]
    return {"checks.json": json.dumps(listed), "check-runner.py": CHECK_RUNNER}


def _owner_reference(obj: dict, as_dict: bool = False):
    fields = {"apiVersion": model.API_VERSION, "kind": model.KIND, "name": model.name_of(obj),
              "uid": obj["metadata"]["uid"], "blockOwnerDeletion": False}
    if as_dict:
        return fields
    return client.V1OwnerReference(api_version=fields["apiVersion"], kind=fields["kind"], name=fields["name"],
                                   uid=fields["uid"], block_owner_deletion=False)



def _relay(raw: bytes, relayed: dict, lines: collections.deque, log: LogFn) -> None:
    line = raw.decode(errors="replace")
    relayed["lines"] += 1
    lines.append(line)
    log(line)
