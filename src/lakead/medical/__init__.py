"""Medical images as they come: DICOM files and NIfTI volumes, read into the 8-bit images
lakead scores (docs/MEDICAL.md).

What is read, and how, is the *read rule* (:class:`ReadRule`, the ``window`` and ``slices``
options, saved with the model):

- the **window** maps intensities to 0..255: ``C,W`` (centre and width, the DICOM linear VOI
  function), a named preset (:data:`PRESETS`, Hounsfield units), ``file`` (the file's own VOI
  LUT or Window Center/Width; a NIfTI's ``cal_min``/``cal_max``), ``full`` (the full range:
  a DICOM's stored bit range through its rescale, a NIfTI volume's min..max), or ``auto``
  (the default: the file's own window where it has one, else the full range);
- DICOM: Rescale Slope/Intercept (or the Modality LUT) applied first; MONOCHROME1 inverted;
  a multi-frame file gives one image per frame, named ``file.dcm#frame=3`` (1-based, as DICOM
  numbers frames); colour files (RGB, YBR) are read as colour, without a window;
- NIfTI: ``slices`` = ``axial``, ``coronal`` or ``sagittal``, optionally ``:FIRST-LAST`` (the
  file's voxel indices, both included) and ``/STEP`` (every STEP-th slice); slices with no signal (one value throughout)
  are skipped and counted. A slice is named ``file.nii.gz#z=42``: the file's voxel axis (x, y,
  z = i, j, k) and its 0-based index there. It is shown as a viewer shows it in neurological
  convention: the volume's axes put in RAS order (from its affine), the patient's right on
  the image's right, anterior / superior up.

A volume is decoded once and kept (the last :data:`CACHE_VOLUMES`), so reading its slices one
by one costs one decode.
"""

from .dicom import DicomImage, dicom_frames, read_dicom
from .nifti import NiftiVolume, nifti_volume, write_map_volume
from .rule import (
    CACHE_VOLUMES,
    DICOM_SUFFIXES,
    EXTRA_HINT,
    MEDICAL_SUFFIXES,
    NIFTI_SUFFIXES,
    PLANES,
    PRESETS,
    WINDOW_WORDS,
    ReadRule,
    Slices,
    Window,
    grey_to_rgb,
    is_dicom,
    is_medical,
    is_nifti,
    looks_like_dicom,
    parse_slices,
    parse_window,
    split_source,
    stem,
    to_uint8,
)
from .sources import Read, count_images, expand, header_size, expand_all, image_size, read_mask_source, read_source

__all__ = [
    "CACHE_VOLUMES", "DICOM_SUFFIXES", "EXTRA_HINT", "MEDICAL_SUFFIXES", "NIFTI_SUFFIXES", "PLANES", "PRESETS",
    "WINDOW_WORDS", "count_images", "DicomImage", "NiftiVolume", "Read", "ReadRule", "Slices", "Window", "dicom_frames", "expand",
    "expand_all", "grey_to_rgb", "header_size", "image_size", "is_dicom", "is_medical", "is_nifti", "looks_like_dicom",
    "nifti_volume", "parse_slices", "parse_window", "read_dicom", "read_mask_source", "read_source", "split_source",
    "stem", "to_uint8", "write_map_volume",
]
