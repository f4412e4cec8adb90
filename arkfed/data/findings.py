"""The canonical finding vocabulary shipped with arkfed.

Datasets name the same finding differently ("Effusion" in ChestX-ray14, "Pleural Effusion" in
CheXpert, "Pleural effusion" in VinDr-CXR). A schema maps its class names onto these canonical
names so that later features (zero-shot prediction, cross-site comparison) can align findings.
Each canonical name lists the spellings that mean it; matching ignores case, '_' and '-'.
"""

from __future__ import annotations

CANONICAL_FINDINGS: dict[str, tuple[str, ...]] = {
    "No Finding": ("No finding", "Normal"),
    "Atelectasis": (),
    "Cardiomegaly": (),
    "Consolidation": (),
    "Edema": ("Pulmonary edema",),
    "Pleural Effusion": ("Effusion",),
    "Pneumonia": (),
    "Pneumothorax": (),
    "Infiltration": ("Infiltrate", "Infiltrates"),
    "Mass": (),
    "Nodule": (),
    "Nodule/Mass": ("Lung nodule or mass",),
    "Emphysema": (),
    "Fibrosis": ("Pulmonary fibrosis",),
    "Pleural Thickening": (),
    "Hernia": (),
    "Enlarged Cardiomediastinum": (),
    "Lung Opacity": ("Opacity",),
    "Lung Lesion": ("Other lesion",),
    "Fracture": ("Rib fracture",),
    "Support Devices": (),
    "Pleural Other": (),
    "Tuberculosis": ("TB",),
    "Lung Tumor": ("Lung tumour",),
    "Other Disease": ("Other diseases",),
    "COPD": (),
    "Aortic Enlargement": (),
    "Calcification": (),
    "ILD": ("Interstitial lung disease",),
    "Not Normal / No Lung Opacity": ("No Lung Opacity / Not Normal",),
}


def _key(name: str) -> str:
    return " ".join(name.replace("_", " ").replace("-", " ").lower().split())


_LOOKUP: dict[str, str] = {}
for _canonical, _synonyms in CANONICAL_FINDINGS.items():
    for _name in (_canonical, *_synonyms):
        _LOOKUP[_key(_name)] = _canonical


def canonical_finding(name: str) -> str | None:
    """The canonical name for a class name, or None when the vocabulary does not know it."""
    return _LOOKUP.get(_key(name))


def is_canonical(name: str) -> bool:
    return name in CANONICAL_FINDINGS


# Label sets of public datasets that more than one plugin uses (ChestX-ray14's also ships as
# MedMNIST's ChestMNIST; CheXpert's labeler also produced MIMIC-CXR's labels). Official order.
CHESTXRAY14_CLASSES: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
CHEXPERT_CLASSES: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
CHEXPERT_EVAL_CLASSES: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
