"""DICOM folder (PACS export) TFDS builder (`import data_builders.dicom_folder` registers
'dicom_folder')."""

from data_builders.dicom_folder.dicom_folder import (
    MANUAL_DOWNLOAD_INSTRUCTIONS,
    SETTINGS,
    DicomFolder,
    DicomFolderConfig,
)

__all__ = ["MANUAL_DOWNLOAD_INSTRUCTIONS", "SETTINGS", "DicomFolder", "DicomFolderConfig"]
