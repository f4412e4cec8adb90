"""Split lists in the format of Ark's repository: which images are the train, val and test splits.

Ark (github.com/jlianglab/Ark) does not split datasets itself: ``Ark_MICCAI2023/dataset/`` (and
``Ark_Plus/dataset/<Dataset>/``) holds one text file per split, and ``Ark_MICCAI2023/dataloader.py``
reads each with a loader of its own. A line is an image name followed by its labels, either one
0/1 column per class (``ChestXray14.__init__``: ``line.split()``, ``lineItems[1:15]``;
``ShenzhenCXR.__init__``: ``line.split(',')``) or one class index (``RSNAPneumonia.__init__``:
``line.strip().split(' ')``, one-hot at ``int(lineItems[-1])``). arkfed does not ship these files.

A site's ``split_lists: DIR`` (:attr:`SplitConfig.lists`) makes a plugin that declares a
:class:`SplitListFormat` keep exactly the listed images, each in its list's split, in the lists'
order; images the lists do not name are left out, as Ark leaves them out. An entry is matched to
the plugin's rows by file name without its extension (Ark's RSNA lists name ``<patientId>.png``
where Kaggle ships ``<patientId>.dcm``). The labels stay those of the official label files, and
each listed label must agree with them (an entry that disagrees is an error naming the list file
and line), so a list cannot silently relabel an image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping

import numpy as np

from arkfed.datasets._label_files import LabelRecords, MissingImagesPolicy, SplitConfig, existing_files
from arkfed.errors import ArkfedError

LIST_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitListFormat:
    """How one dataset's split lists are written in Ark's repository.

    ``files``: split ("train", "val", "test") -> file name; without a "val" file the train list is
    the train pool, cut into train/val by patient. ``classes``: the label columns (or the classes
    the index counts), in the plugin's class names. ``separator``: None for any whitespace.
    ``folder``: Ark_Plus's subfolder of ``dataset/`` that holds the files (looked in after ``DIR``
    itself). ``reference``: where Ark reads them.
    """

    files: Mapping[str, str]
    classes: tuple[str, ...]
    labels: Literal["columns", "index"] = "columns"
    separator: str | None = None
    folder: str = ""
    reference: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.files) - set(LIST_SPLITS)
        if unknown or not {"train", "test"} <= set(self.files):
            raise ValueError(f"split list files must name train and test (and may name val), got {sorted(self.files)}")


@dataclass(frozen=True)
class ListEntry:
    split: str
    name: str
    labels: tuple[int, ...]  # one 0/1 per format class
    file: Path
    line: int


def list_file(directory: Path, name: str, fmt: SplitListFormat) -> Path | None:
    for folder in (directory, directory / fmt.folder) if fmt.folder else (directory,):
        if (folder / name).is_file():
            return folder / name
    return None


def parse_line(text: str, fmt: SplitListFormat, file: Path, line: int) -> tuple[str, tuple[int, ...]]:
    """One list line -> (image name, 0/1 per class); anything else names the file and line."""
    fields = [f.strip() for f in text.strip().split(fmt.separator)]
    k = len(fmt.classes)
    expected = 1 if fmt.labels == "index" else k
    if len(fields) != 1 + expected or not fields[0]:
        what = "a class index" if fmt.labels == "index" else f"{k} 0/1 label(s)"
        raise ArkfedError(f"{file}: line {line}: expected an image name and {what}, found {text.strip()!r}")
    values = fields[1:]
    if fmt.labels == "index":
        if values[0] not in {str(i) for i in range(k)}:
            raise ArkfedError(f"{file}: line {line}: class index {values[0]!r} is not one of 0..{k - 1} ({', '.join(fmt.classes)})")
        return fields[0], tuple(int(i == int(values[0])) for i in range(k))
    bad = [v for v in values if v not in ("0", "1")]
    if bad:
        raise ArkfedError(f"{file}: line {line}: label {bad[0]!r} is not 0 or 1")
    return fields[0], tuple(map(int, values))


def read_split_lists(directory: Path, fmt: SplitListFormat) -> list[ListEntry]:
    """Every entry of the format's list files in ``directory``; an image listed twice is an error."""
    if not directory.is_dir():
        raise ArkfedError(f"split list folder not found: {directory}")
    entries: list[ListEntry] = []
    seen: dict[str, ListEntry] = {}
    for split in LIST_SPLITS:
        name = fmt.files.get(split)
        if name is None:
            continue
        file = list_file(directory, name, fmt)
        if file is None:
            if split == "val":
                continue
            where = f"{directory} or {directory / fmt.folder}" if fmt.folder else str(directory)
            raise ArkfedError(f"split list not found: {name} (looked in {where}; the format of {fmt.reference or 'Ark'})")
        for number, text in enumerate(file.read_text().splitlines(), start=1):
            if not text.strip():
                continue
            image, labels = parse_line(text, fmt, file, number)
            entry = ListEntry(split, image, labels, file, number)
            first = seen.setdefault(image_key(image), entry)
            if first is not entry:
                raise ArkfedError(f"{file}: line {number}: {image} is listed again (first in {first.file}, line {first.line})")
            entries.append(entry)
    return entries


