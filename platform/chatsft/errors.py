"""Errors a user can cause: the CLI and jobs print their one-line message and exit non-zero."""

from __future__ import annotations

from typing import Optional


class UserError(Exception):
    """A problem with the user's input or environment (config, files, cluster), not a bug."""


def user_error_in(error: BaseException, kinds: tuple[type, ...]) -> Optional[BaseException]:
    """The user error of one of `kinds` behind a failure that Ray wrapped, if any.

    Ray hands back a task's or actor's exception wrapped (RayTaskError, whose class
    also subclasses the original's), and Ray Train wraps a worker group's failures
    (`worker_failures`) and the controller's (`controller_failure`); the user error
    is somewhere below. The original object is preferred to Ray's subclassing wrapper."""
    seen, todo = set(), [error]
    found = None
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, kinds):
            found = x
            if type(x) in kinds:
                return x
        todo += [getattr(x, "cause", None), getattr(x, "controller_failure", None), x.__cause__, x.__context__]
        todo += list((getattr(x, "worker_failures", None) or {}).values())
    if found is not None:  # only Ray's wrapper survived: keep its last line, the error itself
        return UserError(str(found).strip().splitlines()[-1])
    return None
