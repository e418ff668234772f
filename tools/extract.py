"""Embeddings of many videos into one .npz file, with the preprocessing the model was trained with.

    python tools/extract.py EXPORT clip1.mp4 clip2.mp4 OUT.npz        # files (ids: file stems)
    python tools/extract.py EXPORT videos/ OUT.npz                    # a folder, recursively (ids: relative paths)
    python tools/extract.py EXPORT configs/probe/vggsound.yaml OUT.npz --split test -o data.root=/data/vggsound
                                                                      # a manifest split, or shards (data.format: shards)

EXPORT is an export folder (tools/export.py, tools/convert.py). OUT holds ``id`` (the clip ids) and
one float32 ``(N, D)`` array per embedding: ``video`` and ``audio`` (each modality encoded alone,
tokens mean-pooled), ``joint`` (both together, video then audio pooled tokens concatenated); and
``views``. Read it with numpy (``np.load(OUT)["audio"]``), torch (``torch.from_numpy(...)``) or
pandas (``pd.DataFrame(z["joint"], index=z["id"])``); see docs/architecture.md, "Using a model".

``--views N`` embeds N evenly spaced clips of each file and averages their features, as the
evaluation does (default: the export's ``data.test_clips``). Files that cannot be read are listed
in ``OUT`` with ``.bad.tsv`` for ``.npz`` and skipped. Work is saved batch by batch in
``OUT.parts/``: run the same command again after an interruption and it continues; the result
equals that of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from avmae.cli import run_tool
from avmae.config import load_config
from avmae.inference import eval_data_config, extract_to_file, file_records, folder_videos, load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", help="export folder")
    parser.add_argument("inputs", nargs="+", help="video files, a folder, or a YAML config (its data section)")
    parser.add_argument("out", help="output .npz file")
    parser.add_argument("--split", default="test", help="split of a config input (train, val, test)")
    parser.add_argument("-o", "--override", action="append", default=[], help="key.sub=value for a config input")
    parser.add_argument("--views", type=int, default=None, help="clips per file, features averaged")
    parser.add_argument("--crops", type=int, default=None, help="spatial crops per clip (1 or 3)")
    parser.add_argument("--outputs", default=None, help="comma-separated among video,audio,joint (default: all)")
    parser.add_argument("--batch-size", type=int, default=8, help="files per batch")
    parser.add_argument("--workers", type=int, default=2, help="decoding processes")
    parser.add_argument("--device", default=None, help="cuda, cpu... (default: the GPU when there is one)")
    args = parser.parse_args(argv)

    embedder = load(args.export, args.device)
    inputs = [Path(p) for p in args.inputs]
    records, split, settings = None, None, {"inputs": [str(p) for p in inputs]}
    if len(inputs) == 1 and inputs[0].suffix in (".yaml", ".yml"):
        embedder = embedder.with_data(load_config(inputs[0], args.override).data)
        split = args.split
        settings.update(split=split, overrides=args.override)
    elif len(inputs) == 1 and inputs[0].is_dir():
        records = file_records(folder_videos(inputs[0]), root=inputs[0])
    else:
        records = file_records(inputs)
    embedder = embedder.with_data(eval_data_config(embedder.cfg.data, args.views, args.crops))
    outputs = tuple(args.outputs.split(",")) if args.outputs else None
    result = extract_to_file(
        embedder, args.out, records=records, split=split, batch_size=args.batch_size,
        num_workers=args.workers, outputs=outputs, settings=settings,
    )
    print(f"{result['clips']} clips x {embedder.views} views -> {result['out']}; "
          f"{result['bad']} bad files listed in {result['bad_list']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
