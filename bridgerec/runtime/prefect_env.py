"""Prefect defaults for an offline batch tool; imported before prefect. Users can override each."""

from __future__ import annotations

import os

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # the server's telemetry heartbeat tries the network
    "DO_NOT_TRACK": "1",  # SDK analytics
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # a fresh SQLite DB can take >20 s on 2 cores
    "PREFECT_LOGGING_LOG_PRINTS": "false",
}

for key, value in DEFAULTS.items():
    os.environ.setdefault(key, value)
