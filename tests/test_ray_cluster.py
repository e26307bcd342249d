"""Resource-aware placement on a two-node local Ray cluster (``ray.cluster_utils.Cluster``): the second node has a
custom resource standing in for a GPU, and the stages that ask for it run there, the others on the head node.

The cluster is a Ray of its own, which cannot share a driver process with test_ray.py's local Ray: the test runs it
in a fresh (spawned) Python.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from markbench.config import load_config
from markbench.runner import Runner

from .conftest import MICRO_TOML, write_config
from .test_ray import _braces, _ray_home, _rows


def _run_on_two_nodes(tmp_path: str) -> dict:
    """Start a head (1 CPU, ``cpu_pool``) and a node with ``accel`` (a stand-in GPU), run the grid there, then the same
    grid in-process; return where each stage kind ran and both result tables. Runs in a fresh Python (see the test)."""
    import ray
    from ray.cluster_utils import Cluster

    tmp_path = Path(tmp_path)
    tmp = Path("/tmp") / f"mb-rc-{os.getpid()}"  # short: Ray's socket paths must stay under 107 characters
    tmp.mkdir(exist_ok=True)
    text = MICRO_TOML + _braces('\n[resources]\nembed = {accel = 1}\ngenerate = {accel = 1}\n'
                                'mark = {cpu_pool = 1}\nimage_attack = {cpu_pool = 1}\ndetect = {cpu_pool = 1}\n')
    with _ray_home(tmp):
        cluster = None
        try:
            for attempt in range(3):  # on a heavily loaded machine the head's GCS can miss Ray's start-up deadline
                try:
                    cluster = Cluster(initialize_head=True, head_node_args={
                        "num_cpus": 1, "resources": {"cpu_pool": 1}, "temp_dir": str(tmp / "r"),
                        "include_dashboard": False})
                    break
                except RuntimeError:
                    if attempt == 2:
                        raise
            gpu_node = cluster.add_node(num_cpus=1, resources={"accel": 1})
            ray.init(address=cluster.address, log_to_driver=False)
            cfg = load_config(write_config(tmp_path, text, output=str(tmp_path / "ray")), {"run.executor": "ray"})
            summary = Runner(cfg).run()
            head_id = cluster.head_node.node_id
        finally:
            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)
    metas = [json.loads(p.read_text()) for p in cfg.cache_dir.glob("*/*/meta.json")]
    placed = {(m["kind"], m["node_id"]) for m in metas}
    local = load_config(write_config(tmp_path, text, output=str(tmp_path / "local")))
    Runner(local).run()
    return {"ok": summary.ok, "cells_ok": summary.cells_ok, "failed": summary.cells_failed,
            "on_accel": {k for k, n in placed if n == gpu_node.node_id},
            "on_head": {k for k, n in placed if n == head_id},
            "ray_rows": _rows(cfg.output), "local_rows": _rows(local.output)}


@pytest.mark.slow
def test_two_node_cluster_places_stages_by_their_resources_and_matches_in_process(tmp_path):
    pytest.importorskip("ray")
    # A fresh Python: a driver that already ran a local Ray (test_ray.py, same pytest process) keeps state that a
    # second cluster's workers cannot reach (its objects come back as OwnerDiedError).
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        got = pool.submit(_run_on_two_nodes, str(tmp_path)).result(timeout=900)
    assert got["ok"] and got["cells_ok"] == 6, got["failed"]
    assert got["on_accel"] == {"embed", "generate"}
    assert got["on_head"] == {"mark", "image_attack", "detect"}
    assert got["ray_rows"] == got["local_rows"]
