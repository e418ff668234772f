"""avmae: self-supervised audiovisual pretraining (joint audio+video MAE, contrastive objectives).

``avmae.from_pretrained(folder)`` rebuilds an exported model (see ``avmae.export``);
``avmae.load(folder).embed("clip.mp4")`` embeds a video with its preprocessing (``avmae.inference``).
"""

from __future__ import annotations

__all__ = ["from_pretrained", "load"]


def __getattr__(name: str):
    # Imported on first use: `import avmae.config` (every tool) should not pull in the models.
    if name == "from_pretrained":
        from avmae.export import from_pretrained

        return from_pretrained
    if name == "load":
        from avmae.inference import load

        return load
    raise AttributeError(f"module 'avmae' has no attribute {name!r}")
