"""Sending requests to sites through Flower's Grid and collecting replies, with deadlines.

Flower's ``send_and_receive`` waits without a per-site deadline and polls every 3 s; a visit
needs to know quickly when its site is gone. :func:`exchange` pushes all requests at once, pulls
replies every ``poll`` seconds and ends a request early when its SuperNode leaves the federation
(Flower lists online nodes only), when it times out, or when the reply is an error.
"""

from __future__ import annotations

import time
from typing import Callable, Hashable, Mapping

from flwr.app import Message
from flwr.serverapp import Grid

from arkfed.federation.messages import SITE_REFUSED
from arkfed.run.loop import SiteFailure


def reply_failure(reply: Message) -> SiteFailure | None:
    if not reply.has_error():
        return None
    error = reply.error
    return SiteFailure(str(error.reason or f"error code {error.code}"), refused=error.code == SITE_REFUSED)


def online_nodes(grid: Grid) -> set[int]:
    return set(grid.get_node_ids())


def exchange(
    grid: Grid,
    requests: Mapping[Hashable, Message],
    timeout: float,
    poll: float = 0.25,
    liveness_every: float = 1.0,
    on_reply: Callable[[Message], None] | None = None,
) -> dict[Hashable, Message | SiteFailure]:
    """Send every request and wait for each reply until its deadline; never raises for a site.

    Returns, per request key, the reply or a :class:`~arkfed.run.loop.SiteFailure` (error reply, site offline, timeout).
    ``on_reply`` sees every reply that arrives (the coordinator's inbox log).
    """
    keys = list(requests)
    message_ids = list(grid.push_messages([requests[k] for k in keys]))
    pending = {mid: key for mid, key in zip(message_ids, keys)}
    node_of = {key: requests[key].metadata.dst_node_id for key in keys}
    results: dict[Hashable, Message | SiteFailure] = {}
    deadline = time.monotonic() + timeout
    next_liveness = time.monotonic() + liveness_every
    while pending:
        for reply in grid.pull_messages(list(pending)):
            if on_reply is not None:
                on_reply(reply)
            key = pending.pop(reply.metadata.reply_to_message_id, None)
            if key is not None:
                results[key] = reply_failure(reply) or reply
        if not pending:
            break
        now = time.monotonic()
        if now >= deadline:
            for key in pending.values():
                results[key] = SiteFailure(f"no reply within {timeout:.0f} s", away=True, timed_out=True)
            break
        if now >= next_liveness:
            alive = online_nodes(grid)
            for mid, key in list(pending.items()):
                if node_of[key] not in alive:
                    results[key] = SiteFailure("site went offline (its SuperNode stopped or lost its connection)", away=True)
                    del pending[mid]
            next_liveness = now + liveness_every
        time.sleep(poll)
    return results
