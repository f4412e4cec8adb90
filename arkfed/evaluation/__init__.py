"""Reusing a trained foundation model: export to plain timm, evaluation, linear probes,
fine-tuning, the gender-bias protocol, segmentation transfer, zero-shot prediction and run reports.

Each module is a set of plain functions over models, tensors and dataset tables. The ``arkfed``
commands in :mod:`arkfed.cli.evaluation` are thin wrappers: each calls one entry function of
:mod:`arkfed.evaluation.commands` and prints a table of :mod:`arkfed.evaluation.tables`. Every
entry point takes its model through :func:`arkfed.evaluation.sources.load_models`, which accepts
a run folder, an export folder or a weights file. May import :mod:`arkfed.run` and below; never
federation, benchmarking or cli.
"""
