"""Small DICOM and NIfTI files for tests, written with pydicom and nibabel.

``nifti_from_images`` lays 2D images into a volume so that lakead reads slice ``k`` back as
image ``k`` (lakead shows slices in RAS order, patient's right on the right, anterior up):
for an identity affine, ``data[:, :, k] = flipud(image).T``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    modality: str = "OT",
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    signed: bool = False,
    with_pixels: bool = True,
    transfer_syntax: str | None = None,
) -> Path:
    """One DICOM file: ``pixels`` ``(H, W)`` one frame, ``(F, H, W)`` several frames (grey),
    or ``(H, W, 3)`` uint8 RGB."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientName = "Test^Phantom"
    rgb = pixels.ndim == 3 and pixels.shape[2] == 3 and photometric == "RGB"
    frames = 1 if (pixels.ndim == 2 or rgb) else pixels.shape[0]
    rows, cols = (pixels.shape[0], pixels.shape[1]) if (pixels.ndim == 2 or rgb) else pixels.shape[1:3]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = photometric
    if rgb:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = bits_stored or bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if with_pixels:
        data = np.ascontiguousarray(pixels).tobytes()
        if meta.TransferSyntaxUID.is_compressed:  # not really compressed: enough to be refused
            from pydicom.encaps import encapsulate

            data = encapsulate([data])
        ds.PixelData = data
    ds.save_as(path, enforce_file_format=True)
    return path


def nifti_from_images(path: Path, images: list[np.ndarray], affine: np.ndarray | None = None,
                      dtype: type = np.uint8, cal: tuple[float, float] | None = None) -> Path:
    """A 3D NIfTI whose axial slices (read by lakead) are ``images`` (each ``(H, W)``), for a
    diagonal ``affine`` (default identity); ``cal`` sets cal_min/cal_max."""
    import nibabel as nib

    a = np.eye(4) if affine is None else np.asarray(affine, dtype=float)
    vol = np.stack([np.flipud(np.asarray(im)).T for im in images], axis=2)  # (X, Y, Z) in RAS
    if a[0, 0] < 0:
        vol = vol[::-1]  # stored L->R: lakead turns it back to R on the right
    if a[1, 1] < 0:
        vol = vol[:, ::-1]
    img = nib.Nifti1Image(vol.astype(dtype), a)
    if cal is not None:
        img.header["cal_min"], img.header["cal_max"] = cal
    nib.save(img, str(path))
    return path
