"""Choosing support images ("shots") from a pool; datasets on disk.

How the shots were drawn is part of every result: :func:`select_shots` returns the chosen
paths together with a one-line description that reports and saved models record.

:func:`load_dataset` reads a dataset in the MVTec-AD folder layout (MVTec-AD, BTAD, MPDD,
VisA converted to it, ``../shared/data``) or indexed by the ``meta.json`` of
AnomalyCLIP / VisualAD, into :class:`Category` objects; :func:`read_mask` reads a mask.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError, ImageLoadError, LakeadError
from .medical import ReadRule, is_nifti, nifti_volume, stem

log = logging.getLogger(__name__)


def select_shots(
    pool: Sequence[Path], shots: int | None, seed: int | None = None
) -> tuple[list[Path], str]:
    """Pick ``shots`` images from ``pool``.

    ``shots=None`` (or at least the pool size) takes all. Otherwise, with ``seed=None``, the
    first ``shots`` after sorting by path; with a seed, a sample drawn with
    ``random.Random(seed)`` from the sorted pool (the same seed gives the same shots on every
    machine). Returns the chosen paths, sorted, and a description of the rule used.
    """
    ordered = sorted(pool, key=lambda p: str(p))
    if shots is not None and shots < 1:
        raise ConfigError(f"shots must be at least 1, got {shots}")
    if shots is None or shots >= len(ordered):
        return ordered, f"all {len(ordered)} images"
    if seed is None:
        return ordered[:shots], f"first {shots} of {len(ordered)} images sorted by name"
    chosen = random.Random(seed).sample(ordered, shots)
    return sorted(chosen, key=lambda p: str(p)), f"{shots} of {len(ordered)} images sampled with seed {seed}"


# -- datasets on disk -------------------------------------------------------------------------

#: Folder names of normal images (MVTec-AD and MPDD say "good", BTAD says "ok").
NORMAL_DIRS = ("good", "ok")
#: The AnomalyCLIP / VisualAD / AdaCLIP index file.
META_FILE = "meta.json"
#: Masks are ``ground_truth/<defect>/<stem><suffix>.<ext>`` with one of these suffixes.
MASK_SUFFIXES = ("_mask", "")


@dataclass(frozen=True)
class Sample:
    """One test image."""

    path: Path
    label: int  # 0 normal, 1 anomalous
    defect: str  # "good" for normal images, else the defect type
    mask: Path | None  # the defect's mask; None for a normal image (all zero) or a missing mask


@dataclass(frozen=True)
class Category:
    """One object or texture class: its pool of normal training images and its test set."""

    name: str  # unique within the dataset, e.g. "tire", or "mvtec3d_tire/tire" under a collection
    class_name: str  # what fills the text prompts (the folder name or cls_name)
    root: Path  # the category folder, or the folder of meta.json
    train: tuple[Path, ...]  # normal images to draw the shots from
    test: tuple[Sample, ...]

    @property
    def missing_masks(self) -> tuple[Sample, ...]:
        """Defect images without a mask: scored at image level, left out of pixel metrics."""
        return tuple(s for s in self.test if s.label == 1 and s.mask is None)

    def counts(self) -> dict[str, int]:
        n_defect = sum(s.label for s in self.test)
        return {
            "train": len(self.train),
            "test_normal": len(self.test) - n_defect,
            "test_defect": n_defect,
            "defect_without_mask": len(self.missing_masks),
        }


def load_dataset(
    root: str | os.PathLike, categories: Sequence[str] | None = None, *, check_masks: bool = True,
    rule: ReadRule | None = None,
) -> list[Category]:
    """The categories of a dataset on disk, sorted by name.

    ``root`` may be:

    - a folder with ``meta.json`` (the AnomalyCLIP / VisualAD index: ``{"train": {class:
      [entry, ...]}, "test": {...}}``, each entry with ``img_path``, ``mask_path`` ("" when
      none), ``cls_name``, ``specie_name`` and ``anomaly`` (0 or 1), paths relative to
      ``root``);
    - one category in the MVTec-AD layout: ``train/good/``, ``test/<good|defect>/`` and
      ``ground_truth/<defect>/<stem>_mask.png`` (``<stem>.png`` is accepted too, as in BTAD;
      ``ok`` is accepted for ``good``);
    - a dataset: a folder of such categories (MVTec-AD, BTAD, MPDD, VisA in MVTec layout);
    - a collection: a folder of datasets (``../shared/data``); categories are then named
      ``dataset/category``;
    - NIfTI volumes with their mask volumes, one folder per case (the BraTS layout; see
      :func:`load_volume_cases`), sliced by ``rule`` (:class:`lakead.medical.ReadRule`).

    Images may be DICOM files or one-slice NIfTI files too (masks likewise).

    ``categories`` keeps only these (full names, or the last part: ``tire`` for
    ``mvtec3d_tire/tire``). With ``check_masks`` every mask is opened (header only) and must
    have its image's size: otherwise an error names both files. Defect images without a
    mask are logged as a warning (they count at image level only).
    """
    base = Path(root).expanduser()
    if not base.exists():
        raise LakeadError(f"{base}: no such dataset folder")
    if not base.is_dir():
        raise LakeadError(f"{base}: is a file; give the dataset's folder")
    if (base / META_FILE).is_file():
        found = _from_meta(base)
    elif is_volume_dataset(base):
        found = load_volume_cases(base, rule)
    else:
        found = [_from_folder(path, name) for name, path in _category_folders(base)]
    if not found:
        raise LakeadError(
            f"{base}: no category found. Expected {META_FILE}, or the MVTec-AD layout: "
            "<category>/train/good/*.png, <category>/test/<good|defect>/*.png and "
            "<category>/ground_truth/<defect>/<name>_mask.png (at the top, one or two levels down)"
        )
    return checked_categories(found, categories, base, check_masks=check_masks)


def _own_mask(s: Sample) -> tuple[Path, ...]:
    return (s.mask,) if s.mask is not None else ()


def checked_categories(
    found: list[Category],
    categories: Sequence[str] | None,
    base: Path,
    *,
    check_masks: bool = True,
    masks: Callable[[Sample], Sequence[Path]] = _own_mask,
) -> list[Category]:
    """``found`` sorted by name, kept to ``categories`` and checked as :func:`load_dataset`
    says (every layout of :mod:`lakead.layouts` too). ``masks(sample)``: the mask files of a
    test image whose size is checked (its one ``mask``; several in MVTec LOCO). A category's
    ``note`` (:class:`lakead.layouts.NotedCategory`) is logged as a warning."""
    found.sort(key=lambda c: c.name)
    if categories:
        found = _pick(found, categories, base)
    for cat in found:
        if not cat.train:
            raise LakeadError(f"{cat.root}: category {cat.name!r} has no normal training image to draw shots from")
        if not cat.test:
            raise LakeadError(f"{cat.root}: category {cat.name!r} has no test image")
        if check_masks:
            for s in cat.test:
                for m in masks(s):
                    _check_mask_size(s.path, m)
        missing = cat.missing_masks
        if missing:
            log.warning(
                "%s: %d defect image(s) have no mask (first: %s); they count for image metrics, and pixel "
                "metrics leave them out", cat.name, len(missing), missing[0].path,
            )
        note = getattr(cat, "note", "")
        if note:
            log.warning("%s: %s", cat.name, note)
    return found


def _is_category(path: Path) -> bool:
    return (path / "train").is_dir() and (path / "test").is_dir()


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    except OSError as exc:
        raise LakeadError(f"{path}: cannot list directory ({exc.strerror or exc})") from None


def _category_folders(base: Path) -> list[tuple[str, Path]]:
    if _is_category(base):
        return [(base.name, base)]
    subdirs = _subdirs(base)
    out = [(d.name, d) for d in subdirs if _is_category(d)]
    if out:
        return out
    return [(f"{d.name}/{c.name}", c) for d in subdirs for c in _subdirs(d) if _is_category(c)]


def _images_in(folder: Path) -> list[Path]:
    from .images import iter_image_files

    return list(iter_image_files(folder, recursive=False)) if folder.is_dir() else []


def _find_mask(cat: Path, defect: str, image: Path) -> Path | None:
    from .images import IMAGE_SUFFIXES

    from .medical import MEDICAL_SUFFIXES, is_medical, stem

    folder = cat / "ground_truth" / defect
    own = image.name[len(stem(image.name)):]  # ".nii.gz" as one ending
    for suffix in MASK_SUFFIXES:
        for ext in (own, *IMAGE_SUFFIXES, *(MEDICAL_SUFFIXES if is_medical(image) else ())):
            candidate = folder / f"{stem(image.name)}{suffix}{ext}"
            if candidate.is_file():
                return candidate
    return None


def _from_folder(path: Path, name: str) -> Category:
    train: list[Path] = []
    for normal in NORMAL_DIRS:
        train.extend(_images_in(path / "train" / normal))
    test: list[Sample] = []
    for sub in _subdirs(path / "test"):
        is_normal = sub.name in NORMAL_DIRS
        for img in _images_in(sub):
            if is_normal:
                test.append(Sample(img, 0, "good", None))
            else:
                test.append(Sample(img, 1, sub.name, _find_mask(path, sub.name, img)))
    return Category(name=name, class_name=path.name, root=path, train=tuple(train), test=tuple(test))


def _from_meta(base: Path) -> list[Category]:
    meta_path = base / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LakeadError(f"{meta_path}: cannot be parsed ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("test"), dict):
        raise LakeadError(f"{meta_path}: expected an object with a 'test' (and 'train') mapping of class name to entries")
    train_part = meta.get("train") or {}
    if not isinstance(train_part, dict):
        raise LakeadError(f"{meta_path}: 'train' must map class names to lists of entries")

    def resolve(rel: str, where: str) -> Path:
        p = base / rel
        if not p.is_file():
            raise LakeadError(f"{meta_path}: {where} points to {p}, which does not exist")
        return p

    out = []
    for cls, entries in sorted(meta["test"].items()):
        test: list[Sample] = []
        for i, e in enumerate(_entries(entries, meta_path, f"test/{cls}")):
            where = f"test/{cls}[{i}]"
            label = int(e["anomaly"])
            img = resolve(e["img_path"], f"{where}.img_path")
            mask_rel = e.get("mask_path") or ""
            if label == 0:
                test.append(Sample(img, 0, "good", None))
            else:
                mask = resolve(mask_rel, f"{where}.mask_path") if mask_rel else None
                test.append(Sample(img, 1, e.get("specie_name") or "anomaly", mask))
        train = [
            resolve(e["img_path"], f"train/{cls}[{i}].img_path")
            for i, e in enumerate(_entries(train_part.get(cls, []), meta_path, f"train/{cls}"))
            if int(e["anomaly"]) == 0
        ]
        out.append(Category(name=cls, class_name=cls, root=base, train=tuple(sorted(train, key=str)), test=tuple(test)))
    return out


def _entries(entries: object, meta_path: Path, where: str) -> list[dict]:
    if not isinstance(entries, list):
        raise LakeadError(f"{meta_path}: {where} must be a list of entries")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "img_path" not in e or e.get("anomaly") not in (0, 1, "0", "1"):
            raise LakeadError(f"{meta_path}: {where}[{i}] needs 'img_path' and 'anomaly' (0 or 1), got {e!r}"[:300])
    return entries


def _pick(found: list[Category], wanted: Sequence[str], base: Path) -> list[Category]:
    chosen: list[Category] = []
    for w in wanted:
        hits = [c for c in found if c.name == w] or [c for c in found if c.name.split("/")[-1] == w]
        if not hits:
            raise LakeadError(f"{base}: no category {w!r}; available: {', '.join(c.name for c in found)}")
        if len(hits) > 1:
            raise LakeadError(f"{base}: {w!r} matches {', '.join(c.name for c in hits)}; give the full name")
        if hits[0] not in chosen:
            chosen.append(hits[0])
    return chosen


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import UnidentifiedImageError

    from .images import open_image
    from .medical import image_size, is_medical

    if is_medical(path):
        return image_size(path)
    try:
        with open_image(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError) as exc:
        raise LakeadError(f"{path}: cannot be read as an image ({exc})") from None


def _check_mask_size(image: Path, mask: Path) -> None:
    iw, ih = _image_size(image)
    mw, mh = _image_size(mask)
    if (iw, ih) != (mw, mh):
        raise LakeadError(f"mask {mask} is {mw}x{mh} pixels but its image {image} is {iw}x{ih}: they must have the same size")


def read_mask(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask file as an ``(H, W)`` bool array: every non-zero pixel is defect.

    Grey, 16-bit, palette and RGB(A) masks are read; for colour masks any non-zero colour
    channel counts (alpha is ignored). ``size=(H, W)``, when given, must match.
    """
    from PIL import UnidentifiedImageError

    from .images import open_image

    from .medical import is_medical, read_mask_source

    p = Path(path)
    if is_medical(p):
        return read_mask_source(p, None if size is None else tuple(size))
    try:
        with open_image(p) as im:
            if im.mode in ("P", "PA"):
                im = im.convert("L")
            arr = np.asarray(im)
    except (OSError, UnidentifiedImageError) as exc:
        raise LakeadError(f"{p}: cannot be read as a mask ({exc})") from None
    if arr.ndim == 3:
        arr = arr[..., : min(3, arr.shape[2])].max(axis=2)
    mask = arr > 0
    if size is not None and mask.shape != tuple(size):
        raise LakeadError(f"mask {p} is {mask.shape[1]}x{mask.shape[0]} pixels, its image {size[1]}x{size[0]}")
    return mask


