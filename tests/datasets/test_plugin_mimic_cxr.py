"""The mimic_cxr plugin on a small dataset written in PhysioNet's MIMIC-CXR-JPG layout.

MIMIC-CXR is credentialed data, so no real file is available; the files below follow the
published column layout (gzipped as PhysioNet ships them) with tiny stand-in images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from arkfed.data.findings import CHEXPERT_CLASSES
from arkfed.data.schema import UNCERTAIN
from arkfed.datasets._label_files import SplitConfig
from arkfed.datasets._plugin import get_plugin
from arkfed.errors import ArkfedError

PREFIX = "mimic-cxr-2.0.0"

# subject, study, dicom, view, official split
DICOMS = [
    (10000032, 50414267, "02aa804e-bde0afdd", "PA", "train"),
    (10000032, 50414267, "174413ec-4ec4c1f7", "LATERAL", "train"),
    (10000032, 53189527, "2a2277a9-b0ded155", "AP", "train"),
    (10000764, 57375967, "096052b7-d256dc40", "AP", "validate"),
    (11000183, 51967845, "3c0f9d5b-8b7f9c2e", "PA", "test"),
    (11000183, 51967845, "9a1f3e2d-77aa11bb", "PA", "test"),
    (19999068, 58971208, "5e1b7c3a-0d9e2f4b", "AP", "train"),
]


def plugin(**options):
    return get_plugin("mimic_cxr")(options)


def study_labels() -> pd.DataFrame:
    studies = sorted({(s, st) for s, st, *_ in DICOMS})
    rng = np.random.default_rng(0)
    values = rng.choice([1.0, 0.0, UNCERTAIN, np.nan], size=(len(studies), len(CHEXPERT_CLASSES)))
    frame = pd.DataFrame(values, columns=list(CHEXPERT_CLASSES))
    frame.insert(0, "study_id", [st for _, st in studies])
    frame.insert(0, "subject_id", [s for s, _ in studies])
    return frame.iloc[:-1]  # the last study has no labels (as a few in MIMIC)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    rows = pd.DataFrame(DICOMS, columns=["subject_id", "study_id", "dicom_id", "ViewPosition", "split"])
    study_labels().to_csv(tmp_path / f"{PREFIX}-chexpert.csv.gz", index=False)
    rows[["dicom_id", "study_id", "subject_id", "split"]].to_csv(tmp_path / f"{PREFIX}-split.csv.gz", index=False)
    rows.assign(Rows=3056, Columns=2544)[["dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns"]].to_csv(
        tmp_path / f"{PREFIX}-metadata.csv.gz", index=False
    )
    for subject, study, dicom, *_ in DICOMS:
        path = tmp_path / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16), 90, dtype=np.uint8)).save(path)
    return tmp_path


def test_official_splits_and_study_labels_on_every_image(root: Path):
    splits = plugin().read(root, SplitConfig(val_fraction=0.5))
    frontal = [d for d in DICOMS if d[3] in ("PA", "AP")]
    assert sum(len(t) for t in splits.values()) == len(frontal)
    assert set(splits["test"].meta["patient_id"]) == {"11000183"}
    assert "10000764" in set(splits["val"].meta["patient_id"])  # official "validate"
    labels = study_labels().set_index("study_id")
    for table in splits.values():
        for i in range(len(table)):
            path = Path(table.images.describe(i))
            study = int(path.parent.name[1:])
            assert path.parent.parent.name == f"p{table.meta['patient_id'][i]}"
            assert path.parent.parent.parent.name == f"p{table.meta['patient_id'][i][:2]}"
            expected = labels.loc[study, list(CHEXPERT_CLASSES)].to_numpy(np.float32) if study in labels.index else np.full(14, np.nan)
            np.testing.assert_array_equal(table.labels[i], expected)
    assert splits["test"].images.read(0).shape == (16, 16)
    assert splits["test"].labels.shape[0] == 2  # two images of one study share its labels
    np.testing.assert_array_equal(splits["test"].labels[0], splits["test"].labels[1])


def test_views_all_keeps_laterals(root: Path):
    records = plugin(views="all").read_records(root)
    assert len(records) == len(DICOMS)
    assert "LATERAL" in set(records.meta["view"])


def test_sex_and_age_from_mimic_iv_patients(root: Path):
    assert plugin().read_records(root).meta["sex"].isna().all()
    pd.DataFrame({"subject_id": [10000032, 11000183], "gender": ["F", "M"], "anchor_age": [52, 71]}).to_csv(
        root / "patients.csv.gz", index=False
    )
    meta = plugin().read_records(root).meta.set_index("patient_id")
    assert meta.loc["10000032", "sex"].tolist() == ["F", "F"] and meta.loc["11000183", "age"].tolist() == [71, 71]
    assert pd.isna(meta.loc["10000764", "sex"])


def test_out_of_schema_label_names_line_and_column(root: Path):
    labels = study_labels()
    labels.iloc[2, labels.columns.get_loc("Pneumothorax")] = 3.0
    labels.to_csv(root / f"{PREFIX}-chexpert.csv.gz", index=False)
    with pytest.raises(ArkfedError, match=r"chexpert.csv.gz: line 4, column 'Pneumothorax': label value 3"):
        plugin().read_records(root)


def test_unknown_split_value_names_line(root: Path):
    split = pd.read_csv(root / f"{PREFIX}-split.csv.gz")
    split.loc[3, "split"] = "dev"
    split.to_csv(root / f"{PREFIX}-split.csv.gz", index=False)
    with pytest.raises(ArkfedError, match=r"split.csv.gz: line 5, column 'split': 'dev'"):
        plugin().read_records(root)


def test_missing_column_and_missing_file_are_named(root: Path):
    meta = pd.read_csv(root / f"{PREFIX}-metadata.csv.gz")
    meta.drop(columns=["ViewPosition"]).to_csv(root / f"{PREFIX}-metadata.csv.gz", index=False)
    with pytest.raises(ArkfedError, match=r"metadata.csv.gz: missing column\(s\) \['ViewPosition'\]"):
        plugin().read_records(root)
    (root / f"{PREFIX}-metadata.csv.gz").unlink()
    with pytest.raises(ArkfedError, match=r"label file not found: .*mimic-cxr-2.0.0-metadata.csv"):
        plugin().read_records(root)


def test_missing_image_is_named(root: Path):
    subject, study, dicom, *_ = DICOMS[4]
    gone = root / "files" / "p11" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
    gone.unlink()
    with pytest.raises(ArkfedError, match=rf"split.csv.gz: 1 of 6 listed image files are missing, first {gone}"):
        plugin().read(root, SplitConfig())
    assert len(plugin(missing_images="drop").read(root, SplitConfig())["test"]) == 1


def test_ark_policies_uncertain_as_ones_and_all_14_classes_scored():
    from arkfed.data.schema import label_targets

    schema = plugin().label_schema()
    assert schema.uncertain == "ones" and schema.reported_classes == CHEXPERT_CLASSES
    raw = np.array([[UNCERTAIN, np.nan, 1.0, 0.0] + [0.0] * 10], dtype=np.float32)
    targets, mask = label_targets(raw, schema, np.random.default_rng(0))  # training draw: no smoothing
    assert targets[0, :4].tolist() == [1.0, 0.0, 1.0, 0.0] and mask.all()
    chexpert = plugin(label_policy="chexpert").label_schema()
    assert chexpert.uncertain == "lsr-ones" and len(chexpert.reported_classes) == 5


def test_protocol_ark_scores_uncertain_test_labels_as_positive_and_keeps_test_laterals(root: Path):
    """Ark's MIMIC loader turns -1 into 1 as it reads its lists, and its test list holds every view."""
    from arkfed.data.loaders import evaluation_schema
    from arkfed.data.schema import label_targets

    meta = pd.read_csv(root / f"{PREFIX}-metadata.csv.gz")
    meta.loc[meta["dicom_id"] == DICOMS[5][2], "ViewPosition"] = "LATERAL"  # a lateral in the official test split
    meta.to_csv(root / f"{PREFIX}-metadata.csv.gz", index=False)
    arkfed, ark = plugin(), plugin(protocol="ark")
    assert plugin(protocol="arkfed").read_records(root).labels.tobytes() == arkfed.read_records(root).labels.tobytes()  # the default
    ours, theirs = arkfed.read(root, SplitConfig(val_fraction=0.5)), ark.read(root, SplitConfig(val_fraction=0.5))
    assert list(theirs["test"].meta["view"]) == ["PA", "LATERAL"] and list(ours["test"].meta["view"]) == ["PA"]
    assert "LATERAL" not in set(theirs["train"].meta["view"])  # training keeps `views` (frontal)

    raw = ours["test"].labels[0]
    assert (raw == UNCERTAIN).any()  # the phantom's test study has uncertain findings
    np.testing.assert_array_equal(theirs["test"].labels[0], np.where(raw == UNCERTAIN, 1.0, raw))
    schema = ark.label_schema()
    assert schema == arkfed.label_schema()  # same schema: only what is read differs
    # what evaluation counts: arkfed leaves uncertain findings out, Ark's protocol scores them positive
    _, mask = label_targets(ours["test"].labels, evaluation_schema(schema))
    targets, ark_mask = label_targets(theirs["test"].labels, evaluation_schema(schema))
    uncertain = raw == UNCERTAIN
    assert not mask[0, uncertain].any() and ark_mask[0, uncertain].all() and (targets[0, uncertain] == 1).all()
    for table in theirs.values():
        assert not (table.labels == UNCERTAIN).any()  # every split, as Ark's loader reads every list


def test_protocol_ark_cannot_train_with_chexpert_policies():
    with pytest.raises(ArkfedError, match=r"plugin 'mimic_cxr': option .*label_policy: chexpert"):
        plugin(protocol="ark", label_policy="chexpert")
    with pytest.raises(ArkfedError, match=r"option 'protocol'"):
        plugin(protocol="reference")
