"""Cluster mode survives kube-apiserver restarting in the middle of a build.

Its own module, named to run after every other suite that uses the test cluster: a restart is
the most disruptive thing done to it, and whatever the node's parts make of it must not reach
into other tests.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from cnbi_hub import model
from tests.clusterfixtures import pipeline_runs, wait_for_phase
from tests.test_cluster import image_object, wait_for_running_pipelinerun

pytestmark = pytest.mark.kube


async def test_the_apiserver_restarted_mid_build_the_image_still_reaches_ready_with_one_pipelinerun(
        kube_node, cluster_store, cluster_namespace, cluster_registry, operator):
    """kube-apiserver stopped for 5 s while the PipelineRun builds, then started again (etcd keeps
    everything): the operator's watches and writes fail meanwhile, then resume; the image
    reaches Ready on the one PipelineRun it had started."""
    await cluster_store.create(image_object("through-restart", cluster_registry["base"], packages=("toolz==0.12.1",)))
    await wait_for_running_pipelinerun(kube_node, cluster_namespace, "cnbi-through-restart-g1-r1")
    await asyncio.to_thread(kube_node.restart_apiserver, 5.0)
    obj = await wait_for_phase(cluster_store, "through-restart", model.TERMINAL_PHASES)
    assert model.phase_of(obj) == "Ready", json.dumps(obj["status"], indent=1) + operator.log()
    assert [r["metadata"]["name"] for r in pipeline_runs(kube_node, cluster_namespace)] == ["cnbi-through-restart-g1-r1"]
    assert "check imports: ok" in await cluster_store.get_artifact("through-restart", "log")
