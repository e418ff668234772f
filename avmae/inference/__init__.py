"""Use a model: embeddings, feature files, retrieval and class predictions from raw videos.

    import avmae
    model = avmae.load("runs/demo/export")           # an export folder (tools/export.py, tools/convert.py)
    out = model.embed("clip.mp4")                     # {"video": (D,), "audio": (D,), "joint": (2D,)}

- ``embed``: ``load`` and ``Embedder``, an exported encoder with the evaluation preprocessing of
  its own config (``avmae.data``), and the embeddings it gives;
- ``extract``: the embeddings of many clips, in memory or written to one ``.npz`` in resumable
  batches (``extract_to_file``, ``tools/extract.py``);
- ``retrieval``: audio<->video retrieval of an export on a dataset (``run_retrieval``,
  ``evaluate_retrieval``; the metrics are ``avmae.evaluation.retrieval``'s);
- ``predict``: ``Classifier``, the top-k class names of a finetuned model (``tools/predict.py``).

docs/architecture.md, "Using a model".
"""

from avmae.inference.embed import OUTPUTS, Embedder, eval_data_config, file_records, folder_videos, load
from avmae.inference.extract import embed_dataset, extract_to_file
from avmae.inference.predict import Classifier, class_names
from avmae.inference.retrieval import evaluate_retrieval, read_subset, run_retrieval

__all__ = [
    "OUTPUTS",
    "Classifier",
    "Embedder",
    "class_names",
    "embed_dataset",
    "eval_data_config",
    "evaluate_retrieval",
    "extract_to_file",
    "file_records",
    "folder_videos",
    "load",
    "read_subset",
    "run_retrieval",
]
