"""The coordinator's side of secure aggregation: Flower's SecAgg+ workflow for a parallel round's mean.

arkfed's ServerApp is not a Flower strategy loop: it is the one Ark loop (:mod:`arkfed.run.loop`)
driving :class:`~arkfed.federation.coordinator.server_app.FlowerSites`, with arkfed's own signed
messages. Flower's :class:`~flwr.server.workflow.SecAggPlusWorkflow` is built for the other shape
(it asks a legacy ``Strategy`` whom to train, sends the fit instructions itself and hands the
unmasked sum to ``Strategy.aggregate_fit``). The smallest honest fit is to run the workflow,
unchanged, for the aggregation step only, after the visits (:mod:`arkfed.federation.secagg`):

- the visits are arkfed's ``train.visit`` requests; each site replies with metrics only and keeps
  its checked, clipped update (:mod:`arkfed.federation.site.secure`);
- :func:`secure_mean` then runs the workflow over the sites whose visits the loop accepted, with
  a :class:`SumOnly` strategy (``configure_fit`` names those sites and sends them no parameters;
  ``aggregate_fit`` only records the mean the workflow unmasked) on a :class:`SignedGrid`: the
  Grid the workflow talks to, which adds arkfed's request record and the signing service's
  authorization to every stage message (as for a visit), sends with arkfed's deadlines
  (:func:`~arkfed.federation.coordinator.mailbox.exchange`) and logs every reply in
  ``RUN/logs/inbox.jsonl`` like every other message.

What the coordinator then holds is the weighted mean of the sites' clipped updates (weights:
examples or equal, as the plain ``mean`` rule), quantised by the workflow: each coordinate of an
update is clipped to ``[-max_norm, max_norm]`` (never binding: a clipped update's coordinates are
within its norm) and stochastically rounded to :data:`QUANTIZATION` levels, so the mean is exact
up to ``sites x 2 x max_norm / QUANTIZATION / sum of weight ratios`` per coordinate
(:func:`quantisation_tolerance`). Every share is needed to unmask (reconstruction threshold 1.0):
a site that drops out during the protocol costs the round its update, never anyone's privacy.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.server.strategy import Strategy

from arkfed.federation import messages as m
from arkfed.federation.coordinator.mailbox import exchange
from arkfed.federation.secagg import CONFIGS, SECURE, config_digest
from arkfed.run.loop import SiteFailure

QUANTIZATION = 2**22  # Flower's default quantisation range
MODULUS = 2**32  # Flower's default (and largest) modulus: at most MODULUS / QUANTIZATION sites


def quantisation_tolerance(sites: int, max_norm: float, ratios: float) -> float:
    """Largest error per coordinate of the unmasked mean: one quantum of ``2 * max_norm / QUANTIZATION``
    per site (stochastic rounding), divided by the sum of the sites' weight ratios (weight / max weight)."""
    return sites * 2.0 * max_norm / QUANTIZATION / ratios


class SumOnly(Strategy):
    """The legacy strategy SecAgg+ needs: it asks exactly ``proxies`` and keeps the unmasked mean."""

    def __init__(self, proxies):
        self.proxies = proxies
        self.mean: list[np.ndarray] | None = None
        self.contributors: list[int] = []

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(proxy, FitIns(Parameters(tensors=[], tensor_type=""), {})) for proxy in self.proxies]

    def aggregate_fit(self, server_round, results, failures):
        if results:  # the workflow set every result's parameters to the unmasked mean
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
            self.contributors = [proxy.node_id for proxy, _ in results]
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class SignedGrid:
    """The Grid Flower's workflow sends through (see the module docstring)."""

    def __init__(self, grid, run_uid: str, plans: Mapping[int, object], authorizer, timeout: float, poll: float,
                 on_reply: Callable[[Message], None] | None):
        self.grid, self.run_uid, self.plans, self.authorizer = grid, run_uid, plans, authorizer
        self.timeout, self.poll, self.on_reply = timeout, poll, on_reply
        self.failures: dict[int, str] = {}

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        requests = {}
        for message in messages:  # the workflow may send one content object to every site: each gets its own
            node, meta = message.metadata.dst_node_id, message.metadata
            content = RecordDict(dict(message.content.items()))
            content[m.REQUEST] = m.json_record(run_uid=self.run_uid, plan=self.plans[node],
                                               secagg=config_digest(content.config_records[CONFIGS]))
            if self.authorizer is not None:
                self.authorizer.authorize(SECURE, content)
            requests[node] = Message(content, node, meta.message_type, ttl=meta.ttl, group_id=meta.group_id)
        results = exchange(self.grid, requests, timeout or self.timeout, self.poll, on_reply=self.on_reply)
        for node, result in results.items():
            if isinstance(result, SiteFailure):
                self.failures[node] = result.reason
        return [result for result in results.values() if isinstance(result, Message)]


def secure_mean(grid, nodes: Mapping[str, int], plans: Mapping[str, object], run_uid: str, max_norm: float, max_weight: float,
                timeout: float, poll: float = 0.25, authorizer=None, on_reply=None) -> tuple[list[np.ndarray], list[str]] | SiteFailure:
    """The weighted mean of the kept updates of the sites in ``nodes`` (site -> node id; ``plans``:
    each site's visit plan), by Flower's SecAgg+, and the sites it includes; or why there is none."""
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey

    if len(nodes) < 2:
        return SiteFailure(f"secure aggregation needs at least two accepted visits, got {len(nodes)}: the mean of one "
                           "would be that site's update")
    site_of = {node: site for site, node in nodes.items()}
    rnd = int(getattr(next(iter(plans.values())), "round", 0))
    strategy = SumOnly([GridClientProxy(node, grid, 0) for node in nodes.values()])
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd + 1}), MAIN_PARAMS_RECORD: ArrayRecord()})
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}), strategy=strategy)
    signed = SignedGrid(grid, run_uid, {node: plans[site] for site, node in nodes.items()}, authorizer, timeout, poll, on_reply)
    workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=1.0, max_weight=float(max_weight),
                                  clipping_range=float(max_norm), quantization_range=QUANTIZATION, modulus_range=MODULUS,
                                  timeout=timeout)
    try:
        workflow(signed, context)
    except Exception as exc:  # a site's malformed protocol reply skips the round's update, never the run
        return SiteFailure(f"secure aggregation failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}", refused=True)
    if strategy.mean is None:
        failed = "; ".join(f"{site_of.get(node, node)}: {reason}" for node, reason in signed.failures.items())
        return SiteFailure(f"secure aggregation did not complete ({failed or 'a site left the protocol'})")
    return strategy.mean, sorted(site_of[node] for node in strategy.contributors)
