"""Class names: the one list of labels a report, a reader or a table prints (index = model output)."""

from __future__ import annotations

BINARY: tuple[str, ...] = ("benign", "malignant")
# BreakHis subtypes in label order (Spanhol et al. 2016): four benign, then four malignant
SUBTYPES: tuple[str, ...] = (
    "adenosis", "fibroadenoma", "phyllodes_tumor", "tubular_adenoma",
    "ductal_carcinoma", "lobular_carcinoma", "mucinous_carcinoma", "papillary_carcinoma",
)
# datasets whose labels mean something else (Camelyon17: tumor in a lymph-node patch, Bandi et al. 2019)
DATASET_CLASSES: dict[str, dict[int, tuple[str, ...]]] = {"camelyon17": {2: ("normal", "tumor")}}
DEFAULT_CLASSES: dict[int, tuple[str, ...]] = {2: BINARY, 8: SUBTYPES}


def class_names(num_classes: int, dataset: str = "") -> tuple[str, ...]:
    """The label of every class index for a dataset (benign/malignant, the 8 subtypes, or class <i>)."""
    names = DATASET_CLASSES.get(dataset, {}).get(num_classes) or DEFAULT_CLASSES.get(num_classes)
    return names if names else tuple(f"class {i}" for i in range(num_classes))


def positive_class(num_classes: int, dataset: str = "") -> str:
    """The name of the positive class of a binary task (the one ROC, recall and precision are about)."""
    return class_names(num_classes, dataset)[-1]
