"""Faults around the operator in cluster mode, each on the real apiserver and the real Tekton:
the operator killed in each early phase, its connections to the apiserver cut mid-build, and its
status writes meeting 409s from another writer. Each image ends Ready, with one PipelineRun.

(`test_cluster.py` kills the operator mid-build; `test_survives_apiserver_restart.py` restarts
the apiserver itself.)"""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest

from cnbi_hub import model
from tests.clusterfixtures import Operator, pipeline_runs, wait_for_phase
from tests.infra_tcp import CuttableProxy
from tests.test_cluster import image_object, wait_for_running_pipelinerun

pytestmark = pytest.mark.kube


@pytest.mark.parametrize("phase,extra", [("Prepare", "six"), ("Resolving", "attrs")])
async def test_an_operator_killed_in_an_earlier_phase_takes_the_image_to_ready_after_restart(
        kube_node, cluster_store, cluster_namespace, cluster_registry, operator, phase, extra):
    """SIGKILL at the first sight of the phase (polled every 50 ms; a phase that passed quicker
    than that is caught in the one after it, which is said): the restarted operator starts the
    image's work again and it reaches Ready with one PipelineRun, not two."""
    name = f"killed-in-{phase.lower()}"
    await cluster_store.create(image_object(name, cluster_registry["base"],
                                            packages=("tabulate==0.9.0", "humanize", extra)))
    order = ["Pending", "Prepare", "Resolving", "Building"]
    deadline = time.monotonic() + 300
    while True:
        seen = model.phase_of(await cluster_store.get(name))
        assert seen not in model.TERMINAL_PHASES, f"finished before it could be killed in {phase}"
        if seen in order and order.index(seen) >= order.index(phase):
            break
        assert time.monotonic() < deadline, seen
        await asyncio.sleep(0.05)
    operator.kill()  # SIGKILL: no cleanup, no status written
    print(f"killed in {seen} (aimed at {phase})")
    assert model.phase_of(await cluster_store.get(name)) not in model.TERMINAL_PHASES
    operator.start()
    obj = await wait_for_phase(cluster_store, name, model.TERMINAL_PHASES)
    assert model.phase_of(obj) == "Ready", json.dumps(obj["status"], indent=1) + operator.log()
    assert {"tabulate", "humanize", extra} <= {p["name"].lower() for p in obj["status"]["packages"]}
    runs = operators_runs(kube_node, cluster_namespace, name)
    assert len(runs) == 1, runs


def operators_runs(cluster, namespace: str, name: str) -> list[str]:
    return [r["metadata"]["name"] for r in pipeline_runs(cluster, namespace)
            if r["metadata"]["name"].startswith(f"cnbi-{name}-")]


async def test_the_operators_connections_cut_mid_build_it_carries_on_to_ready(
        kube_node, cluster_store, cluster_namespace, cluster_registry, tmp_path):
    """Every connection of the operator to the apiserver (its watches, kopf's, its Tekton polls)
    dropped three times mid-build, the apiserver itself up: the build goes on to Ready with one
    PipelineRun, and an image made after the cuts is seen through the resumed watch."""
    identity = kube_node.serviceaccount_identity(cluster_namespace, "cnbi-operator", create=False)
    through_proxy = tmp_path / "kubeconfig-through-proxy"
    proxy = await CuttableProxy.in_front_of(kube_node.kubeconfig[identity], through_proxy)
    operator = Operator(kube_node, cluster_namespace, cluster_registry, tmp_path / "operator.log",
                        kubeconfig=through_proxy).start()
    try:
        await cluster_store.create(image_object("cut-off", cluster_registry["base"]))
        await wait_for_running_pipelinerun(kube_node, cluster_namespace, "cnbi-cut-off-g1-r1")
        deadline = time.monotonic() + 300
        while "STEP 1/" not in (await cluster_store.get_artifact("cut-off", "log") or ""):
            assert time.monotonic() < deadline, "the build step's log never streamed"
            await asyncio.sleep(0.5)
        for _ in range(3):  # the build log's stream among them
            assert proxy.cut() >= 1, "the operator held no connection to cut"
            await asyncio.sleep(2)
        obj = await wait_for_phase(cluster_store, "cut-off", model.TERMINAL_PHASES)
        assert model.phase_of(obj) == "Ready", json.dumps(obj["status"], indent=1) + operator.log()
        assert operators_runs(kube_node, cluster_namespace, "cut-off") == ["cnbi-cut-off-g1-r1"]
        assert proxy.connections > proxy.cut_connections  # it came back on new connections
        # the build's log whole after the cuts: each of buildah's steps once, in order, none lost
        steps = re.findall(r"^STEP (\d+)/(\d+): ", await cluster_store.get_artifact("cut-off", "log"), re.MULTILINE)
        assert steps and [int(n) for n, _ in steps] == list(range(1, int(steps[0][1]) + 1)), steps

        # a new object after the cuts reaches the operator only through its resumed watch
        await cluster_store.create(model.validate_new_object(
            {"metadata": {"name": "after-the-cuts"}, "spec": {"buildType": "ImageImport",
                                                               "fromImage": cluster_registry["base"]}},
            creator="alice"))
        obj = await wait_for_phase(cluster_store, "after-the-cuts", model.TERMINAL_PHASES, timeout=300)
        assert model.phase_of(obj) == "Ready", json.dumps(obj["status"], indent=1) + operator.log()
    finally:
        operator.stop()
        await proxy.close()
        print("--- operator log (tail) ---\n" + operator.log())


