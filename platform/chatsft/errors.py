"""Errors a user can cause: the CLI and jobs print their one-line message and exit non-zero."""


class UserError(Exception):
    """A problem with the user's input or environment (config, files, cluster), not a bug."""
