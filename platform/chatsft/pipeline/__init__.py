"""The Ray Data pipeline that turns JSONL conversations into training rows (`chatsft prepare`).

`prepare(cfg, force=False) -> Prepared` is the entry point; see run.py for the graph.
"""

from chatsft.pipeline.run import Prepared, prepare

__all__ = ["Prepared", "prepare"]
