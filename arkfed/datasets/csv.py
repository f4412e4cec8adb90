"""The generic ``csv`` plugin: any dataset described by one CSV and a site's ``options:``.

All logic lives in :mod:`arkfed.datasets._csv` so that plugins written by ``arkfed add-dataset``
can subclass :class:`~arkfed.datasets._csv.CsvDatasetPlugin` with their own defaults. Example::

    dataset: csv
    options:
      file: labels.csv
      image_column: path
      label_columns: [Pneumonia, Effusion]
      patient_column: patient
"""

from __future__ import annotations

from arkfed.datasets import CsvDatasetPlugin, register_dataset


@register_dataset
class GenericCsv(CsvDatasetPlugin):
    name = "csv"
    description = "any dataset described by one CSV (image-path column + label columns, declared in the site's options)"
