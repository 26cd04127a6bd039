"""Data sets cmath-prepare can fetch: where each file is published, the SHA-256 it must have, and the license.

A `Source` is the one record of a public data set: `cmath-prepare meld --download` fetches its files
(download.py) and cmath-export's model card names it and its license. The hashes are those of the files as
published; a file that hashes otherwise is refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class RemoteFile:
    name: str  # file name, both under the source's base URL and in the local folder
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Source:
    name: str
    base_url: str  # ends with "/"; each file is base_url + its name
    files: tuple[RemoteFile, ...]
    license: str
    home: str  # where people read about the data set

    def url(self, file: RemoteFile) -> str:
        return self.base_url + file.name

    def at(self, base_url: str) -> Source:
        """The same files (same hashes) fetched from another base URL: a mirror."""
        return dataclasses.replace(self, base_url=base_url if base_url.endswith("/") else base_url + "/")


MELD = Source(
    name="MELD",
    base_url="https://raw.githubusercontent.com/declare-lab/MELD/master/data/MELD/",
    files=(
        RemoteFile(
            "train_sent_emo.csv", "d2fa2d6529cf03cac2989efec05c9b27d8fd2f4c8fc5974c7ae88aa537fa02db", 1119290
        ),
        RemoteFile(
            "dev_sent_emo.csv", "2e89c6f8aa182d6f62f8c6331aece905ac7273ca4999660bfb5213e1d0370c1c", 121640
        ),
        RemoteFile(
            "test_sent_emo.csv", "8d37103938f7067600839fe29d5a114a6cd1bcdafb75bec101e06464c5006888", 294526
        ),
    ),
    license="GPL-3.0",
    home="https://github.com/declare-lab/MELD",
)
