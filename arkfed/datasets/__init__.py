"""Dataset plugins: the public API a plugin author imports, and the built-in plugins.

``from arkfed.datasets import DatasetPlugin, LabelSchema, register_dataset, ...`` is the one
import point for plugin code (the built-ins, ``arkfed add-dataset``'s output and third-party
packages use it). The machinery lives in the private modules (``_plugin``: the base class and
discovery; ``_label_files``: readers of official label files; ``_split_lists``: Ark's split lists;
``_csv``: the generic CSV reader; ``_scaffold``: ``add-dataset``). Every other module here is one built-in dataset, found by
discovery and declared under the ``arkfed.datasets`` entry point group, as a contributor's
package declares its own. May import :mod:`arkfed.data` and the top-level vocabulary only.
"""

from arkfed.data.findings import CHESTXRAY14_CLASSES, CHEXPERT_CLASSES, canonical_finding
from arkfed.data.imageio import read_image
from arkfed.data.schema import CHEXPERT_LABELER_SCHEMA, UNCERTAIN, LabelSchema, MissingPolicy, TaskType, UncertainPolicy
from arkfed.data.tables import SPLITS, ArrayImages, DatasetTable, FileImages, make_meta, patient_split, split_table
from arkfed.datasets._csv import CsvDatasetPlugin, CsvOptions
from arkfed.datasets._label_files import (
    FileDatasetOptions,
    LabelRecords,
    ReadingProtocol,
    SplitConfig,
    assemble_splits,
    check_label_values,
    concat_records,
    find_label_file,
    label_matrix,
    list_files,
    locate_images,
    present_images,
    read_csv,
    require_columns,
    split_records,
)
from arkfed.datasets._plugin import DatasetPlugin, NoOptions, discover_plugins, get_plugin, register_dataset
from arkfed.datasets._split_lists import SplitListFormat, require_list_format
from arkfed.errors import ArkfedError

__all__ = [
    "CHESTXRAY14_CLASSES", "CHEXPERT_CLASSES", "CHEXPERT_LABELER_SCHEMA", "SPLITS", "UNCERTAIN",
    "ArkfedError", "ArrayImages", "CsvDatasetPlugin", "CsvOptions", "DatasetPlugin", "DatasetTable",
    "FileDatasetOptions", "FileImages", "LabelRecords", "LabelSchema", "MissingPolicy", "NoOptions", "ReadingProtocol",
    "SplitConfig", "SplitListFormat", "TaskType", "UncertainPolicy",
    "assemble_splits", "canonical_finding", "check_label_values", "concat_records", "discover_plugins",
    "find_label_file", "get_plugin", "label_matrix", "list_files", "locate_images", "make_meta",
    "patient_split", "present_images", "read_csv", "read_image", "register_dataset", "require_columns",
    "require_list_format", "split_records", "split_table",
]