def image_key(name: str) -> str:
    """What an entry and a row are matched by: the file name without its extension."""
    return os.path.splitext(os.path.basename(name.replace("\\", "/")))[0]


def describe_source(records: LabelRecords) -> str:
    return str(records.source) if isinstance(records.source, Path) else f"{len(set(map(str, records.source)))} label files"


def apply_split_lists(records: LabelRecords, fmt: SplitListFormat, split: SplitConfig, missing_images: MissingImagesPolicy) -> LabelRecords:
    """The records of the listed images, in list order, with each list's split as the official one.

    A listed image that is not among the records or not on disk is an error naming the list file
    and line (with ``missing_images: drop`` it is left out instead). A listed label that differs
    from the records' is an error naming both files.
    """
    assert split.lists is not None
    entries = read_split_lists(Path(split.lists), fmt)
    keys = [image_key(str(p)) for p in records.paths]
    row_of: dict[str, int] = {}
    for row, key in enumerate(keys):
        if row_of.setdefault(key, row) != row:
            raise ArkfedError(f"{describe_source(records)}: two images are named {key!r}; split lists cannot tell them apart")
    rows = np.array([row_of.get(image_key(e.name), -1) for e in entries], dtype=int)
    present = rows >= 0
    present[present] = existing_files([records.paths[r] for r in rows[present]])
    if missing_images == "error" and not present.all():
        entry, row = entries[int(np.argmin(present))], rows[int(np.argmin(present))]
        where = f"missing: {records.paths[row]}" if row >= 0 else f"not in the dataset ({describe_source(records)})"
        raise ArkfedError(
            f"{entry.file}: line {entry.line}: listed image {entry.name} is {where}; "
            "add it, or set `missing_images: drop` under the site's options to use only the images present"
        )
    kept = [e for e, ok in zip(entries, present) if ok]
    subset = records.subset(rows[present])
    check_labels(subset, kept, fmt)
    has_val = any(e.split == "val" for e in entries)
    official = np.array([e.split if has_val or e.split != "train" else "trainval" for e in kept], dtype=object)
    source = np.array([e.file for e in kept], dtype=object)
    return LabelRecords(subset.paths, subset.labels, subset.meta, subset.classes, source, official)


def check_labels(records: LabelRecords, entries: list[ListEntry], fmt: SplitListFormat) -> None:
    """Each listed label against the records' (1 positive; anything else, blank included, 0)."""
    if set(fmt.classes) != set(records.classes):
        raise ValueError(f"split list classes {fmt.classes} are not the records' classes {records.classes}")
    order = [fmt.classes.index(c) for c in records.classes]
    listed = np.array([e.labels for e in entries], dtype=np.float32).reshape(len(entries), len(fmt.classes))[:, order]
    ours = (records.labels == 1).astype(np.float32)
    differ = (listed != ours).any(axis=1)
    if differ.any():
        i = int(np.argmax(differ))
        names = [", ".join(c for c, v in zip(records.classes, row) if v) or "none" for row in (listed[i], ours[i])]
        row_source = records.source if isinstance(records.source, Path) else records.source[i]
        raise ArkfedError(
            f"{entries[i].file}: line {entries[i].line}: {entries[i].name} is listed with positives [{names[0]}] "
            f"but {row_source} gives [{names[1]}]"
        )


def require_list_format(plugin_name: str, fmt: SplitListFormat | None, split: SplitConfig) -> None:
    """An error when a site gives split lists to a plugin that reads none."""
    if split.lists is not None and fmt is None:
        raise ArkfedError(
            f"plugin {plugin_name!r} reads no split lists: remove `split_lists:` from the site "
            "(Ark's lists are read by the chestxray14, rsna_pneumonia and shenzhen plugins)"
        )
