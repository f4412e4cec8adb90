"""TEST ONLY: makes a site misbehave, from the test's side: the production ClientApp has no hook.

In a test process, :func:`faulty_app` is arkfed's site ClientApp with one more Flower mod
(:func:`misbehave`) inside the audit mod, so a fault's reply or error is audited like a real one.
For real site processes, :func:`use_faulty_executors` makes :class:`~arkfed.federation.site.node.SiteNode`
start ``tests/faulty_site_executor.py`` instead of ``python -m arkfed.federation.site.executor``:
that launcher installs :func:`faulty_app` as the site's ClientApp in its own process, then runs the
executor's normal ``main`` (every task it forks inherits the installed app).

``ARKFED_TEST_FAULTS`` names a JSON file mapping ``"<site>:visit:<index>"``, ``"<site>:eval"``
(every evaluation) or ``"<site>:hello"`` to a fault; the file is read at every message, so a test
changes the faults between runs without restarting the sites. Faults tamper with the reply the
honest site built (after its own checks), as a buggy or hostile site would.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord

from arkfed.federation import messages as m

FAULTS_ENV = "ARKFED_TEST_FAULTS"
LAUNCHER = Path(__file__).resolve().parent / "faulty_site_executor.py"
EXECUTOR_MODULE = "arkfed.federation.site.executor"
LEAKY_ERROR = r"cannot identify image file 'C:\Users\Jane Doe\MIMIC CXR\files\p10\p10000032\s50414267\02aa804e.jpg'"
FLIP = -2.4  # "flip": the honest update reversed and scaled, as in issue 21


def _fault(msg, context) -> str | None:
    path = os.environ.get(FAULTS_ENV)
    if not path or not Path(path).is_file():
        return None
    faults = json.loads(Path(path).read_text())
    site = str(context.node_config.get("site"))
    if msg.metadata.message_type == m.VISIT:
        key = f"{site}:visit:{m.read_json(msg.content[m.REQUEST], 'plan')['visit']}"
    elif msg.metadata.message_type == m.EVALUATE:
        key = f"{site}:eval"
    elif msg.metadata.message_type == m.HELLO:
        key = f"{site}:hello"
    else:
        return None
    return faults.get(key)


def _replace_array(record: ArrayRecord, dtype: str, values: np.ndarray) -> ArrayRecord:
    out = ArrayRecord()
    for key in record:
        out[key] = Array(values) if key == dtype else record[key]
    return out


def tamper(msg, reply, fault: str):
    """The reply to ``msg`` as a site with ``fault`` sends it."""
    content = reply.content
    if fault == "error":
        raise OSError(LEAKY_ERROR)
    if fault in ("nan", "scale", "flip"):
        values = content[m.STUDENT]["float32"].numpy().astype(np.float64)
        if fault == "nan":
            values[len(values) // 2] = np.nan
        elif fault == "scale":  # the returned weights x 1e6
            values *= 1e6
        else:  # the honest update reversed and scaled: sent + FLIP * (returned - sent)
            sent = msg.content[m.STUDENT]["float32"].numpy().astype(np.float64)
            values = sent + FLIP * (values - sent)
        content[m.STUDENT] = _replace_array(content[m.STUDENT], "float32", values.astype(np.float32))
    elif fault == "shape":
        values = content[m.STUDENT]["float32"].numpy()
        content[m.STUDENT] = _replace_array(content[m.STUDENT], "float32", np.append(values, np.float32(0)))
    elif fault == "missing":
        del content[m.STUDENT]
    elif fault == "examples":
        content[m.METRICS]["num_examples"] = 10**9
    elif fault == "site_metric":
        content[m.STUDENT]["site"] = 1.0
    elif fault == "auc":  # an impossible AUC and a negative loss
        content[m.STUDENT]["mean_auc"] = 1e9
        content[m.TEACHER]["loss"] = -5.0
    elif fault == "train_size":  # a hello claiming a billion training images
        content[m.METRICS]["train_size"] = 10**9
    else:
        raise ValueError(f"unknown test fault {fault!r}")
    return reply


def misbehave(msg, context, call_next):
    """Flower mod: the honest reply, then the fault the test asked for."""
    reply = call_next(msg, context)
    fault = _fault(msg, context)
    if fault is None or reply.has_error():
        return reply
    return tamper(msg, reply, fault)


KEPT_ENV = "ARKFED_TEST_KEPT_DIR"


def record_kept(msg, context, call_next):
    """Flower mod: with ``ARKFED_TEST_KEPT_DIR`` set, after a secure visit, save the update the site
    kept for the secure aggregation (clipped, before any masking) as the test's reference:
    ``<dir>/<site>-visit-<index>.npz`` (arrays in order, and ``weight``)."""
    from arkfed.federation.site.secure import KEPT, UPDATE

    reply = call_next(msg, context)
    folder = os.environ.get(KEPT_ENV)
    if folder and msg.metadata.message_type == m.VISIT and not reply.has_error() and UPDATE in context.state.array_records:
        kept = context.state.config_records[KEPT]
        arrays = {f"a{i:04d}": a.numpy() for i, a in enumerate(context.state.array_records[UPDATE].values())}
        site = str(context.node_config.get("site"))
        np.savez(Path(folder) / f"{site}-visit-{int(kept['visit'])}.npz", weight=np.int64(kept["weight"]), **arrays)
    return reply


def faulty_app():
    """arkfed's site ClientApp with :func:`misbehave` inside its audit mod (same handlers)."""
    from arkfed.federation.site import client_app as site

    return site.register_handlers(site.SiteClientApp(mods=[site.audit_outgoing, misbehave, record_kept]))


def install() -> None:
    """In a site's executor process: its tasks run :func:`faulty_app` (the executor's gate
    imports ``client_app.app`` when a message arrives)."""
    from arkfed.federation.site import client_app

    client_app.app = faulty_app()


def use_faulty_executors(monkeypatch) -> None:
    """Sites started from now on (in this test process) run ``tests/faulty_site_executor.py``."""
    from arkfed.federation.processes import ManagedProcess
    from arkfed.federation.site import node

    class FaultyLauncher(ManagedProcess):
        @classmethod
        def start(cls, name, argv, env, log_path, cwd=None):
            argv = list(argv)
            if argv[1:3] == ["-m", EXECUTOR_MODULE]:
                argv[0:3] = [sys.executable, str(LAUNCHER)]
            return ManagedProcess.start(name, argv, env, log_path, cwd)

    monkeypatch.setattr(node, "ManagedProcess", FaultyLauncher)


def faulty_executors(sites) -> bool:
    """True when every site's executor runs the test launcher (checked by the tests that rely on it)."""
    return all(node.executor is not None and str(LAUNCHER) in node.executor.argv for node in sites)
