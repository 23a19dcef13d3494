"""Dataset layouts read as they are, beside the MVTec-AD layout and ``meta.json`` of
:mod:`lakead.data`: VisA, MVTec LOCO and a plain folder layout (anomalib's ``Folder``).

:func:`load_any` detects which layout a folder has and returns :class:`~lakead.data.Category`
objects, as :func:`lakead.data.load_dataset` does (which it calls for the layouts it reads):

- **VisA**, with its split file: ``<root>/split_csv/1cls.csv`` (columns ``object, split,
  label, image, mask``; ``label`` ``normal`` or ``anomaly``; paths relative to ``<root>``).
  The normal images of the ``train`` split are the shots' pool, the ``test`` split is scored.
- **VisA raw**: ``<object>/Data/Images/{Normal,Anomaly}/*`` and ``<object>/Data/Masks/Anomaly/
  <stem>.png`` (a dataset folder of such objects, or one object). Without a split file the
  normal images are split by a fixed rule: sorted by name, every 10th is a test image
  (:data:`VISA_TEST_NORMAL_RATIO`), the others are the pool; when the object folder sits
  in a VisA root with ``split_csv/1cls.csv``, that file is used instead.
- **MVTec LOCO**: ``<class>/train/good``, ``<class>/test/{good,logical_anomalies,
  structural_anomalies}`` and ``<class>/ground_truth/<type>/<stem>/000.png, 001.png, ...``
  (one mask file per defect of the image; the pixel metrics of MVTec-AD, PRO included, use
  their union). ``validation/good`` is not used. LOCO's own metric, AUC-sPRO
  (:mod:`lakead.spro`), is computed from the category's ``defects_config.json``; without that
  file it is not, and the report says so (:func:`loco_note`).
- **Folder** (as anomalib's ``Folder``): a folder of normal images, one or more folders of
  defective images, and optionally a folder of masks matched by file name (``<stem>.*`` or
  ``<stem>_mask.*``, also under a sub-folder named like the defective folder), and
  optionally a folder of normal test images; without it, a fixed share of the normal
  images (:data:`FOLDER_TEST_NORMAL_RATIO`, evenly spaced in name order) is tested.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from pathlib import Path

from .data import META_FILE, Category, Sample, _images_in, _subdirs, checked_categories, load_dataset
from .errors import LakeadError
from .spro import DEFECTS_CONFIG, SPRO_FPR_LIMIT, read_defects_config

#: The VisA split file read when present.
VISA_SPLIT = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
#: Share of the normal images tested when a VisA object has no split file (VisA's own split
#: tests 100 of about 1,000 normal images per object).
VISA_TEST_NORMAL_RATIO = 0.1
#: Share of the normal images tested by the folder layout without a normal test folder
#: (anomalib's ``normal_split_ratio`` default).
FOLDER_TEST_NORMAL_RATIO = 0.2
#: The test folders of MVTec LOCO's defective images.
LOCO_DEFECTS = ("logical_anomalies", "structural_anomalies")


def loco_note(config_file: Path | None) -> str:
    """What the report says about an MVTec LOCO category."""
    union = "the other pixel metrics, PRO included, use the union of each test image's mask files"
    if config_file is None:
        return f"MVTec LOCO: sPRO (saturated per-region overlap) is not computed (no {DEFECTS_CONFIG} found); {union}"
    return (f"MVTec LOCO: AUC-sPRO up to an FPR of {SPRO_FPR_LIMIT} from {config_file} (reported as pixel spro); "
            f"{union}")
#: Every layout read, for the error when none matches.
LAYOUTS_HELP = (
    "the MVTec-AD layout (<category>/train/good, <category>/test/<good|defect>, <category>/ground_truth/<defect>), "
    f"{META_FILE}, VisA ({VISA_SPLIT.as_posix()} or <object>/Data/Images/{{Normal,Anomaly}}), "
    "MVTec LOCO (<class>/test/{logical_anomalies,structural_anomalies}, ground_truth/<type>/<id>/000.png), "
    "or a plain folder layout named with --normal-dir and --abnormal-dir"
)


@dataclass(frozen=True)
class MultiMaskSample(Sample):
    """A test image with several mask files (MVTec LOCO: one per defect); ``mask`` is the first."""

    masks: tuple[Path, ...] = ()  # every mask file; the defect is their union


@dataclass(frozen=True)
class NotedCategory(Category):
    """A category whose layout needs a word in the report (:func:`loco_note`), and for MVTec
    LOCO the saturation of each defect type: ``(pixel value, saturation_threshold,
    relative_saturation)`` from ``defects_config.json`` (empty: no sPRO)."""

    note: str = ""
    saturation: tuple[tuple[int, float, bool], ...] = ()


def sample_masks(s: Sample) -> tuple[Path, ...]:
    """Every mask file of a test image (none for a normal image or a missing mask)."""
    masks = getattr(s, "masks", ())
    return tuple(masks) if masks else ((s.mask,) if s.mask is not None else ())


def held_out_positions(n: int, ratio: float) -> set[int]:
    """Positions of the ``round(n * ratio)`` (at least 1 when ``n > 1``) test images among
    ``n`` sorted normal images, evenly spaced: a fixed rule, the same on every machine.

    >>> sorted(held_out_positions(10, 0.2))
    [4, 9]
    """
    k = min(n - 1, max(1, round(n * ratio))) if n > 1 else 0
    return {int((i + 1) * n / k) - 1 for i in range(k)} if k else set()


# -- detection ------------------------------------------------------------------------------


def load_any(
    root: str | os.PathLike,
    categories: Sequence[str] | None = None,
    *,
    normal_dir: str | os.PathLike | None = None,
    abnormal_dirs: Sequence[str | os.PathLike] = (),
    mask_dir: str | os.PathLike | None = None,
    normal_test_dir: str | os.PathLike | None = None,
    check_masks: bool = True,
    rule: Any = None,
) -> list[Category]:
    """The categories of a dataset in any layout read (see the module docstring), sorted by
    name. ``normal_dir``/``abnormal_dirs``/``mask_dir``/``normal_test_dir`` (relative to
    ``root`` or absolute) choose the folder layout; otherwise the layout is detected. When
    none matches, the error names the folder and every layout read. ``rule`` (a
    :class:`lakead.medical.ReadRule`) slices volumes of the MVTec and BraTS layouts."""
    base = Path(root).expanduser()
    if normal_dir is not None or abnormal_dirs or mask_dir is not None or normal_test_dir is not None:
        found = [_from_plain_folders(base, normal_dir, abnormal_dirs, mask_dir, normal_test_dir)]
        return checked_categories(found, categories, base, check_masks=check_masks, masks=sample_masks)
    if base.is_dir():
        found = _detect(base)
        if found:
            return checked_categories(found, categories, base, check_masks=check_masks, masks=sample_masks)
    try:
        return load_dataset(base, categories, check_masks=check_masks, rule=rule)
    except LakeadError as exc:
        if "no category found" in str(exc):
            raise LakeadError(f"{base}: no dataset layout matches this folder. Read: {LAYOUTS_HELP}") from None
        raise


def _detect(base: Path) -> list[Category]:
    """Categories of a VisA or MVTec LOCO folder; empty for any other folder."""
    if (base / VISA_SPLIT).is_file():
        return _visa_from_csv(base, base / VISA_SPLIT)
    if _is_visa_object(base):
        return [_visa_object(base)]
    if _is_loco(base):
        return [_loco_category(base, base.name)]
    subdirs = _subdirs(base)
    visa = [d for d in subdirs if _is_visa_object(d)]
    if visa:
        return [_visa_object(d) for d in visa]
    return [_loco_category(d, d.name) for d in subdirs if _is_loco(d)]


# -- VisA -----------------------------------------------------------------------------------


def _is_visa_object(path: Path) -> bool:
    return (path / "Data" / "Images").is_dir()


def _visa_from_csv(base: Path, csv_path: Path, only: str | None = None) -> list[Category]:
    """The objects of VisA's split file (only the object ``only`` when given)."""
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in VISA_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise LakeadError(f"{csv_path}: missing column(s) {', '.join(missing)}; expected {', '.join(VISA_COLUMNS)}")
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LakeadError(f"{csv_path}: cannot be read ({exc})") from None
    train: dict[str, list[Path]] = {}
    test: dict[str, list[Sample]] = {}
    for line, row in enumerate(rows, start=2):
        obj, split, label = ((row.get(k) or "").strip() for k in ("object", "split", "label"))
        if only is not None and obj != only:
            continue
        where = f"{csv_path}, line {line}"
        if label not in ("normal", "anomaly") or split not in ("train", "test") or not obj:
            raise LakeadError(f"{where}: expected an object, split 'train' or 'test' and label 'normal' or 'anomaly', "
                              f"got {obj!r}, {split!r}, {label!r}")
        image = _existing(base, row.get("image") or "", where, "image")
        mask_rel = (row.get("mask") or "").strip()
        if split == "train":
            train.setdefault(obj, [])
            if label == "normal":
                train[obj].append(image)
        elif label == "normal":
            test.setdefault(obj, []).append(Sample(image, 0, "good", None))
        else:
            mask = _existing(base, mask_rel, where, "mask") if mask_rel else None
            test.setdefault(obj, []).append(Sample(image, 1, "anomaly", mask))
    if only is not None and only not in train and only not in test:
        raise LakeadError(f"{csv_path}: no row for object {only!r}")
    return [Category(name=o, class_name=o, root=base / o, train=tuple(sorted(train.get(o, []), key=str)),
                     test=tuple(test.get(o, []))) for o in sorted(set(train) | set(test))]


