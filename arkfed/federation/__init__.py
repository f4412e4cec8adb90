"""Federated Ark with Flower: the coordinator and the sites run the local mode's pieces remotely.

Who runs what:

- the coordinator (``arkfed coordinator``, :mod:`.coordinator`): a Flower SuperLink
  (:mod:`.coordinator.launcher`) behind a gateway that forwards only the Fleet API
  (:mod:`.coordinator.gateway`), and arkfed's ServerApp (:mod:`.coordinator.server_app`), whose
  ``FlowerSites`` drive the one loop of :mod:`arkfed.run.loop` exactly as a local run does;
- each site (``arkfed site``, :mod:`.site`): a Flower SuperNode (:mod:`.site.node`) whose ClientApp
  (:mod:`.site.client_app`) runs :mod:`arkfed.ark.tasks` on the site's own data, keeping its heads
  (:mod:`.site.heads`); tasks start from a warm process (:mod:`.site.executor`);
- on one machine (``arkfed train --federated``): :mod:`.loopback`.

May import :mod:`arkfed.run` and below. Both sides import the modules here, never each other: :mod:`.messages` (what travels),
:mod:`.protocol`, :mod:`.signing`, :mod:`.certs`, :mod:`.processes`, :mod:`.flower_app`.
What travels (:mod:`.messages`): model arrays and scalar metrics, plus a site's name and label
schema when it joins. Security (:mod:`.certs`): TLS and registered site keys, on by default; only
arkfed's own task launchers can claim Flower's tasks on either machine (:mod:`.superexec`).
Flower is imported by these modules, so import them lazily from the CLI.
"""