# -- NIfTI volumes with mask volumes (BraTS) -------------------------------------------------

#: Words that mark a case's mask volume (``BraTS2021_00000_seg.nii.gz``).
SEG_WORDS = ("seg", "mask", "label")


def _case_files(case: Path) -> tuple[dict[str, Path], Path | None]:
    """A case folder's scans by sequence name (the last ``_`` part of the name: ``flair``,
    ``t1``...) and its mask volume."""
    scans: dict[str, Path] = {}
    seg = None
    for f in sorted(p for p in case.iterdir() if p.is_file() and is_nifti(p.name) and not p.name.startswith(".")):
        seq = stem(f.name).rsplit("_", 1)[-1].lower()
        if seq in SEG_WORDS:
            seg = f
        else:
            scans[seq] = f
    return scans, seg


def is_volume_dataset(root: Path) -> bool:
    """Whether ``root`` holds case folders of NIfTI volumes with a mask volume each (directly,
    or under ``train/`` and ``test/``)."""
    parts = [root / "train", root / "test"] if (root / "train").is_dir() and (root / "test").is_dir() else [root]
    for part in parts:
        for case in _subdirs(part)[:3]:
            scans, seg = _case_files(case)
            if scans and seg is not None:
                return True
    return False


def load_volume_cases(root: Path, rule: ReadRule | None = None) -> list[Category]:
    """NIfTI scans with mask volumes, one folder per case (BraTS: ``<case>/<case>_flair.nii.gz``
    ... and ``<case>/<case>_seg.nii.gz``), as one category per sequence (``flair``, ``t1``...).

    Each scan is sliced by ``rule`` (slices with no signal left out); a slice is anomalous when
    its mask slice has a non-zero voxel, its mask being that slice (``seg.nii.gz#z=42``).
    Cases under ``train/`` give the support pool (their tumour-free slices), cases under
    ``test/`` the test slices; without those folders the first half of the cases (sorted by
    name) give the support pool and the second half the test. A mask volume of another shape
    than its scan, or not aligned with it, is an error naming both files.
    """
    rule = rule or ReadRule()
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_cases, test_cases = _subdirs(root / "train"), _subdirs(root / "test")
    else:
        cases = _subdirs(root)
        train_cases, test_cases = cases[: len(cases) // 2], cases[len(cases) // 2 :]
        log.info("%s: %d cases; support pool from the first %d, test on the other %d", root, len(cases),
                 len(train_cases), len(test_cases))
    class_name = "brain" if root.name.lower().startswith("brats") or any(
        c.name.lower().startswith("brats") for c in train_cases[:1]) else root.name
    train: dict[str, list[Path]] = {}
    test: dict[str, list[Sample]] = {}
    for part, cases in (("train", train_cases), ("test", test_cases)):
        for case in cases:
            scans, seg = _case_files(case)
            if seg is None:
                raise LakeadError(f"{case}: no mask volume (a NIfTI file named *_seg, *_mask or *_label)")
            for seq, scan in scans.items():
                for src, label in _labelled_slices(scan, seg, rule):
                    if part == "train" and not label:
                        train.setdefault(seq, []).append(Path(src))
                    elif part == "test":
                        mask = Path(str(seg) + src[len(str(scan)):]) if label else None
                        test.setdefault(seq, []).append(Sample(Path(src), label, "tumour" if label else "good", mask))
    return [Category(name=seq, class_name=class_name, root=root, train=tuple(train.get(seq, ())), test=tuple(test[seq]))
            for seq in sorted(test)]


def _labelled_slices(scan: Path, seg: Path, rule: ReadRule) -> list[tuple[str, int]]:
    """The scan's slices with signal, each with 1 where its mask slice has a defect voxel."""
    import numpy as np

    try:
        vol = nifti_volume(str(scan), str(scan), rule.slices)
        mask = nifti_volume(str(seg), str(seg), rule.slices, mask=True)
    except ImageLoadError as exc:
        raise LakeadError(str(exc)) from None
    if mask.data.shape != vol.data.shape:
        raise LakeadError(f"mask volume {seg} has shape {mask.data.shape}, its scan {scan} {vol.data.shape}: "
                          "they must have the same shape")
    if not np.allclose(mask.affine, vol.affine, atol=1e-3):
        raise LakeadError(f"mask volume {seg} is not aligned with its scan {scan} (their affines differ)")
    found = np.moveaxis(mask.data != 0, vol.axis, 0).reshape(mask.data.shape[vol.axis], -1).any(axis=1)
    return [(src, int(found[i])) for src, i in zip(vol.sources(), vol.indices)]
