"""The embedding store: one vector per image, saved with the IDs in one .npz file, made resumably.

`embed_images` embeds a list of images in chunks saved as they complete under `<output>.parts/`, so a
killed run redoes at most one chunk; at the end the chunks are joined into one file. The vectors come
from an image encoder (encoders.py); nearest neighbours and probes read them (index.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from . import files
from .encoders import POOLINGS, PixelCollate, VisionEncoder, load_vision_encoder, pooled_features
from .errors import UserError, log
from .images import ImageDataset, ignore_stop_signals
from .model import DEFAULT_BASE_MODEL

EMBEDDINGS_FORMAT = "jj-vmed-embeddings/1"


@dataclass(frozen=True)
class Embeddings:
    ids: list[str]
    vectors: np.ndarray  # (len(ids), dim) float32, rows L2-normalised
    failed: dict[str, str] = field(default_factory=dict)  # ID -> why the image could not be embedded
    meta: dict = field(default_factory=dict)  # how the vectors were made (model, layer, pooling, dtype)


def save_embeddings(path: str | Path, emb: Embeddings) -> Path:
    """One uncompressed .npz (IDs as a unicode array, no pickle): 80,000 x 1,024 loads in well under a second."""
    buffer = io.BytesIO()
    np.savez(buffer, format=np.array(EMBEDDINGS_FORMAT), ids=np.array(emb.ids, dtype=str),
             vectors=np.ascontiguousarray(emb.vectors, dtype=np.float32),
             failed_ids=np.array(list(emb.failed), dtype=str), failed_errors=np.array(list(emb.failed.values()),
                                                                                     dtype=str),
             meta=np.array(json.dumps(emb.meta)))
    return files.write_bytes_atomic(path, buffer.getvalue())


def load_embeddings(path: str | Path) -> Embeddings:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"embeddings file {path} does not exist (make it with: concept_index.py embed)")
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["format"]) != EMBEDDINGS_FORMAT:
                raise ValueError(f"format {data['format']}")
            ids = data["ids"].tolist()
            vectors = data["vectors"].astype(np.float32, copy=False)
            failed = dict(zip(data["failed_ids"].tolist(), data["failed_errors"].tolist(), strict=True))
            meta = json.loads(str(data["meta"]))
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"{path} is not an embeddings file written by concept_index.py embed ({e})") from None
    return Embeddings(ids, vectors.reshape(len(ids), -1), failed, meta)


@dataclass(frozen=True)
class EmbedOptions:
    base_model_path: str = DEFAULT_BASE_MODEL
    pooling: str = "mean"  # mean of the patch tokens LLaVA feeds its projector, or the CLS token
    batch_size: int = 32
    chunk_size: int = 4096  # images per checkpoint file
    device: str = "auto"
    dtype: str = "auto"
    num_workers: int | None = None  # None: 8 (at most cores - 1) with a GPU, 0 on CPU
    resume: bool = False
    overwrite: bool = False


def embed_items(encoder: VisionEncoder, items: list[tuple[str, str]], pooling: str, batch_size: int,
                num_workers: int) -> Embeddings:
    """Embed (ID, path) images in order; unreadable ones are in `failed`, never raised."""
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(ImageDataset(items), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=PixelCollate(encoder.image_processor), worker_init_fn=ignore_stop_signals,
                        pin_memory=getattr(encoder.device, "type", "cpu") == "cuda")
    vectors: dict[str, object] = {}
    failed: dict[str, str] = {}
    for batch in loader:
        for image_id, error in batch.failures:
            log(f"warning: {image_id}: cannot embed image: {error}")
            failed[image_id] = error
        if batch.inputs is not None:
            pixels = batch.inputs["pixel_values"]
            vectors.update(zip(batch.ids, pooled_features(encoder, pixels, pooling), strict=True))
    kept = [i for i, _ in items if i in vectors]
    matrix = torch.stack([vectors[i] for i in kept]).numpy() if kept else np.zeros((0, 0), np.float32)
    return Embeddings(kept, matrix, {i: failed[i] for i, _ in items if i in failed})


def default_embeddings_path(output_csv: str | Path) -> Path:
    """Where a generate run keeps its images' embeddings: beside the output, `<stem>.embeddings.npz`.
    With the journal's raw text, it is all a later re-fusion needs (no GPU)."""
    out = Path(output_csv)
    return out.with_name(f"{out.stem}.embeddings.npz")


def parts_dir(output: Path) -> Path:
    return output.with_name(f"{output.name}.parts")


def embed_settings(items: list[tuple[str, str]], options: EmbedOptions) -> dict:
    """What decides the file; a resume with different settings is refused."""
    ids = hashlib.sha256("\n".join(i for i, _ in items).encode()).hexdigest()[:16]
    return {"base_model_path": options.base_model_path, "pooling": options.pooling, "dtype": options.dtype,
            "chunk_size": options.chunk_size, "images": len(items), "ids_sha256": ids}


