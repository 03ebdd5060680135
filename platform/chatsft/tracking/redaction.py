"""Credentials never reach MLflow (nor the console): what `redact` hides."""

from __future__ import annotations

import re
from typing import Any

_SECRET_KEY = re.compile(r"(password|passwd|secret|token|api[_-]?key|credential|access[_-]?key)", re.I)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
_QUERY_SECRET = re.compile(r"([?&][^=&\s]*(?:token|key|secret|password|sig|signature)[^=&\s]*=)[^&\s]+", re.I)


def redact(key: str, value: Any) -> Any:
    """Secret-looking keys, URL user:password@ and signed query params become `***`."""
    if _SECRET_KEY.search(key) and value not in (None, ""):
        return "***"
    if isinstance(value, str):
        value = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}***@", value)
        value = _QUERY_SECRET.sub(r"\1***", value)
    return value
