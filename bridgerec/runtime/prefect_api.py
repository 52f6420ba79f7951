"""The Prefect API the commands run their flows against.

Without PREFECT_API_URL, Prefect starts a temporary local API server for the command (and stops it at
exit). With PREFECT_API_URL set (in the environment or the active Prefect profile) every flow run is
recorded on that server, so when nothing answers there every command would fail inside Prefect's
engine with a hundred lines of connection tracebacks. `check_api` asks first, once, with a short
timeout, and turns a server that is not there into one line that says what to do.

The temporary server is Prefect's child process, and by default in the command's process group, which is
where a terminal's Ctrl-C goes (the whole foreground group): it died with the command's own
KeyboardInterrupt, so the engine could not record the stop, the night's retry saw a connection error,
and `bridgerec run` went on for minutes before failing with "Connection refused" (a new user's trial,
2026-12-05). `detach_temporary_server` starts it in a session of its own: a Ctrl-C reaches the command
only, which stops, records the night and stops the server at exit, as a signal to its PID always did.
"""

from __future__ import annotations

import os
import subprocess
import types
from typing import Any

from bridgerec.runtime.errors import InputError

PROBE_TIMEOUT_S = 5.0  # connect and read; an address that drops packets fails after this long


class PrefectUnreachable(InputError):
    """PREFECT_API_URL names a Prefect API that does not answer; the message says how to go on."""


def configured_api_url() -> tuple[str | None, str]:
    """(PREFECT_API_URL as Prefect resolves it, where it is set: 'environment' or 'profile')."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    return (str(url) if url else None), ("environment" if os.environ.get("PREFECT_API_URL") else "profile")


def unreachable_message(url: str, source: str, reason: str) -> str:
    unset = (
        "unset PREFECT_API_URL"
        if source == "environment"
        else "remove it from the Prefect profile (`prefect config unset PREFECT_API_URL`)"
    )
    return (
        f"the Prefect API at {url} (PREFECT_API_URL, from the {source}) is unreachable ({reason}): start "
        f"that server (`prefect server start`) or {unset} to run on a temporary local API"
    )


def check_api(timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise PrefectUnreachable when PREFECT_API_URL is set and no server answers there within
    `timeout_s` (any HTTP answer counts as there: a server that wants a key, say, says so itself)."""
    import httpx

    url, source = configured_api_url()
    if not url:
        return
    try:
        httpx.get(url.rstrip("/") + "/health", timeout=timeout_s)
    except httpx.TransportError as exc:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise PrefectUnreachable(unreachable_message(url, source, reason)) from None


def unreachable_in(exc: BaseException) -> PrefectUnreachable | None:
    """A PrefectUnreachable for Prefect's own 'Failed to reach API at URL' (a server that went away
    during the command), found in `exc`'s cause chain; None for anything else."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, PrefectUnreachable):
            return current
        text = str(current)
        if isinstance(current, RuntimeError) and text.startswith("Failed to reach API at "):
            url = text.removeprefix("Failed to reach API at ").strip()
            _, source = configured_api_url()
            return PrefectUnreachable(unreachable_message(url, source, "the server stopped answering"))
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


class _OwnSession(subprocess.Popen):  # type: ignore[type-arg]
    """subprocess.Popen that starts its child in a new session (its own process group)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("start_new_session", True)
        super().__init__(*args, **kwargs)


def detach_temporary_server() -> None:
    """Make the temporary API server Prefect starts for this process (when no PREFECT_API_URL is set)
    start in a session of its own, out of reach of a Ctrl-C meant for the command (the module's doc).
    Prefect 3.7 starts it with `subprocess.Popen` in `prefect.server.api.server`
    (`SubprocessASGIServer._run_uvicorn_command`); that module's `subprocess` becomes a copy whose Popen
    is `_OwnSession`. Call before the first flow run; a no-op with a configured server or when done."""
    url, _ = configured_api_url()
    if url:
        return
    from prefect.server.api import server

    if getattr(server.subprocess, "Popen", None) is _OwnSession:
        return
    shim = types.ModuleType("subprocess")
    shim.__dict__.update(vars(subprocess))
    shim.Popen = _OwnSession  # type: ignore[attr-defined]
    server.subprocess = shim
