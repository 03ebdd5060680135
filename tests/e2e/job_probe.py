"""A job entry point for tests/e2e/test_jobs.py: joins the cluster as every chatsft job does
(chatsft.raysetup.ensure_ray, what jobs/*.py call first), then reads the config file of the
job's working dir while tasks on every node import chatsft. Prints one JSON line: where the
workers found chatsft, and on which nodes. Fails the moment the working dir disappears under
the driver (what a replaced runtime env, or two nodes sharing one temp dir, did)."""

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "platform"))

from chatsft.raysetup import ensure_ray  # noqa: E402


def main() -> int:
    config = "configs/tiny.yaml"
    if not os.path.exists(config):
        print("PROBE config missing before ensure_ray", flush=True)
        return 1
    ensure_ray()
    import ray

    @ray.remote(num_cpus=1)
    def where() -> tuple[str, str]:
        import chatsft

        return ray.get_runtime_context().get_node_id(), os.path.dirname(chatsft.__file__)

    seen = set()
    for i in range(10):  # the driver keeps reading its working dir while the nodes set up theirs
        seen |= set(ray.get([where.remote() for _ in range(2)]))
        if not os.path.exists(config):
            print(f"PROBE config lost after ensure_ray, round {i}", flush=True)
            return 1
        with open(config) as f:
            f.read()
        time.sleep(0.1)
    print("PROBE " + json.dumps({"nodes": sorted({n for n, _ in seen}), "code": sorted({c for _, c in seen}),
                                 "driver_code": os.path.dirname(sys.modules["chatsft"].__file__)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
