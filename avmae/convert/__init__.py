"""Published checkpoints of MAE, AudioMAE, VideoMAE and CAV-MAE -> avmae export folders
(``tools/convert.py``, docs/checkpoints.md).

One module per source (``mae``, ``audiomae``, ``videomae``, ``cavmae``: its reader, key map and
preprocessing) reads the file into the common form of ``source``; ``mapping`` fills an avmae
encoder from it and writes the export; ``parity`` compares the result with the source
repository's own model code.
"""

from avmae.convert.mapping import (
    PARTS,
    PREPROCESSING,
    READERS,
    SOURCES,
    convert,
    default_config,
    encoder_state,
    read,
    size_name,
    write_classifier,
)
from avmae.convert.parity import CheckSkipped, check, source_code
from avmae.convert.source import Branch, ConversionError, Source, SourceKeys, read_source
from avmae.convert.videomae import sinusoid_table

__all__ = [
    "PARTS",
    "PREPROCESSING",
    "READERS",
    "SOURCES",
    "Branch",
    "CheckSkipped",
    "ConversionError",
    "Source",
    "SourceKeys",
    "check",
    "convert",
    "default_config",
    "encoder_state",
    "read",
    "read_source",
    "sinusoid_table",
    "size_name",
    "source_code",
    "write_classifier",
]
