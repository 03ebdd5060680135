"""`ray job submit --working-dir . -- python jobs/train.py CONFIG [overrides]`: `chatsft train` in a Ray job.

The job's driver connects to the cluster it was submitted to and ships the
chatsft of the working dir to the training workers, then prepares the rows if
needed and runs the TorchTrainer there.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))

from chatsft.cli import main  # noqa: E402

if __name__ == "__main__":
    import ray

    from chatsft.train.driver import runtime_env

    ray.init(runtime_env=runtime_env())
    sys.exit(main(["train", *sys.argv[1:]]))
