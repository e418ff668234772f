"""Published checkpoints of MAE, AudioMAE, VideoMAE and CAV-MAE -> avmae export folders
(``tools/convert.py``, docs/checkpoints.md).

One module per source (``mae``, ``audiomae``, ``videomae``, ``cavmae``: its reader, key map and
preprocessing) reads the file into the common form of ``source``; ``mapping`` fills an avmae
encoder from it and writes the export; ``parity`` compares the result with the source
repository's own model code (with the source's own LayerNorm eps).
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
from avmae.convert.parity import DEFAULT_TOLERANCE, CheckSkipped, check, random_source_checkpoint, source_code, source_norm_layer
from avmae.convert.source import Branch, ConversionError, Source, SourceKeys, read_source
from avmae.convert.videomae import sinusoid_table

__all__ = [
    "PARTS",
    "PREPROCESSING",
    "READERS",
    "SOURCES",
    "DEFAULT_TOLERANCE",
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
    "random_source_checkpoint",
    "read_source",
    "sinusoid_table",
    "size_name",
    "source_code",
    "source_norm_layer",
    "write_classifier",
]