def check_embed_options(options: EmbedOptions) -> None:
    if options.pooling not in POOLINGS:
        raise UserError(f"--pooling must be one of {', '.join(POOLINGS)}, got {options.pooling!r}")
    for name in ("batch_size", "chunk_size"):
        if getattr(options, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(options, name)}")


def check_embeddings_target(output: str | Path, options: EmbedOptions) -> None:
    """Refuse to overwrite a finished or unfinished embedding run without being asked. A fused generate
    run calls this before it generates, so the conflict shows in a second, not after the night."""
    output = Path(output)
    if options.overwrite or options.resume:
        return
    if output.exists():
        raise UserError(f"{output} exists; add --resume_from_checkpoint auto to keep it, or --overwrite")
    if parts_dir(output).exists():
        raise UserError(f"an unfinished embedding run is in {parts_dir(output)}: add --resume_from_checkpoint auto "
                        "to continue it, or --overwrite to start over")


def embed_images(items: list[tuple[str, str]], output: str | Path, options: EmbedOptions,
                 encoder: VisionEncoder | None = None) -> Embeddings:
    """Embed every image into one file, resumably: chunks of `chunk_size` images are saved as they
    complete under `<output>.parts/`; a resumed run skips finished chunks (redoing those with failed
    images); at the end they are joined into `output`, failures listed in `<output stem>.errors.csv`.
    """
    check_embed_options(options)
    check_embeddings_target(output, options)
    output = Path(output)
    parts = parts_dir(output)
    settings = embed_settings(items, options)
    if options.overwrite:
        shutil.rmtree(parts, ignore_errors=True)
    elif output.exists():
        done = load_embeddings(output)
        if done.meta.get("settings") != settings:
            raise UserError(f"{output} was made from other images or settings; --overwrite to embed again")
        log(f"{output} is complete: {len(done.ids)} images")
        return done
    elif options.resume and not parts.exists():
        log(f"nothing to resume in {parts}; starting fresh")
    manifest = parts / "manifest.json"
    if manifest.exists():
        old = json.loads(manifest.read_text())
        if old != settings:
            changed = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(old) | set(settings))
                                if old.get(k) != settings.get(k))
            raise UserError(f"cannot resume {parts}: it was started with other settings ({changed}); --overwrite "
                            "to start over")
    else:
        files.write_text_atomic(manifest, json.dumps(settings, indent=1))

    chunks = [items[start:start + options.chunk_size] for start in range(0, len(items), options.chunk_size)]
    todo = [n for n in range(len(chunks)) if not chunk_is_done(parts, n)]
    if len(todo) < len(chunks):
        log(f"resuming: {len(chunks) - len(todo)} of {len(chunks)} chunks already embedded")
    if todo:
        import time

        encoder = encoder or load_vision_encoder(options.base_model_path, options.device, options.dtype)
        workers = options.num_workers
        if workers is None:
            cuda = getattr(encoder.device, "type", "cpu") == "cuda"
            workers = min(8, max(0, (os.cpu_count() or 1) - 1)) if cuda else 0
        start, count = time.perf_counter(), 0
        for n in todo:
            part = embed_items(encoder, chunks[n], options.pooling, options.batch_size, workers)
            save_embeddings(chunk_path(parts, n), replace(part, meta=encoder.describe()))
            count += len(chunks[n])
            log(f"chunk {n + 1}/{len(chunks)}: {count} images in {time.perf_counter() - start:.0f} s "
                f"({count / max(time.perf_counter() - start, 1e-9):.1f} images/s)")
    result = join_chunks([load_embeddings(chunk_path(parts, n)) for n in range(len(chunks))], settings, options)
    save_embeddings(output, result)
    errors_csv = output.with_name(f"{output.stem}.errors.csv")
    if result.failed:
        files.write_csv_atomic(errors_csv, ["ID", "Error"], ([i, e] for i, e in result.failed.items()))
        log(f"{len(result.failed)} images could not be embedded (listed in {errors_csv})")
    else:
        errors_csv.unlink(missing_ok=True)
    shutil.rmtree(parts, ignore_errors=True)
    return result


def chunk_path(parts: Path, n: int) -> Path:
    return parts / f"chunk-{n:06d}.npz"


def chunk_is_done(parts: Path, n: int) -> bool:
    """A chunk is done when its file exists with no failed image (failures are retried, as in the generate runs)."""
    path = chunk_path(parts, n)
    return path.exists() and not load_embeddings(path).failed


def join_chunks(chunks: list[Embeddings], settings: dict, options: EmbedOptions) -> Embeddings:
    ids = [i for c in chunks for i in c.ids]
    vectors = [c.vectors for c in chunks if len(c.ids)]
    failed = {i: e for c in chunks for i, e in c.failed.items()}
    described = next((c.meta for c in chunks if c.meta), {})
    meta = {"settings": settings, "base_model_path": options.base_model_path, "pooling": options.pooling,
            **described}
    return Embeddings(ids, np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32), failed, meta)
