"""One Ray node on 127.0.0.1 for the multi-node test, built the way ray.cluster_utils does.

    python tests/ray_node.py head NUM_CPUS
    python tests/ray_node.py worker NUM_CPUS GCS_ADDRESS

Prints one JSON line {"gcs": ..., "node_id": ...} once the node is up, then waits until it
is killed (the test stops it by its process group). `ray start` would bind the machine's
network address; a node built this way, with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, stays on
loopback.
"""

from __future__ import annotations

import json
import os
import signal
import sys

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray._private.node  # noqa: E402
import ray._private.parameter  # noqa: E402
import ray._private.services  # noqa: E402


def main() -> None:
    role, cpus = sys.argv[1], int(sys.argv[2])
    params = ray._private.parameter.RayParams(
        node_ip_address="127.0.0.1",
        num_cpus=cpus,
        num_gpus=0,
        include_dashboard=False,
        object_store_memory=200 * 1024 * 1024,
        min_worker_port=0,
        max_worker_port=0,
    )
    if role == "worker":
        params.update_if_absent(
            gcs_address=sys.argv[3], include_log_monitor=False, node_manager_port=0
        )
        params.dashboard_agent_listen_port = None
    node = ray._private.node.Node(
        params, head=role == "head", shutdown_at_exit=True, spawn_reaper=True
    )
    # As ray.cluster_utils does: announce the node only once the cluster lists it (a driver
    # started earlier would size its search on the nodes it sees).
    ray._private.services.wait_for_node(node.gcs_address, node.plasma_store_socket_name, 120)
    print(json.dumps({"gcs": node.gcs_address, "node_id": node.node_id}), flush=True)
    signal.signal(
        signal.SIGTERM, lambda *_: sys.exit(0)
    )  # runs Node's exit hook: its processes stop
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
