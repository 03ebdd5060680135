"""Is the tracking server there? Asked before compute is spent."""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from typing import Any, Optional

from chatsft.errors import UserError
from chatsft.tracking.redaction import redact

log = logging.getLogger("chatsft.tracking")


def check_server(uri: str, timeout: float = 5.0) -> Optional[str]:
    """None if the tracking server answers; else why not. Only http(s) URIs are probed."""
    if not uri.startswith(("http://", "https://")):
        return None
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (user-given server)
            return None if r.status == 200 else f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        # Servers behind auth proxies answer 401/403 on /health: reachable all the same.
        return None if e.code in (401, 403) else f"HTTP {e.code}"
    except Exception as e:  # connection refused, DNS, timeout
        return str(getattr(e, "reason", e))


def should_track(tracking: Any, uri: Optional[str]) -> bool:
    """Whether to track this run, the server checked before compute is spent (`tracking` is the
    config's tracking section; `uri` the run's resolved tracking URI, None when tracking is off).
    An unreachable server is an error, unless `tracking.required: false`."""
    if not tracking.enabled or uri is None:
        return False
    problem = check_server(uri)
    if problem is None:
        return True
    shown = redact("uri", uri)
    if tracking.required:
        raise UserError(f"tracking.uri: MLflow server {shown} is unreachable ({problem}); start it, fix "
                        "tracking.uri, or set tracking.required=false to train without it")
    log.warning("MLflow server %s is unreachable (%s): training goes on without tracking", shown, problem)
    print(f"warning: MLflow server {shown} is unreachable ({problem}); training goes on without tracking")
    return False
