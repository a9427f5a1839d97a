"""Unlabeled image-tree TFDS builder (`import data_builders.image_folder_unlabeled` registers
'image_folder_unlabeled')."""

from data_builders.image_folder_unlabeled.image_folder_unlabeled import (
    MANUAL_DOWNLOAD_INSTRUCTIONS,
    SETTINGS,
    ImageFolderConfig,
    ImageFolderUnlabeled,
)

__all__ = ["MANUAL_DOWNLOAD_INSTRUCTIONS", "SETTINGS", "ImageFolderConfig", "ImageFolderUnlabeled"]
