"""TEST ONLY: makes a site misbehave, loaded by the ClientApp through ARKFED_TEST_SITE_HOOK.

``ARKFED_TEST_FAULTS`` names a JSON file mapping ``"<site>:visit:<index>"`` or
``"<site>:eval"`` (every evaluation) to a fault; the file is read at every message, so a test changes the
faults between runs without restarting the sites. Faults tamper with the reply the honest site
built (after its own checks), as a buggy or hostile site would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord

from arkfed.federation import messages as m

FAULTS_ENV = "ARKFED_TEST_FAULTS"
LEAKY_ERROR = r"cannot identify image file 'C:\Users\Jane Doe\MIMIC CXR\files\p10\p10000032\s50414267\02aa804e.jpg'"


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
    else:
        return None
    return faults.get(key)


def _replace_array(record: ArrayRecord, dtype: str, values: np.ndarray) -> ArrayRecord:
    out = ArrayRecord()
    for key in record:
        out[key] = Array(values) if key == dtype else record[key]
    return out


def misbehave(msg, context, reply):
    fault = _fault(msg, context)
    if fault is None or reply.has_error():
        return reply
    content = reply.content
    if fault == "error":
        raise OSError(LEAKY_ERROR)
    if fault == "nan":
        values = content[m.STUDENT]["float32"].numpy().copy()
        values[len(values) // 2] = np.nan
        content[m.STUDENT] = _replace_array(content[m.STUDENT], "float32", values)
    elif fault == "shape":
        values = content[m.STUDENT]["float32"].numpy()
        content[m.STUDENT] = _replace_array(content[m.STUDENT], "float32", np.append(values, np.float32(0)))
    elif fault == "missing":
        del content[m.STUDENT]
    elif fault == "examples":
        content[m.METRICS]["num_examples"] = 10**9
    elif fault == "site_metric":
        content[m.STUDENT]["site"] = 1.0
    else:
        raise ValueError(f"unknown test fault {fault!r}")
    return reply
