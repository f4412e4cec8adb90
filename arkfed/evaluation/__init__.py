"""Reusing a trained foundation model: export to plain timm, evaluation, linear probes,
fine-tuning, the gender-bias protocol, segmentation transfer, zero-shot prediction and scoring
(:mod:`.predict`, :mod:`.zero_shot`) and run reports. Commands over a site read it under a reading
protocol (``arkfed`` | ``ark``, :func:`arkfed.site.load.load_site`) and record it in their results.

Each module is a set of plain functions over models, tensors and dataset tables. The ``arkfed``
commands in :mod:`arkfed.cli.evaluation` are thin wrappers: each calls one entry function of
:mod:`arkfed.evaluation.commands` and prints a table of :mod:`arkfed.evaluation.tables`. Every
entry point takes its model through :func:`arkfed.evaluation.sources.load_models`, which accepts
a run folder, an export folder or a weights file. May import :mod:`arkfed.run` and below; never
federation, benchmarking or cli.
"""
