"""A self-contained HTTP server speaking Together's Batch API, for the official SDK.

Point the SDK at it with ``Together(api_key=..., base_url="http://HOST:PORT")``: the SDK's
resource paths already start with ``/v1``, so the base URL must not end in ``/v1``.
"""

from __future__ import annotations

from shared.providers.local.api.app import create_app
from shared.providers.local.api.server import serve
from shared.providers.local.faults import Faults

__all__ = ["Faults", "create_app", "serve"]
