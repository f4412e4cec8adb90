"""Secure aggregation's messages, shared by both sides (``secure_aggregation: true``, parallel mode).

A parallel round with secure aggregation is two exchanges:

1. arkfed's own ``train.visit`` requests, signed as always (:mod:`.signing`); the request carries
   :data:`SECURE_FIELD` (the norm bound each site clips its update to, and its weighting) and the
   site's reply carries the visit's scalar metrics only, never a model: the site keeps its clipped
   update (:mod:`arkfed.federation.site.secure`);
2. Flower's SecAgg+ over the sites whose visits were accepted: :class:`flwr.server.workflow.SecAggPlusWorkflow`
   at the coordinator (:mod:`arkfed.federation.coordinator.secure`) and
   :func:`flwr.client.mod.secaggplus_mod` at the sites, unchanged. Its four stages are Flower
   ``train`` messages (:data:`SECURE`) whose protocol fields are Flower's config record
   :data:`CONFIGS`. arkfed adds its request record to each: the run id, the site's visit plan (which
   update is meant) and :func:`config_digest` of the protocol fields, signed by the coordinator's
   signing service like a visit, so a site's gate checks them like every other request and only
   the coordinator that signed the run can drive the protocol.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from flwr.app.message_type import MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

SECURE = MessageType.TRAIN  # "train": the message type Flower's SecAgg+ workflow sends and its mod acts on
CONFIGS = RECORD_KEY_CONFIGS  # the protocol's own fields, Flower's config record
SECURE_FIELD = "secure"  # visit request field: {"max_norm": float, "weighting": "samples" | "equal"}
DIGEST_FIELD = "secagg"  # secure-aggregation request field: config_digest of the protocol fields


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_digest(record) -> str:
    """SHA-256 over a config record's keys and values (bytes as hex), so a signature over it covers them."""
    body = json.dumps({str(k): _plain(v) for k, v in record.items()}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def weight_of(weighting: str, num_examples: int) -> int:
    """A site's weight in the secure mean, as the plain mean weights it (:mod:`arkfed.run.aggregation`)."""
    return 1 if weighting == "equal" else int(num_examples)
