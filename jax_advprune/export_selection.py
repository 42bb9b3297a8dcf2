"""Export a selection for PyTorch trainers: the kept synthetic samples as DM-Improves-AT npz files.

    python -m jax_advprune.export_selection --workdir runs/c10 --out selection/ [--part-size 5000000]

Writes into --out, streaming the rows (memory stays flat; a 20M-row selection is
written chunk by chunk):
  selected.npz (or selected_part<k>.npz with --part-size)  `image` uint8 (N, H, W, C) and `label` int64 (N,):
      the format DM-Improves-AT's train-wa.py reads with --aux-data-filename;
  eps.npy (eps_part<k>.npy)                 float32 (N,): each row's training eps (PUMA's per-sample eps), row by row;
  pool_index.npy (pool_index_part<k>.npy)   int64 (N,): each row's index in this run's pool;
  selection.json                            the map: per part its files and row count, where pool indices start
                                            (the original split's size), counts and the eps used.
The kept original images are not exported (DM-Improves-AT trains on its whole
original split); selection.json says how many the selection kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import ml_collections
import numpy as np

from jax_advprune import run_dir, storage

CHUNK_ROWS = 8_192  # rows read and written at a time: memory per chunk, not per selection


def _pool(workdir: str):
    """(the work directory's pool, reopened from settings/select.json without writing anything, those settings)."""
    from jax_advprune.data.splits import load_data
    from jax_advprune.errors import UserError

    path = run_dir.settings_file(workdir, "select")
    if not storage.exists(path) or not run_dir.is_complete(workdir, "select"):
        raise UserError(
            f"{workdir} holds no complete selection (selection/meta.json, {path}): run the select phase first"
        )
    settings = storage.read_json(path)
    config = ml_collections.ConfigDict(
        {"data": settings["data"], "seed": settings["seed"], "train": {"validation_size": settings["validation_size"]}}
    )
    return load_data(config, run_dir.data_dir(workdir)).pool, settings


def export(workdir: str, out_dir: str, part_size: int = 0) -> dict:
    """Streams the kept synthetic rows of `workdir`'s selection into `out_dir`; returns the map written to selection.json."""
    from jax_advprune.data.npz_format import NpzStreamWriter
    from jax_advprune.storage import atomic_output, write_json

    pool, settings = _pool(workdir)
    keep = storage.load_npy(run_dir.selection_file(workdir, "keep.npy"))
    eps = storage.load_npy(run_dir.selection_file(workdir, "eps.npy"))
    rows = np.flatnonzero(keep & pool.is_synthetic)
    part_size = part_size or max(len(rows), 1)
    storage.makedirs(out_dir)
    parts = []
    for k, start in enumerate(range(0, len(rows), part_size), start=1):
        chosen = rows[start : start + part_size]
        suffix = f"_part{k}" if part_size < len(rows) else ""
        names = {"images": f"selected{suffix}.npz", "eps": f"eps{suffix}.npy", "pool_index": f"pool_index{suffix}.npy"}
        with NpzStreamWriter(os.path.join(out_dir, names["images"]), len(chosen), pool.image_shape) as writer:
            for begin in range(0, len(chosen), CHUNK_ROWS):
                images, labels = pool.read(chosen[begin : begin + CHUNK_ROWS])
                writer.write(images, labels)
        for key, array in (("eps", eps[chosen].astype(np.float32)), ("pool_index", chosen.astype(np.int64))):
            with atomic_output(os.path.join(out_dir, names[key]), ".npy") as tmp:
                np.save(tmp, array)
        parts.append({**names, "rows": int(len(chosen))})
    summary = {
        "workdir": storage.absolute(workdir),
        "parts": parts,
        "rows": int(len(rows)),
        "pool_size": int(len(keep)),
        "num_original": int(pool.num_original),
        "kept_original_not_exported": int((keep & ~pool.is_synthetic).sum()),
        "image_shape": list(pool.image_shape),
        "eps": {
            "attack": settings["eps"],
            "min": float(eps[rows].min()) if len(rows) else None,
            "lowered": int((eps[rows] < settings["eps"]).sum()),
        },
    }
    write_json(os.path.join(out_dir, "selection.json"), summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--part-size", type=int, default=0, help="rows per npz part; 0 = one file")
    args = parser.parse_args(argv)
    from jax_advprune.errors import UserError

    if args.part_size < 0:
        parser.error("--part-size must be >= 0")
    try:
        summary = export(args.workdir, args.out, args.part_size)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(
        json.dumps({k: summary[k] for k in ("rows", "pool_size", "kept_original_not_exported", "eps")}), "->", args.out
    )


if __name__ == "__main__":
    main()
