"""The coordinator side of a federated run: Flower's ServerApp, started by the SuperLink.

It reads the run folder that ``arkfed coordinator`` prepared (``config.yaml``,
``federation.json``), waits until every listed site has joined (identified by name through a
``query.hello`` message, and by its registered name when SuperNode authentication is on), then
runs Ark with the local coordinator's own pieces (:func:`arkfed.coordinator.initial_state`,
:func:`~arkfed.coordinator.after_visit`, the metric records, :class:`arkfed.runs.RunFolder`), so
the run folder is the same as in local mode. The only differences: the visits and evaluations
happen at the sites, the heads stay there (the checkpoint holds student and teacher only), and a
site that fails a visit is retried once and then skipped (a ``"kind": "skip"`` metrics line).

Resume: the checkpoint's visit counter says where to continue; each site's head version is the
last visit of that site the checkpoint includes, so the sites continue from matching heads.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Hashable

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from arkfed.errors import ArkfedError
from arkfed.federation import messages as m
from arkfed.federation.mailbox import Failure, exchange, online_nodes
from arkfed.federation.protocol import FederationSettings, parallel_plans, weighted_average
from arkfed.federation.status import FederationStatus, SiteStatus, write_status

RUN_DIR_KEY = "run-dir"
HELLO_TIMEOUT = 120.0


def _logger(run_dir: Path) -> logging.Logger:
    log = logging.getLogger(f"arkfed.coordinator.{run_dir}")
    if not log.handlers:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
        for handler in (logging.FileHandler(run_dir / "logs" / "coordinator.log"), logging.StreamHandler(sys.stdout)):
            handler.setFormatter(fmt)
            log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


class FederatedCoordinator:
    """One federated Ark run over a Flower Grid, writing the run folder as local mode does."""

    def __init__(self, grid: Grid, run_dir: str | Path, poll: float = 0.25, flower_run_id: int | None = None):
        from arkfed.runs import RunFolder

        self.grid, self.poll = grid, poll
        self.run = RunFolder(run_dir)
        self.config = self.run.read_config()
        self.fed = FederationSettings.read(self.run.path)
        self.log = _logger(self.run.path)
        self.nodes: dict[str, int] = {}
        self.known_nodes: set[int] = set()  # every node that answered a hello (members or not)
        self.schemas: dict = {}
        self.head_versions: dict[str, int] = {name: m.NO_HEAD for name in self.config.sites}
        self.initial_heads: dict = {}
        self.declared: dict[str, dict[str, int]] = {}  # split sizes each site declared when it joined
        self.checked: dict[str, m.VisitReply] = {}  # per site, its last visit reply as checked before use
        self.sent_bytes: dict[str, int] = {}
        self.status = FederationStatus(
            mode=self.fed.mode, rounds=self.config.rounds, total_visits=self.config.total_visits,
            sites={name: SiteStatus() for name in self.config.sites}, pid=os.getpid(), flower_run_id=flower_run_id,
        )
        self.started = time.perf_counter()

    # -- status ---------------------------------------------------------------------------
    def _site(self, name: str, state: str | None = None, detail: str | None = None, **metrics) -> None:
        entry = self.status.sites[name]
        if state is not None:
            entry.state = state
        if detail is not None:
            entry.detail = detail
        if metrics:
            entry.last_metrics.update(metrics)
        self._save_status()

    def _save_status(self) -> None:
        write_status(self.run.path, self.status)

    def _log_inbox(self, reply: Message) -> None:
        """``RUN/logs/inbox.jsonl``: what every message from a site carried (the coordinator's audit)."""
        import json

        entry = {"time": time.time(), "from_node": reply.metadata.src_node_id, "message_type": reply.metadata.message_type,
                 "group": reply.metadata.group_id}
        if reply.has_error():
            entry["error"] = {"code": reply.error.code, "reason": reply.error.reason}
        else:
            entry["content"] = m.describe_content(reply.content)
        with (self.run.path / "logs" / "inbox.jsonl").open("a") as f:
            f.write(json.dumps(entry, allow_nan=True) + "\n")

    def _warn(self, text: str) -> None:
        self.log.warning(text)
        self.status.warnings.append(text)
        self._save_status()

    # -- joining --------------------------------------------------------------------------
    def _hello_request(self, node_id: int) -> Message:
        request = m.json_record(run_uid=self.fed.run_uid, sites=self.config.sites, schemas=self.fed.schemas)
        return Message(m.request_content(request), node_id, m.HELLO, ttl=HELLO_TIMEOUT, group_id="join")

    def _identify(self, node_ids: list[int], registered: dict[int, str]) -> None:
        """Ask new nodes who they are; record the listed sites among them."""
        from arkfed.schema import LabelSchema

        replies = exchange(self.grid, {n: self._hello_request(n) for n in node_ids}, HELLO_TIMEOUT, self.poll,
                           on_reply=self._log_inbox)
        for node_id, reply in replies.items():
            if isinstance(reply, Failure):
                if reply.refused:
                    raise ArkfedError(f"a site was refused: {reply.reason}")
                self._warn(f"SuperNode {node_id} could not say which site it is: {reply.reason}")
                self.known_nodes.discard(node_id)  # ask again later
                continue
            try:  # a malformed hello is reported, never a crash
                name, member, schema, declared = m.read_hello_reply(reply.content)
            except m.BadReply as exc:
                self._warn(f"SuperNode {node_id} sent an unusable hello: {exc}")
                continue
            if registered.get(node_id) and registered[node_id] != name:
                self._warn(f"SuperNode {node_id} is registered as {registered[node_id]!r} but serves site {name!r}; ignored")
                continue
            if not member:
                self.log.info("site %r (node %s) is connected but not part of this run", name, node_id)
                continue
            recorded = self.fed.schemas.get(name)
            if recorded is not None and LabelSchema.model_validate(recorded) != schema:
                raise ArkfedError(
                    f"site {name!r} refused: its dataset schema {schema.describe()} differs from the run's record "
                    f"{LabelSchema.model_validate(recorded).describe()}"
                )
            old = self.nodes.get(name)
            if old is not None and old != node_id and old in online_nodes(self.grid):
                self._warn(f"two SuperNodes serve site {name!r} ({old} and {node_id}); keeping {old}")
                continue
            self.nodes[name], self.schemas[name], self.declared[name] = node_id, schema, declared
            self.status.sites[name].node_id = node_id
            sizes = {f"{k}_size": float(v) for k, v in declared.items()}
            self._site(name, "joined", f"node {node_id}", **sizes)
            self.log.info("site %r joined (node %s)", name, node_id)

    def _discover(self) -> None:
        """Say hello to online nodes that have not answered one yet."""
        nodes = list(self.grid.get_nodes())
        new = [n.node_id for n in nodes if n.node_id not in self.known_nodes]
        if new:
            self.known_nodes.update(new)
            self._identify(new, {n.node_id: n.name for n in nodes if n.name})

    def join(self) -> None:
        """Wait until every listed site has joined (or fail after ``join_timeout``)."""
        self.status.phase = "joining"
        self._save_status()
        deadline = time.monotonic() + self.fed.join_timeout
        while missing := [s for s in self.config.sites if s not in self.nodes]:
            if time.monotonic() > deadline:
                joined = sorted(self.nodes) or "none"
                notes = f"; warnings: {' | '.join(self.status.warnings)}" if self.status.warnings else ""
                raise ArkfedError(f"sites {missing} did not join within {self.fed.join_timeout:.0f} s (joined: {joined}){notes}")
            self._discover()
            time.sleep(self.poll)
        if not self.fed.schemas:
            self.fed.schemas = {name: self.schemas[name].model_dump(mode="json") for name in self.config.sites}
            self.fed.write(self.run.path)

    def _node_for(self, site: str, wait: float) -> int | None:
        """The site's current node (a restarted SuperNode is found again by name)."""
        deadline = time.monotonic() + wait
        while True:
            node = self.nodes.get(site)
            if node in online_nodes(self.grid):
                return node
            self._discover()
            if self.nodes.get(site) in online_nodes(self.grid):
                return self.nodes[site]
            if time.monotonic() >= deadline:
                return None
            time.sleep(self.poll)

    # -- requests -------------------------------------------------------------------------
    def _request(self, site: str, **extra):
        return m.json_record(
            run_uid=self.fed.run_uid, spec=self.state.student.spec, settings=self.config.settings,
            head_from=self.head_versions[site], schemas={site: self.fed.schemas[site]}, **extra,
        )

    def _content(self, site: str, request) -> RecordDict:
        arrays = {m.STUDENT: self.student_record, m.TEACHER: self.teacher_record}
        if self.head_versions[site] == m.NO_HEAD:
            arrays[m.HEAD] = m.model_record(self.initial_heads[site])
        return m.request_content(request, **arrays)

    def _refresh_records(self) -> None:
        self.student_record = m.model_record(self.state.student)
        self.teacher_record = m.model_record(self.state.teacher)

    def _send(self, kind: str, plans: dict[str, object], group: str) -> dict[str, Message | Failure]:
        """One request per site (visits: its plan; evaluations: the split), retried once."""
        results: dict[str, Message | Failure] = {}
        todo = dict(plans)
        for attempt in (1, 2):
            requests: dict[Hashable, Message] = {}
            for site, item in todo.items():
                node = self._node_for(site, self.fed.rejoin_wait if attempt == 2 else 0.0)
                if node is None:
                    results[site] = Failure("site is offline")
                    continue
                extra = {"plan": item} if kind == m.VISIT else {"split": item}
                content = self._content(site, self._request(site, **extra))
                self.sent_bytes[site] = sum(r.count_bytes() for r in content.array_records.values())
                requests[site] = Message(content, node, kind, ttl=self.fed.visit_timeout, group_id=group)
                self._site(site, "training" if kind == m.VISIT else "evaluating", f"attempt {attempt}" if attempt > 1 else "")
            if requests:
                results.update(exchange(self.grid, requests, self.fed.visit_timeout, self.poll, on_reply=self._log_inbox))
            todo = {}
            for site in plans:
                result = results.get(site)
                if isinstance(result, Failure):
                    what = "visit" if kind == m.VISIT else "evaluation"
                    self._warn(f"round {group}: {what} at site {site!r} failed (attempt {attempt}/2): {result.reason}")
                    self._site(site, "failed", result.reason)
                    if attempt == 1 and not result.refused:
                        todo[site] = plans[site]
            if not todo:
                break
        return results

    # -- the run --------------------------------------------------------------------------
    def _start_state(self) -> set[int]:
        """Fresh state (seeded exactly as local mode) or the checkpoint; returns evaluated rounds."""
        from arkfed.coordinator import initial_state, trim_metrics

        fresh = initial_state(self.config, self.schemas)
        self.initial_heads = fresh.heads
        if not self.run.has_checkpoint():
            fresh.heads = {}
            self.state = fresh
            return set()
        self.state = self.run.load_checkpoint()
        done = self.state.visits_done
        records = self.run.read_metrics()
        kept, evaluated = trim_metrics(records, done)
        skips = [r for r in records if r.get("kind") == "skip" and (
            (r["stage"] == "visit" and r["visit"] < done) or (r["stage"] == "evaluation" and r["round"] in evaluated))]
        keep = {id(r) for r in kept + skips}
        self.run.rewrite_metrics([r for r in records if id(r) in keep])
        for r in kept:
            if r.get("kind") == "visit":
                self.head_versions[r["site"]] = max(self.head_versions[r["site"]], r["visit"])
        self.log.info("resuming after visit %d/%d", done, self.config.total_visits)
        return evaluated

    def _visit_record(self, plan, reply: Message, seconds: float):
        from arkfed.coordinator import visit_record

        result = self.checked[plan.site].result
        received = sum(r.count_bytes() for r in reply.content.array_records.values())
        record = visit_record(plan, result) | {"round_trip_s": seconds, "bytes_sent": self.sent_bytes.get(plan.site, 0), "bytes_received": received}
        self.run.append_metrics(record)
        site = self.status.sites[plan.site]
        site.visits += 1
        self._site(plan.site, "done", f"visit {plan.visit + 1}", loss=result.loss, images_per_s=result.images_per_s)
        return result

    # -- issue 8: replies checked before use (logic in messages.read_visit_reply / arkfed.updates) --
    def _max_examples(self, site: str) -> int:
        from arkfed.updates import max_examples

        return max_examples(self.declared.get(site, {}).get("train", 0), self.config.settings)

    def _checked_visit(self, plan, reply):
        """The reply (its checked content in ``self.checked[site]``), or a Failure saying why it is
        not used (the visit is skipped, not retried)."""
        if isinstance(reply, Failure):
            return reply
        try:
            self.checked[plan.site] = m.read_visit_reply(
                reply.content, plan, self.state.student, self.state.teacher, self.config.settings.ema == "iteration",
                self._max_examples(plan.site), self.fed.max_update_norm,
            )
        except m.BadReply as exc:
            return Failure(f"rejected reply: {exc}", refused=True)
        return reply

    def _skip(self, rnd: int, visit: int, site: str, stage: str, failure: Failure) -> None:
        """Record a skipped visit/evaluation (metrics line, status, warning) and carry on."""
        from arkfed.coordinator import now

        self.run.append_metrics({
            "kind": "skip", "stage": stage, "round": rnd, "visit": visit, "site": site, "time": now(), "reason": failure.reason,
        })
        self.status.sites[site].skips += 1
        self._site(site, "skipped", f"skipped {stage} in round {rnd + 1}: {failure.reason}")
        why = "" if failure.refused else " after a failed retry"
        self._warn(f"site {site!r} skipped for the {stage} in round {rnd + 1}{why}: {failure.reason}")

    def _run_cyclic(self, evaluated: set[int]) -> None:
        from arkfed.coordinator import after_visit
        from arkfed.training import plan_visits

        plans = plan_visits(self.config)
        for rnd in range(self.config.rounds):
            self.status.round = rnd
            for plan in (p for p in plans if p.round == rnd and p.visit >= self.state.visits_done):
                self.status.phase = "training"
                self._refresh_records()
                start = time.perf_counter()
                result = self._send(m.VISIT, {plan.site: plan}, str(rnd))[plan.site]
                seconds = time.perf_counter() - start
                result = self._checked_visit(plan, result)  # issue 8: checked before use
                if isinstance(result, Failure):
                    self._skip(rnd, plan.visit, plan.site, "visit", result)
                    self.state.visits_done = plan.visit + 1
                else:
                    self.state.student.load_state_dict(self.checked[plan.site].student)
                    if self.checked[plan.site].teacher is not None:
                        self.state.teacher.load_state_dict(self.checked[plan.site].teacher)
                    after_visit(self.state, plan, self.config)
                    self.head_versions[plan.site] = plan.visit
                    self._visit_record(plan, result, seconds)
                self.run.save_checkpoint(self.state)
                self.status.visits_done = self.state.visits_done
                self._save_status()
            self._evaluate_round(rnd, evaluated)

    def _run_parallel(self, evaluated: set[int]) -> None:
        for rnd, plans in enumerate(parallel_plans(self.config)):
            self.status.round = rnd
            if plans[-1].visit < self.state.visits_done:
                self._evaluate_round(rnd, evaluated)
                continue
            self.status.phase = "training"
            self._refresh_records()
            start = time.perf_counter()
            results = self._send(m.VISIT, {p.site: p for p in plans}, str(rnd))
            seconds = time.perf_counter() - start
            results = {p.site: self._checked_visit(p, results[p.site]) for p in plans}  # issue 8: checked before use
            good = [(p, results[p.site]) for p in plans if not isinstance(results[p.site], Failure)]
            for plan in plans:
                if isinstance(results[plan.site], Failure):
                    self._skip(rnd, plan.visit, plan.site, "visit", results[plan.site])
            if good:
                self._average(good)
                for plan, reply in good:
                    self.head_versions[plan.site] = plan.visit
                    self._visit_record(plan, reply, seconds)
            self.state.visits_done = plans[-1].visit + 1
            self.run.save_checkpoint(self.state)
            self.status.visits_done = self.state.visits_done
            self._save_status()
            self._evaluate_round(rnd, evaluated)

    def _average(self, good) -> None:
        """FedAvg of the returned students (weights: samples seen), then the round's teacher update."""
        from arkfed.schedules import ema_update

        # weights: examples seen, never more than the site declared when it joined (issue 8)
        weights = [float(min(self.checked[plan.site].result.num_examples, self._max_examples(plan.site))) for plan, _ in good]
        students = [self.checked[plan.site].student for plan, _ in good]
        self.state.student.load_state_dict(weighted_average(students, weights))
        if self.config.settings.ema == "visit":
            ema_update(self.state.teacher, self.state.student, good[0][0].momentum)
        else:
            teachers = [self.checked[plan.site].teacher for plan, _ in good]
            self.state.teacher.load_state_dict(weighted_average(teachers, weights))

    def _evaluate_round(self, rnd: int, evaluated: set[int]) -> None:
        from arkfed.coordinator import eval_record, round_record

        if rnd in evaluated:
            return
        self.status.phase = "evaluating"
        self._refresh_records()
        split = self.config.eval_split
        results = self._send(m.EVALUATE, {site: split for site in self.config.sites}, str(rnd))
        records = []
        for site in self.config.sites:
            reply = results[site]
            if isinstance(reply, Failure):
                self._skip(rnd, self.state.visits_done, site, "evaluation", reply)
                continue
            try:  # issue 8: a malformed evaluation reply is skipped, never a crash
                checked = m.read_eval_reply(reply.content, self.schemas[site].classes, self.declared.get(site, {}).get(split))
            except m.BadReply as exc:
                self._skip(rnd, self.state.visits_done, site, "evaluation", Failure(f"rejected reply: {exc}", refused=True))
                continue
            for label in (m.STUDENT, m.TEACHER):
                if label in checked:
                    records.append(eval_record(rnd, site, label, split, checked[label]))
            student = next((r for r in records if r["site"] == site and r["model"] == m.STUDENT), None)
            teacher = next((r for r in records if r["site"] == site and r["model"] == m.TEACHER), None)
            self._site(site, "done", f"round {rnd + 1} evaluated",
                       student_auc=student and student["mean_auc"], teacher_auc=teacher and teacher["mean_auc"])
        for record in records:
            self.run.append_metrics(record)
        self.run.save_weights(self.state)
        self.run.append_metrics(round_record(rnd, time.perf_counter() - self.started))
        self.log.info("round %d/%d evaluated", rnd + 1, self.config.rounds)

    def _finish(self) -> dict:
        from arkfed.coordinator import build_summary

        self.run.save_weights(self.state)
        records = self.run.read_metrics()
        summary = build_summary(self.config, records, time.perf_counter() - self.started)
        for name, entry in summary["sites"].items():
            entry["task"] = self.schemas[name].task
        skips = [r for r in records if r.get("kind") == "skip"]
        summary["federation"] = {"mode": self.fed.mode, "skipped": skips}
        self.run.write_summary(summary)
        return summary

    def run_federation(self) -> dict:
        """Join, train (cyclic or parallel), evaluate each round, write the summary."""
        try:
            self.join()
            evaluated = self._start_state()
            self.status.visits_done = self.state.visits_done
            if self.fed.mode == "cyclic":
                self._run_cyclic(evaluated)
            else:
                self._run_parallel(evaluated)
            summary = self._finish()
            self.status.phase, self.status.summary = "finished", summary
            for name in self.config.sites:
                if self.status.sites[name].state not in ("skipped", "failed"):
                    self.status.sites[name].state = "done"
            self.log.info("run finished: %s", self.run.path)
            return summary
        except BaseException as exc:
            self.status.phase, self.status.error = "failed", str(exc) or type(exc).__name__
            self.log.error("run failed: %s", self.status.error)
            raise
        finally:
            self._save_status()


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point: the run folder comes from the generated app's run config."""
    FederatedCoordinator(grid, Path(str(context.run_config[RUN_DIR_KEY])), flower_run_id=context.run_id).run_federation()
