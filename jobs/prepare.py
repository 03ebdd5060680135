"""`ray job submit --working-dir . -- python jobs/prepare.py CONFIG [overrides]`: `chatsft prepare` in a Ray job.

The job's driver connects to the cluster it runs in (RAY_ADDRESS, which
`ray job submit` sets, or a cluster started on this machine with `ray start`;
else it starts a local Ray), ships the chatsft of the working dir to the
workers, and runs the same code and argument handling as the CLI: errors a user
can cause end in one line and exit code 2.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))

from chatsft.cli import main  # noqa: E402


def run(argv: list) -> int:
    import ray

    from chatsft.pipeline.run import runtime_env

    if not ray.is_initialized():
        ray.init(runtime_env=runtime_env())
    try:
        return main(["prepare", *argv])
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
