"""`ray` for a multi-node Ray on ONE host over 127.0.0.1 (the single-host Slurm tests only).

Ray refuses to join a worker unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, and with it set replaces
an explicit `--node-ip-address=127.0.0.1` by the machine's external address. This entry point keeps
the explicit loopback address and lets the worker join; slurm/ray_node.sh uses it only when
RAY_NODE_IP is a loopback address.
"""

import sys

import ray._private.ray_constants as ray_constants
import ray._private.services as services

services.resolve_ip_for_localhost = lambda host: host  # keep the explicit --node-ip-address
ray_constants.ENABLE_RAY_CLUSTER = True  # allow `ray start --address` (worker nodes)

from ray.scripts.scripts import main  # noqa: E402

sys.exit(main())
