"""Modality names, the DICOM mapping, user rules and DetectModalityd (no real data needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dex_monai.data import (
    DICOM_MODALITY_MAP,
    MODALITIES,
    MODALITY_INDEX,
    ModalityRule,
    ModalityRules,
    UnknownModalityError,
    canonical_modality,
    modality_from_dicom,
    modality_index,
)
from dex_monai.data.synthetic import write_dicom_series
from dex_monai.transforms import DetectModality, DetectModalityd

REPO = Path(__file__).resolve().parents[1]


def test_ten_modalities_in_fixed_order():
    assert MODALITIES == (
        "CT", "PET", "MR", "X-ray", "ultrasound", "fundus", "OCT", "pathology", "endoscopy", "photo",
    )  # fmt: skip
    assert [MODALITY_INDEX[m] for m in MODALITIES] == list(range(10))
    assert modality_index("unknown") == -1
    with pytest.raises(UnknownModalityError):
        modality_index("microscopy")


@pytest.mark.parametrize(
    "tag, expected",
    [
        ("CT", "CT"), ("MR", "MR"), ("PT", "PET"), ("CR", "X-ray"), ("DX", "X-ray"), ("RG", "X-ray"),
        ("MG", "X-ray"), ("US", "ultrasound"), ("OP", "fundus"), ("OPT", "OCT"), ("SM", "pathology"),
        ("ES", "endoscopy"), ("XC", "photo"), ("NM", None), ("OT", None), ("SEG", None), ("", None), (None, None),
    ],
)  # fmt: skip
def test_dicom_modality_mapping(tag, expected):
    assert modality_from_dicom(tag) == expected
    if tag in DICOM_MODALITY_MAP:
        assert DICOM_MODALITY_MAP[tag] in MODALITIES


@pytest.mark.parametrize(
    "name, expected",
    [("ct", "CT"), ("PT", "PET"), ("pet", "PET"), ("MRI", "MR"), ("xray", "X-ray"), ("X-Ray", "X-ray"),
     ("US", "ultrasound"), ("Fundus", "fundus"), ("oct", "OCT"), ("Pathology", "pathology"),
     ("endoscopy", "endoscopy"), ("photography", "photo"), ("microscopy", None), ("", None), (None, None)],
)  # fmt: skip
def test_canonical_names(name, expected):
    assert canonical_modality(name) == expected


def test_rules_first_match_wins_relative_and_absolute(tmp_path):
    rules = ModalityRules([("*/special/*", "MR"), ("*.png", "photo"), ("ct/*", "CT")])
    src = tmp_path / "src"
    assert rules.match(src / "a" / "special" / "x.png", root=src).modality == "MR"
    assert rules.match(src / "other" / "x.PNG", root=src).modality == "photo"  # case-insensitive
    assert rules.match(src / "ct" / "v.nii.gz", root=src).modality == "CT"  # relative to the source
    assert rules.match(src / "ct" / "v.nii.gz") is None  # no root: "ct/*" does not match the absolute path
    assert rules.match(src / "ct" / "v.nii.gz", root=src / "ct").modality == "CT"  # the source folder name counts
    assert rules.match(src / "mr" / "v.nii.gz", root=src) is None


def test_rules_from_config_forms_and_errors(tmp_path):
    as_list = ModalityRules.from_config({"rules": [{"pattern": "*a*", "modality": "xray"}, ["*b*", "PT"]]})
    assert [(r.pattern, r.modality) for r in as_list.rules] == [("*a*", "X-ray"), ("*b*", "PET")]
    as_map = ModalityRules.from_config({"*c*": "us"})
    assert as_map.rules[0].modality == "ultrasound"
    assert ModalityRules.from_strings(["*d*=fundus"]).rules[0] == ModalityRule("*d*", "fundus")
    with pytest.raises(UnknownModalityError, match="microscopy"):
        ModalityRule("*", "microscopy")
    with pytest.raises(ValueError, match="PATTERN=MODALITY"):
        ModalityRules.from_strings(["no-equals-sign"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [ {pattern: '*', modality: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        ModalityRules.load(bad)


def test_shipped_rule_files_load():
    shared = ModalityRules.load(REPO / "configs" / "modality_rules_shared_data.yaml")
    assert shared.match("/x/em/isbi2012/image/3.png").modality == "pathology"
    assert shared.match("/x/mixed/sam_med2d/images/amos_0507_31.png").modality == "MR"
    assert shared.match("/x/mixed/sam_med2d/images/amos_0004_75.png").modality == "CT"
    assert shared.match("/x/mixed/sam_med2d/images/s0114_111.png").modality == "CT"
    medmnist = ModalityRules.load(REPO / "configs" / "modality_rules_medmnist.yaml")
    assert medmnist.match("/d/retinamnist_224.npz").modality == "fundus"
    assert medmnist.match("/d/octmnist.npz").modality == "OCT"


def test_label_patterns(tmp_path):
    rules = ModalityRules()
    assert rules.is_label(tmp_path / "Task04" / "labelsTr" / "a.nii.gz", root=tmp_path)
    assert rules.is_label(tmp_path / "ct" / "example_seg.nii.gz", root=tmp_path)
    assert rules.is_label(tmp_path / "p1" / "MaskTumor" / "0001.dcm", root=tmp_path)
    assert not rules.is_label(tmp_path / "Task04" / "imagesTr" / "a.nii.gz", root=tmp_path)
    # folders above the source folder do not count
    assert not rules.is_label(tmp_path / "labels" / "src" / "x.png", root=tmp_path / "labels" / "src")


def test_detect_modality_order(tmp_path):
    dicom_dir = tmp_path / "ct_series"
    write_dicom_series(dicom_dir, np.zeros((4, 4, 2), dtype=np.int16), modality="PT")
    png = tmp_path / "photos" / "a.png"
    rules = ModalityRules([("*/photos/*", "photo"), ("*ct_series*", "MR")])
    det = DetectModality(rules=rules)
    # 1. the DICOM tag wins over the datalist entry and the rules
    assert det(str(dicom_dir), declared="CT") == ("PET", "dicom")
    # 2. the datalist entry wins over the rules
    assert det(str(png), declared="xray") == ("X-ray", "datalist")
    # 3. the rules
    assert det(str(png)) == ("photo", "rule")


def test_detect_modality_never_guesses(tmp_path):
    nm = tmp_path / "nm"
    write_dicom_series(nm, np.zeros((4, 4, 2), dtype=np.int16), modality="NM")
    det = DetectModalityd(rules=None)
    with pytest.raises(UnknownModalityError, match=r"a\.png.*no DICOM Modality tag"):
        det({"image": str(tmp_path / "a.png")})
    with pytest.raises(UnknownModalityError, match="'NM' is not one of the mapped terms"):
        det({"image": str(nm)})
    # an unmapped tag may be stated by the datalist
    out = det({"image": str(nm), "modality": "PET"})
    assert (out["modality"], out["modality_index"], out["modality_source"]) == ("PET", 1, "datalist")
    with pytest.raises(UnknownModalityError, match="'scintigraphy' is not one of"):
        det({"image": str(tmp_path / "a.png"), "modality": "scintigraphy"})
    with pytest.warns(UserWarning, match="cannot tell the modality"):
        out = DetectModalityd(strict=False)({"image": str(tmp_path / "a.png")})
    assert (out["modality"], out["modality_index"]) == ("unknown", -1)