def _existing(base: Path, rel: str, where: str, what: str) -> Path:
    p = base / rel.strip()
    if not rel.strip() or not p.is_file():
        raise LakeadError(f"{where}: the {what} {p} does not exist")
    return p


def _visa_object(obj: Path) -> Category:
    """One VisA object folder: from the root's split file when there is one, else by the
    fixed rule (:data:`VISA_TEST_NORMAL_RATIO`)."""
    split = obj.parent / VISA_SPLIT
    if split.is_file():
        return _visa_from_csv(obj.parent, split, only=obj.name)[0]
    images = obj / "Data" / "Images"
    normals = _images_in(images / "Normal")
    held = held_out_positions(len(normals), VISA_TEST_NORMAL_RATIO)
    test = [Sample(p, 0, "good", None) for i, p in enumerate(normals) if i in held]
    test += [Sample(p, 1, "anomaly", _mask_by_name(obj / "Data" / "Masks" / "Anomaly", p))
             for p in _images_in(images / "Anomaly")]
    train = tuple(p for i, p in enumerate(normals) if i not in held)
    return Category(name=obj.name, class_name=obj.name, root=obj, train=train, test=tuple(test))


def _mask_by_name(folder: Path, image: Path) -> Path | None:
    """``folder/<stem>.<ext>`` or ``folder/<stem>_mask.<ext>`` for an image ending."""
    from .images import IMAGE_SUFFIXES

    for suffix in ("", "_mask"):
        for ext in (image.suffix, *IMAGE_SUFFIXES, *(e.upper() for e in IMAGE_SUFFIXES)):
            candidate = folder / f"{image.stem}{suffix}{ext}"
            if candidate.is_file():
                return candidate
    return None


