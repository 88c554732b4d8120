"""The ten DEX pre-training modalities, their names, and the rules that tell an image's modality.

The modality of an image is taken, in this order, from

1. the DICOM ``Modality`` tag (0008,0060), mapped by :data:`DICOM_MODALITY_MAP`;
2. the ``modality`` entry of its datalist item;
3. a user rule: a shell-style pattern on the file path (:class:`ModalityRules`).

An image whose modality cannot be told by any of the three is *reported*
(:class:`UnknownModalityError`, or a ``rejected`` entry in the dataset index), never guessed.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MODALITIES",
    "MODALITY_INDEX",
    "UNKNOWN_MODALITY",
    "DICOM_MODALITY_MAP",
    "LABEL_DICOM_MODALITIES",
    "DEFAULT_LABEL_PATTERNS",
    "UnknownModalityError",
    "canonical_modality",
    "modality_from_dicom",
    "modality_index",
    "ModalityRule",
    "ModalityRules",
]

#: The ten modalities DEX is pre-trained on, in a fixed order (the order gives ``modality_index``).
MODALITIES: tuple[str, ...] = (
    "CT",
    "PET",
    "MR",
    "X-ray",
    "ultrasound",
    "fundus",
    "OCT",
    "pathology",
    "endoscopy",
    "photo",
)

#: ``modality name -> integer index`` following :data:`MODALITIES`.
MODALITY_INDEX: dict[str, int] = {name: i for i, name in enumerate(MODALITIES)}

#: Name used for an image whose modality could not be told (index ``-1``).
UNKNOWN_MODALITY = "unknown"

#: DICOM ``Modality`` (0008,0060) defined terms -> DEX modality. Other terms are unknown.
DICOM_MODALITY_MAP: dict[str, str] = {
    "CT": "CT",
    "MR": "MR",
    "PT": "PET",
    "CR": "X-ray",
    "DX": "X-ray",
    "RG": "X-ray",
    "MG": "X-ray",
    "US": "ultrasound",
    "OP": "fundus",
    "OPT": "OCT",
    "SM": "pathology",
    "ES": "endoscopy",
    "XC": "photo",
}

#: DICOM modalities whose objects are annotations of other images, not images to pre-train on.
LABEL_DICOM_MODALITIES: frozenset[str] = frozenset({"SEG", "RTSTRUCT"})

#: Default shell-style patterns (matched on the lower-cased path) of label / mask files.
DEFAULT_LABEL_PATTERNS: tuple[str, ...] = (
    "*/labelstr/*",
    "*/labelsts/*",
    "*/labels/*",
    "*/label/*",
    "*/masks/*",
    "*/mask*/*",
    "*/segmentations/*",
    "*/segmentation.*",
    "*_seg.*",
    "*_seg_*",
    "*_mask.*",
    "*_label.*",
)

# spelling variants accepted for the ten names (lower-cased keys); a DICOM term is accepted as well
_ALIASES: dict[str, str] = {
    "ct": "CT",
    "computed tomography": "CT",
    "pet": "PET",
    "pt": "PET",
    "mr": "MR",
    "mri": "MR",
    "magnetic resonance": "MR",
    "x-ray": "X-ray",
    "xray": "X-ray",
    "x_ray": "X-ray",
    "x ray": "X-ray",
    "radiograph": "X-ray",
    "radiography": "X-ray",
    "cr": "X-ray",
    "dx": "X-ray",
    "mg": "X-ray",
    "ultrasound": "ultrasound",
    "us": "ultrasound",
    "fundus": "fundus",
    "op": "fundus",
    "oct": "OCT",
    "opt": "OCT",
    "pathology": "pathology",
    "sm": "pathology",
    "endoscopy": "endoscopy",
    "es": "endoscopy",
    "photo": "photo",
    "photography": "photo",
    "clinical photography": "photo",
    "xc": "photo",
}


class UnknownModalityError(ValueError):
    """Raised when the modality of an image cannot be told (no usable DICOM tag, datalist entry or rule)."""


def canonical_modality(name: str | None) -> str | None:
    """Return the canonical DEX name of ``name`` (case and spelling variants allowed), ``None`` if not one of the ten.

    Example: ``canonical_modality("xray") == "X-ray"``, ``canonical_modality("PT") == "PET"``,
    ``canonical_modality("microscopy") is None``.
    """
    if name is None:
        return None
    key = str(name).strip()
    if key in MODALITY_INDEX:
        return key
    return _ALIASES.get(key.lower())


def modality_from_dicom(tag_value: str | None) -> str | None:
    """Map a DICOM ``Modality`` tag value to a DEX modality; ``None`` for empty or unmapped terms (NM, OT, SEG...)."""
    if not tag_value:
        return None
    return DICOM_MODALITY_MAP.get(str(tag_value).strip().upper())


def modality_index(name: str) -> int:
    """Integer index of a modality in :data:`MODALITIES`; ``-1`` for :data:`UNKNOWN_MODALITY`."""
    if name == UNKNOWN_MODALITY:
        return -1
    canonical = canonical_modality(name)
    if canonical is None:
        raise UnknownModalityError(f"'{name}' is not one of the DEX modalities {MODALITIES}.")
    return MODALITY_INDEX[canonical]


def _posix(path: str | os.PathLike) -> str:
    return Path(path).as_posix()


@dataclass(frozen=True)
class ModalityRule:
    """One user rule: files whose path matches ``pattern`` have ``modality``.

    ``pattern`` is a shell-style pattern (:mod:`fnmatch`, where ``*`` also matches ``/``), compared
    case-insensitively with the file's path relative to its source folder, the same path starting
    with the source folder's name, and the absolute path.
    """

    pattern: str
    modality: str

    def __post_init__(self) -> None:
        canonical = canonical_modality(self.modality)
        if canonical is None:
            raise UnknownModalityError(
                f"modality rule '{self.pattern}': '{self.modality}' is not one of the DEX modalities {MODALITIES}."
            )
        object.__setattr__(self, "modality", canonical)

    def matches(self, *paths: str) -> bool:
        """Whether any of ``paths`` (posix strings) matches the pattern."""
        pat = self.pattern.lower()
        return any(fnmatch.fnmatchcase(p.lower(), pat) for p in paths if p)


class ModalityRules:
    """An ordered list of :class:`ModalityRule` (first match wins) plus label-file patterns.

    Args:
        rules: ``[(pattern, modality), ...]``, ``{pattern: modality}`` or :class:`ModalityRule` objects.
        label_patterns: shell-style patterns (lower-case paths) of label / mask files; ``None``
            gives :data:`DEFAULT_LABEL_PATTERNS`.

    YAML form (see ``configs/modality_rules_shared_data.yaml``)::

        rules:
          - {pattern: "*/em/isbi2012/image/*", modality: pathology}
          - {pattern: "*/ct/*", modality: CT}
        label_patterns: ["*/labelstr/*", ...]   # optional, replaces the defaults
    """

    def __init__(
        self,
        rules: Iterable[ModalityRule | tuple[str, str]] | Mapping[str, str] = (),
        label_patterns: Sequence[str] | None = None,
    ) -> None:
        items = rules.items() if isinstance(rules, Mapping) else rules
        self.rules: list[ModalityRule] = [r if isinstance(r, ModalityRule) else ModalityRule(*r) for r in items]
        self.label_patterns: tuple[str, ...] = (
            DEFAULT_LABEL_PATTERNS if label_patterns is None else tuple(p.lower() for p in label_patterns)
        )

    @classmethod
    def from_config(cls, config: Mapping | Sequence | None) -> ModalityRules:
        """Build from a parsed YAML/JSON object: ``{"rules": [...], "label_patterns": [...]}`` or a bare rule list/map."""
        if config is None:
            return cls()
        label_patterns = None
        raw: object = config
        if isinstance(config, Mapping) and ("rules" in config or "label_patterns" in config):
            raw = config.get("rules") or []
            label_patterns = config.get("label_patterns")
        rules: list[ModalityRule] = []
        if isinstance(raw, Mapping):
            rules = [ModalityRule(str(k), str(v)) for k, v in raw.items()]
        else:
            for i, r in enumerate(raw):  # type: ignore[arg-type]
                if isinstance(r, Mapping) and "pattern" in r and "modality" in r:
                    rules.append(ModalityRule(str(r["pattern"]), str(r["modality"])))
                elif isinstance(r, Mapping) and len(r) == 1:
                    (k, v), = r.items()
                    rules.append(ModalityRule(str(k), str(v)))
                elif isinstance(r, (list, tuple)) and len(r) == 2:
                    rules.append(ModalityRule(str(r[0]), str(r[1])))
                else:
                    raise ValueError(f"modality rule #{i} must be {{pattern: ..., modality: ...}}, got {r!r}.")
        return cls(rules, label_patterns=label_patterns)

    @classmethod
    def load(cls, *paths: str | os.PathLike) -> ModalityRules:
        """Read and concatenate the rules of YAML files (earlier files first; the last label patterns given win)."""
        import yaml

        merged = cls()
        for path in paths:
            with open(path, encoding="utf-8") as f:
                try:
                    cfg = yaml.safe_load(f)
                except yaml.YAMLError as e:
                    raise ValueError(f"modality rules file {path}: invalid YAML: {e}") from e
            part = cls.from_config(cfg)
            merged = merged + part
        return merged

    @classmethod
    def from_strings(cls, specs: Iterable[str]) -> ModalityRules:
        """Rules from ``"PATTERN=MODALITY"`` strings (command-line form)."""
        rules = []
        for s in specs:
            if "=" not in s:
                raise ValueError(f"modality rule '{s}' must look like PATTERN=MODALITY.")
            pattern, modality = s.rsplit("=", 1)
            rules.append(ModalityRule(pattern.strip(), modality.strip()))
        return cls(rules)

    def __add__(self, other: ModalityRules) -> ModalityRules:
        labels = other.label_patterns if other.label_patterns != DEFAULT_LABEL_PATTERNS else self.label_patterns
        return ModalityRules([*self.rules, *other.rules], label_patterns=labels)

    def __len__(self) -> int:
        return len(self.rules)

    def __repr__(self) -> str:
        return f"ModalityRules({[(r.pattern, r.modality) for r in self.rules]})"

    @staticmethod
    def _candidates(path: str | os.PathLike, root: str | os.PathLike | None) -> list[str]:
        abs_path = os.path.abspath(path)
        out = []
        if root is not None:
            root_abs = os.path.abspath(root)
            rel = os.path.relpath(abs_path, root_abs)
            if not rel.startswith(".."):
                out.append(_posix(rel))  # relative to the source folder
                out.append(_posix(os.path.relpath(abs_path, os.path.dirname(root_abs))))  # with the folder's name
        out.append(_posix(abs_path))
        return out

    def match(self, path: str | os.PathLike, root: str | os.PathLike | None = None) -> ModalityRule | None:
        """The first rule matching ``path`` (relative to ``root`` when given, or absolute), else ``None``."""
        candidates = self._candidates(path, root)
        for rule in self.rules:
            if rule.matches(*candidates):
                return rule
        return None

    def is_label(self, path: str | os.PathLike, root: str | os.PathLike | None = None) -> str | None:
        """The label pattern matching ``path``, else ``None``.

        The path is lower-cased and taken relative to ``root`` (with a leading ``/``) when given, so that
        folders above the source folder do not count; absolute otherwise.
        """
        p = _posix(os.path.abspath(path)).lower()
        if root is not None:
            rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
            if not rel.startswith(".."):
                p = "/" + _posix(rel).lower()
        for pat in self.label_patterns:
            if fnmatch.fnmatchcase(p, pat):
                return pat
        return None
