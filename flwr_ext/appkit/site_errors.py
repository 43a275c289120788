"""Error replies that name the site: ``site 'st-marys': ValueError: ...``.

When a ClientApp raises, Flower turns the exception into an error reply whose
reason is ``"<class 'ValueError'>:<'...'>"`` and which carries no content - so
the coordinator cannot tell *which* site failed: the reply of a site whose CSV
lacks a column, or that holds another CKKS key set, arrives under a 20-digit
node id, and a run that fails in its statistics round names nobody.

:func:`site_errors_mod` is the outermost client mod of both app templates. It
runs the rest of the ClientApp and, if anything raises, logs the full traceback
in the site's own log and replies with an error whose reason starts with the
site's name (node config ``site-name``; in simulation ``<prefix>-<partition-id>``;
else ``node-<id>``), then the exception's type and message - the same words
Flower would send, no more (the app's loaders keep site data out of their
messages). :class:`~flwr_ext.appkit.recorder.RecordingGrid` reads the name back
(:func:`site_from_reason`), so logs, ``metrics.json`` and the summary line name
the site even when it never sent a successful reply.
"""

from __future__ import annotations

import re
from logging import ERROR

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode
from flwr.supercore import log

__all__ = ["site_errors_mod", "site_from_reason", "site_name"]

_MAX_REASON = 2000
_MAX_NAME = 64
_PREFIX = re.compile(r"^site '([^'\n]{1,64})': ")


def site_name(context: Context, prefix: str = "site") -> str:
    """Return the site's name from its node config, as logs and results use it.

    ``site-name`` if set; in simulation ``<prefix>-<partition-id>``; else
    ``node-<node id>``. Never raises (an invalid node config is reported by the
    ClientApp itself).
    """
    config = context.node_config
    name = config.get("site-name")
    if isinstance(name, str) and name.strip():
        return name.strip()[:_MAX_NAME].replace("'", "_")
    pid = config.get("partition-id")
    if (
        isinstance(pid, int)
        and not isinstance(pid, bool)
        and not config.get("data-path")
    ):
        return f"{prefix}-{pid}"
    return f"node-{context.node_id}"


def site_from_reason(reason: str) -> str | None:
    """Return the site name an error reason of :func:`site_errors_mod` starts with."""
    match = _PREFIX.match(reason)
    return match.group(1) if match else None


def site_errors_mod(name_prefix: str = "site") -> Mod:
    """Return the mod; ``name_prefix`` names simulated sites (``hospital-0``).

    The mod runs the ClientApp and turns an exception into an error reply whose
    reason starts with ``site '<name>': ``; an error reply an inner mod already
    made (e.g. ``site_policy_mod``'s redacted one) gets the same prefix.
    """

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        try:
            reply = call_next(msg, context)
        except Exception as err:  # every failure becomes a reply
            name = site_name(context, name_prefix)
            log(ERROR, "%s: the ClientApp failed", name, exc_info=err)
            return _error(msg, f"site '{name}': {type(err).__name__}: {err}")
        if reply.has_error() and not (reply.error.reason or "").startswith("site '"):
            name = site_name(context, name_prefix)
            return _error(
                msg, f"site '{name}': {reply.error.reason}", code=reply.error.code
            )
        return reply

    mod.__name__ = "site_errors_mod"
    return mod


def _error(
    msg: Message, reason: str, code: int = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
) -> Message:
    if len(reason) > _MAX_REASON:
        reason = reason[: _MAX_REASON - 3] + "..."
    return Message(Error(code=code, reason=reason), reply_to=msg)