def status_conflicts(cluster) -> int:
    """How many status writes of CustomNBImages the apiserver has answered 409 so far."""
    metrics = cluster.kubectl("get", "--raw", "/metrics").stdout
    total = 0
    for line in metrics.splitlines():
        if line.startswith("apiserver_request_total{") and 'code="409"' in line \
                and 'resource="customnbimages"' in line and 'subresource="status"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


async def test_status_writes_that_meet_409s_from_another_writer_lose_nothing(
        kube_node, cluster_store, cluster_namespace, cluster_registry, operator):
    """Another writer (kubectl annotate in a loop) changes the image all through its build: the
    apiserver answers some of the operator's status writes 409 (its metrics say how many);
    each is read again and written, and the image ends Ready with its whole status."""
    from kubernetes_asyncio import client

    before = status_conflicts(kube_node)
    await cluster_store.create(image_object("contested", cluster_registry["base"]))
    pokes = 0

    async def poke(api, writer: int) -> None:
        nonlocal pokes
        while pokes < 3000:  # bounded; each a merge patch of one annotation, as kubectl annotate
            if model.phase_of(await cluster_store.get("contested")) in model.TERMINAL_PHASES:
                return
            pokes += 1
            await api.patch_namespaced_custom_object(
                model.GROUP, model.VERSION, cluster_namespace, "customnbimages", "contested",
                {"metadata": {"annotations": {f"cnbi.test/poke-{writer}": str(pokes)}}},
                _content_type="application/merge-patch+json")
            await asyncio.sleep(0.005)

    async with await kube_node.api_client() as api_client:
        api = client.CustomObjectsApi(api_client)
        # one writer, some sixty writes a second: a hundred a second once made one status
        # write give up after its 20 tries (then the image started again and still got Ready);
        # several writers as fast as they go are a livelock by design, as with client-go's
        # RetryOnConflict, and end the image Failed
        await poke(api, 0)
    obj = await wait_for_phase(cluster_store, "contested", model.TERMINAL_PHASES)
    assert model.phase_of(obj) == "Ready", json.dumps(obj["status"], indent=1) + operator.log()
    conflicts = status_conflicts(kube_node) - before
    print(f"{pokes} writes by the other writer, {conflicts} status writes answered 409")
    assert conflicts >= 1, "the race never happened: no status write met a 409"
    status = obj["status"]
    assert status["image"] and {p["name"].lower() for p in status["packages"]} >= {"tabulate"}
    reached = {c["type"] for c in status["conditions"] if c["status"] == "True"}
    assert {model.CONDITION_PREPARED, model.CONDITION_RESOLVED, model.CONDITION_VALIDATED} <= reached, status
    assert any(c["type"] == model.CONDITION_BUILDING and c["reason"] == "BuildSucceeded" for c in status["conditions"])
    assert operators_runs(kube_node, cluster_namespace, "contested") == ["cnbi-contested-g1-r1"]
    assert re.search(r"==> Building -> Ready", await cluster_store.get_artifact("contested", "log") or "")
