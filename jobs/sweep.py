"""`ray job submit --working-dir . -- python jobs/sweep.py CONFIG [overrides]`: `chatsft sweep` in a Ray job.

Arguments, one-line errors and exit codes are the CLI's (chatsft.cli.job_main), so
`ray job status` tells the truth and the two never drift apart.
"""

import os
import sys

# The job's working dir is the code to run: its platform/ wins over an installed chatsft.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))

from chatsft.cli import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main("sweep", sys.argv[1:]))