# -- MVTec LOCO -----------------------------------------------------------------------------


def _is_loco(path: Path) -> bool:
    return (path / "train").is_dir() and any((path / "test" / d).is_dir() for d in LOCO_DEFECTS)


def _loco_category(path: Path, name: str) -> Category:
    train = tuple(_images_in(path / "train" / "good"))
    test: list[Sample] = [Sample(p, 0, "good", None) for p in _images_in(path / "test" / "good")]
    for defect in (d.name for d in _subdirs(path / "test") if d.name != "good"):
        for img in _images_in(path / "test" / defect):
            folder = path / "ground_truth" / defect / img.stem
            masks = tuple(_images_in(folder))
            test.append(MultiMaskSample(img, 1, defect, masks[0] if masks else None, masks))
    config = path / DEFECTS_CONFIG
    saturation = tuple((v, t, r) for v, (t, r) in sorted(read_defects_config(config).items())) if config.is_file() else ()
    return NotedCategory(name=name, class_name=path.name, root=path, train=train, test=tuple(test),
                         note=loco_note(config if config.is_file() else None), saturation=saturation)


# -- a plain folder layout ------------------------------------------------------------------


def _folder(base: Path, given: str | os.PathLike, option: str) -> Path:
    p = Path(given).expanduser()
    p = p if p.is_absolute() else base / p
    if not p.is_dir():
        raise LakeadError(f"{option} {p}: no such folder")
    return p


def _from_plain_folders(base: Path, normal_dir, abnormal_dirs, mask_dir, normal_test_dir) -> Category:
    if normal_dir is None or not abnormal_dirs:
        raise LakeadError(f"{base}: the folder layout needs --normal-dir (normal images) and at least one "
                          "--abnormal-dir (defective images)")
    normal = _folder(base, normal_dir, "--normal-dir")
    normals = _images_in(normal)
    if not normals:
        raise LakeadError(f"--normal-dir {normal}: no images in it")
    if normal_test_dir is not None:
        train, test = normals, [Sample(p, 0, "good", None) for p in _images_in(_folder(base, normal_test_dir, "--normal-test-dir"))]
    else:
        held = held_out_positions(len(normals), FOLDER_TEST_NORMAL_RATIO)
        train = [p for i, p in enumerate(normals) if i not in held]
        test = [Sample(p, 0, "good", None) for i, p in enumerate(normals) if i in held]
    masks = _folder(base, mask_dir, "--mask-dir") if mask_dir is not None else None
    for given in abnormal_dirs:
        folder = _folder(base, given, "--abnormal-dir")
        images = _images_in(folder)
        if not images:
            raise LakeadError(f"--abnormal-dir {folder}: no images in it")
        for p in images:
            mask = None
            if masks is not None:
                mask = _mask_by_name(masks / folder.name, p) or _mask_by_name(masks, p)
            test.append(Sample(p, 1, folder.name, mask))
    if masks is not None and not any(s.mask for s in test):
        raise LakeadError(f"--mask-dir {masks}: no mask matches a defective image by name (<name>.png or <name>_mask.png)")
    return Category(name=base.name or str(base), class_name=base.name or "object", root=base, train=tuple(train),
                    test=tuple(test))
