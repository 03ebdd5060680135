"""`ray job submit --working-dir . -- python jobs/eval.py CONFIG [--model PATH] [key=value ...]`

The same as `chatsft eval`: the arguments, the one-line errors and the exit
codes come from chatsft.cli, so the two never drift apart.
"""

import os
import sys

# The job's working dir is the code to run: its platform/ wins over an installed chatsft.
_PLATFORM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform")
if os.path.isdir(os.path.join(_PLATFORM, "chatsft")):
    sys.path.insert(0, os.path.abspath(_PLATFORM))

from chatsft.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
