"""Federated Ark with Flower: the coordinator and the sites run the local mode's pieces remotely.

Who runs what:

- the coordinator (``arkfed coordinator``): a Flower SuperLink (:mod:`.launcher`) and arkfed's
  ServerApp (:mod:`.server_app`), which plans the run exactly as local mode does, keeps student and
  teacher, applies the teacher EMA and writes the usual run folder;
- each site (``arkfed site``): a Flower SuperNode (:mod:`.site_node`) whose ClientApp
  (:mod:`.client_app`) runs :func:`arkfed.visit.train_site_visit` and
  :func:`arkfed.metrics.evaluate_site` on the site's own data, keeping its head
  (:mod:`.site_state`); tasks start from a warm process (:mod:`.site_executor`);
- on one machine (``arkfed train --federated``): :mod:`.loopback`.

What travels (:mod:`.messages`): model arrays and scalar metrics, plus a site's name and label
schema when it joins. Security (:mod:`.certs`): TLS and registered site keys, on by default; only
arkfed's own task launchers can claim Flower's tasks on either machine (:mod:`.superexec`).
Flower is imported by these modules, so import them lazily from the CLI.
"""
