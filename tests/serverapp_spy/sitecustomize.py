"""TEST ONLY: records everything arkfed's ServerApp receives. Nothing of it is in the arkfed package.

The secure aggregation test puts this folder first on ``PYTHONPATH``, so every Python process of
the federation imports this module at start-up (Python's ``sitecustomize`` hook). Only with
``ARKFED_TEST_INBOX_DIR`` set, and only in the process that loads Flower's ``HttpGrid`` (the
coordinator's ServerApp task, whose Grid it is), it wraps ``HttpGrid.pull_messages``: every
message pulled from the SuperLink (every reply from every site, as the ServerApp gets it) is
saved whole, as a pickle in that folder: records by name, arrays as numpy, config values as sent.
"""

from __future__ import annotations

import itertools
import os
import pickle
import sys

ENV = "ARKFED_TEST_INBOX_DIR"
TARGET = "flwr.superlink.grid.http_grid"
_count = itertools.count()


def _record(record) -> dict:
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    if isinstance(record, ArrayRecord):
        return {"kind": "arrays", "values": {key: array.numpy() for key, array in record.items()}}
    if isinstance(record, (ConfigRecord, MetricRecord)):
        return {"kind": "config" if isinstance(record, ConfigRecord) else "metrics", "values": dict(record.items())}
    return {"kind": type(record).__name__, "values": {}}


def _save(folder: str, message) -> None:
    entry = {"message_type": message.metadata.message_type, "src_node_id": message.metadata.src_node_id,
             "error": message.has_error(), "records": {}}
    if not message.has_error():
        entry["records"] = {name: _record(record) for name, record in message.content.items()}
    with open(os.path.join(folder, f"{os.getpid()}-{next(_count):05d}.pkl"), "wb") as f:
        pickle.dump(entry, f)


def _patch(module) -> None:
    original = module.HttpGrid.pull_messages

    def pull_messages(self, message_ids):
        messages = list(original(self, message_ids))
        for message in messages:
            _save(os.environ[ENV], message)
        return messages

    module.HttpGrid.pull_messages = pull_messages


class _Finder:
    """Patches the module right after Python executes it."""

    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get(ENV):
    sys.meta_path.insert(0, _Finder())
