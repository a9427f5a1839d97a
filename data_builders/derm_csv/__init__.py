"""CSV-described dermatology TFDS builder (`import data_builders.derm_csv` registers 'derm_csv')."""

from data_builders.derm_csv.derm_csv import (
    MANUAL_DOWNLOAD_INSTRUCTIONS,
    SETTINGS,
    DermCsv,
    DermCsvConfig,
)

__all__ = ["MANUAL_DOWNLOAD_INSTRUCTIONS", "SETTINGS", "DermCsv", "DermCsvConfig"]
