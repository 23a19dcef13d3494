"""NIfTI volumes: slices in display orientation, empty slices, windows (see :mod:`lakead.medical`)."""

from __future__ import annotations

import numpy as np

from ..errors import ImageLoadError
from ..limits import check_volume
from .rule import AXIS_LETTERS, PLANES, Slices, Window, _cache, _nibabel, parse_slices

# -- NIfTI --------------------------------------------------------------------------------


class NiftiVolume:
    """A 3D NIfTI volume decoded, with its slices for one plane (see the module docstring).

    ``data`` is the file's voxel array as stored (scaling applied); slices are taken along
    file ``axis`` and turned to the display orientation by :meth:`display` (and back to the
    file's by :meth:`undisplay`, for maps written as a volume).
    """

    def __init__(self, path: str, label: str, slices: Slices, *, mask: bool = False) -> None:
        nib = _nibabel(label)
        self.path, self.label = path, label
        try:
            img = nib.load(path)
            shape = tuple(int(s) for s in img.shape)
        except FileNotFoundError:
            raise ImageLoadError(label, "file not found") from None
        except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds for a bad file
            raise ImageLoadError(label, f"not a readable NIfTI file ({exc})") from None
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) > 3:
            raise ImageLoadError(label, f"is a {len(shape)}D NIfTI image (shape {shape}); lakead reads 3D volumes: "
                                        "take one volume out first (e.g. nibabel's img.slicer[..., 0], or fslroi)")
        if any(s < 1 for s in shape):
            raise ImageLoadError(label, f"NIfTI header: shape {shape} has an empty axis")
        full = shape + (1,) * (3 - len(shape))
        check_volume(label, full[0], full[1], full[2], "slices")  # from the header, before any voxel is read
        try:
            data = np.asanyarray(img.dataobj).reshape(shape + (1,) * (3 - len(shape)))
        except Exception as exc:  # noqa: BLE001
            raise ImageLoadError(label, f"corrupt or truncated NIfTI data ({exc})") from None
        if data.dtype.kind not in "biuf":
            raise ImageLoadError(label, f"voxel type {data.dtype} is not a grey level (RGB or complex NIfTI)")
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            finite = data[np.isfinite(data)]
            if not finite.size:
                raise ImageLoadError(label, "holds no finite voxel (every voxel NaN or infinite)")
            data = np.nan_to_num(data, nan=float(finite.min()) if finite.size else 0.0,
                                 posinf=float(finite.max()) if finite.size else 0.0,
                                 neginf=float(finite.min()) if finite.size else 0.0)
        self.data = data
        self.affine = np.asarray(img.affine, dtype=np.float64)
        self.header = img.header
        ornt = nib.orientations.io_orientation(self.affine)  # file axis -> (RAS axis, flip)
        self.world = [int(ornt[i, 0]) for i in range(3)]
        self.flip = [int(ornt[i, 1]) for i in range(3)]
        self.plane = slices.plane
        self.axis = self.world.index(PLANES[slices.plane])
        rest = [i for i in range(3) if i != self.axis]
        self.col, self.row = sorted(rest, key=lambda i: self.world[i])  # lower RAS axis across, higher up
        n = data.shape[self.axis]
        wanted = range(n)[slice(slices.start, slices.stop, slices.step)]
        if mask:
            self.indices, self.skipped = list(wanted), 0
        else:
            moved = np.moveaxis(data, self.axis, 0)
            flat = moved.reshape(n, -1)
            signal = flat.max(axis=1) > flat.min(axis=1) if flat.shape[1] else np.zeros(n, bool)
            self.indices = [i for i in wanted if signal[i]]
            self.skipped = len(wanted) - len(self.indices)
        self.cal = (float(self.header.get("cal_min", 0) or 0), float(self.header.get("cal_max", 0) or 0))
        self.range = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)

    @property
    def letter(self) -> str:
        return AXIS_LETTERS[self.axis]

    def sources(self) -> list[str]:
        return [f"{self.path}#{self.letter}={i}" for i in self.indices]

    def bounds(self, window: Window) -> tuple[tuple[float, float], str]:
        if window.kind == "fixed":
            return window.bounds, window.describe()
        if window.kind in ("auto", "file") and self.cal[1] > self.cal[0]:
            return self.cal, f"file cal_min..cal_max {self.cal[0]:g}..{self.cal[1]:g}"
        if window.kind == "file":
            raise ImageLoadError(self.label, "has no window of its own (cal_min/cal_max unset): give window C,W, a preset or full")
        return self.range, f"full {self.range[0]:g}..{self.range[1]:g}"

    def raw_slice(self, index: int, axis: int | None = None) -> np.ndarray:
        axis = self.axis if axis is None else axis
        if not 0 <= index < self.data.shape[axis]:
            raise ImageLoadError(f"{self.label}#{AXIS_LETTERS[axis]}={index}",
                                 f"no such slice: the volume has {self.data.shape[axis]} along {AXIS_LETTERS[axis]}")
        return np.take(self.data, index, axis=axis)

    def display(self, s: np.ndarray) -> np.ndarray:
        """A file-order slice (the two other file axes, in order) -> the image ``(rows, cols)``."""
        img = s.T if self.col < self.row else s  # (row axis, col axis)
        if self.flip[self.col] < 0:
            img = img[:, ::-1]
        if self.flip[self.row] > 0:
            img = img[::-1, :]
        return np.ascontiguousarray(img)

    def undisplay(self, img: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`display`: an image -> the file-order slice."""
        if self.flip[self.row] > 0:
            img = img[::-1, :]
        if self.flip[self.col] < 0:
            img = img[:, ::-1]
        return np.ascontiguousarray(img.T if self.col < self.row else img)

    def with_axis(self, letter: str) -> NiftiVolume:
        """This volume sliced along file axis ``letter`` (a source may name another axis than the rule)."""
        axis = AXIS_LETTERS.index(letter)
        if axis == self.axis:
            return self
        other = object.__new__(NiftiVolume)
        other.__dict__.update(self.__dict__)
        other.axis = axis
        other.plane = next(p for p, w in PLANES.items() if w == self.world[axis])
        other.col, other.row = sorted((i for i in range(3) if i != axis), key=lambda i: self.world[i])
        return other


def nifti_volume(path: str, label: str, slices: Slices | str = "axial", *, mask: bool = False) -> NiftiVolume:
    """The volume at ``path`` for ``slices`` (decoded once, kept in a small cache)."""
    rule = parse_slices(slices) if isinstance(slices, str) else slices
    return _cache.get(path, (rule, mask), lambda: NiftiVolume(path, label, rule, mask=mask))




def write_map_volume(volume: str, sources: list[str], maps: list[np.ndarray], out: str) -> None:
    """Write the maps of a volume's slices (``sources`` as ``volume#z=K``, each map at its
    image's size) as one float32 NIfTI volume aligned with ``volume``: same shape, same affine
    (qform and sform), so that a viewer shows it over the scan. Voxels of slices not given
    (skipped, or not scored) are 0. ``out`` ending in ``.gz`` is compressed; written atomically."""
    import gzip

    from ..fileio import atomic_write_bytes
    from .rule import split_source

    nib = _nibabel(volume)
    vol = nifti_volume(volume, volume, "axial")
    data = np.zeros(vol.data.shape, dtype=np.float32)
    for source, amap in zip(sources, maps):
        parsed = split_source(source)
        if parsed is None or parsed[1] not in AXIS_LETTERS:
            raise ImageLoadError(source, f"not a slice of {volume} (expected {volume}#z=K)")
        v = vol.with_axis(parsed[1])
        index: list = [slice(None)] * 3
        index[v.axis] = parsed[2]
        data[tuple(index)] = v.undisplay(np.asarray(amap, dtype=np.float32))
    img = nib.Nifti1Image(data, vol.affine)
    img.header.set_qform(vol.header.get_qform(), code=int(vol.header["qform_code"]) or 1)
    img.header.set_sform(vol.header.get_sform(), code=int(vol.header["sform_code"]) or 1)
    img.header.set_xyzt_units(*vol.header.get_xyzt_units())
    raw = img.to_bytes()
    atomic_write_bytes(out, gzip.compress(raw, 6) if str(out).lower().endswith(".gz") else raw)


def slice_count(path: str, slices: str) -> int:
    """Slices of a NIfTI volume in ``slices``' plane and range, from its header."""
    nib = _nibabel(path)
    rule = parse_slices(slices)
    try:
        img = nib.load(path)
        shape = tuple(int(s) for s in img.shape) + (1, 1)
        world = [int(w) for w in nib.orientations.io_orientation(img.affine)[:, 0]]
    except Exception as exc:  # noqa: BLE001
        raise ImageLoadError(path, f"not a readable NIfTI file ({exc})") from None
    n = shape[world.index(PLANES[rule.plane])] if PLANES[rule.plane] in world else 1
    return len(range(n)[slice(rule.start, rule.stop, rule.step)])
