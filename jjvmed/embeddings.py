"""The embedding store: one vector per image and encoder, saved with the IDs in one .npz file, made resumably.

A file holds the vectors of one encoder (`concept_index.py embed --encoder SPEC`) or of several (an
ensemble: a generate run embeds with every encoder its concept index uses). Each encoder's vectors
carry its description (encoders.describe), so vectors of different encoders are never compared.

`embed_images` embeds a list of images in chunks saved as they complete under `<output>.parts/`, so a
killed run redoes at most one chunk; at the end the chunks are joined into one file. Nothing is left
on disk until the first chunk is done: a run that fails at start (a model not found) can be corrected
and run again as it was.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import files
from .encoders import (
    POOLINGS,
    Encoder,
    PixelCollate,
    differences,
    encoder_label,
    load_encoder,
    parse_spec,
    pooled_features,
    resolve_pooling,
    same_encoder,
)
from .errors import UserError, log
from .images import ImageDataset, ignore_stop_signals
from .model import DEFAULT_BASE_MODEL

EMBEDDINGS_FORMAT = "jj-vmed-embeddings/2"
OLD_FORMATS = ("jj-vmed-embeddings/1",)  # one LLaVA encoder, read as such
GPU_BATCH = 256  # images per forward pass on a GPU: a ViT-B/16 or ConvNeXt-B at 224 px uses a few GB
CPU_BATCH = 32


@dataclass(frozen=True)
class Embeddings:
    """Images' vectors by one or more encoders: row i of `vectors[m]` is image ids[i] as encoder m sees it."""
    ids: list[str]
    vectors: list[np.ndarray]  # per encoder: (len(ids), dim) float32, rows L2-normalised
    encoders: list[dict]  # per encoder: what made its vectors (Encoder.describe)
    failed: dict[str, str] = field(default_factory=dict)  # ID -> why the image could not be embedded
    meta: dict = field(default_factory=dict)  # the run's settings (a resume must match them)

    def member(self, description: dict, what: str) -> np.ndarray:
        """The vectors made by the encoder `description`, or one line saying which encoders the file has."""
        for made, vectors in zip(self.encoders, self.vectors, strict=True):
            if same_encoder(made, description):
                return vectors
        have = "; ".join(f"{encoder_label(e)} ({differences(e, description)})" for e in self.encoders) or "none"
        raise UserError(f"{what} was made with encoder {encoder_label(description)}, the embeddings with other "
                        f"ones ({have}): embed the images with --encoder {description.get('source', '?')}")


def save_embeddings(path: str | Path, emb: Embeddings) -> Path:
    """One uncompressed .npz (IDs as a unicode array, no pickle): 80,000 x 1,024 loads in well under a second."""
    buffer = io.BytesIO()
    arrays = {f"vectors_{m}": np.ascontiguousarray(v, dtype=np.float32) for m, v in enumerate(emb.vectors)}
    np.savez(buffer, format=np.array(EMBEDDINGS_FORMAT), ids=np.array(emb.ids, dtype=str),
             failed_ids=np.array(list(emb.failed), dtype=str),
             failed_errors=np.array(list(emb.failed.values()), dtype=str),
             encoders=np.array(json.dumps(emb.encoders)), meta=np.array(json.dumps(emb.meta)), **arrays)
    return files.write_bytes_atomic(path, buffer.getvalue())


def load_embeddings(path: str | Path) -> Embeddings:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"embeddings file {path} does not exist (make it with: concept_index.py embed)")
    try:
        with np.load(path, allow_pickle=False) as data:
            kind = str(data["format"])
            if kind not in (EMBEDDINGS_FORMAT, *OLD_FORMATS):
                raise ValueError(f"format {kind}")
            ids = data["ids"].tolist()
            failed = dict(zip(data["failed_ids"].tolist(), data["failed_errors"].tolist(), strict=True))
            meta = json.loads(str(data["meta"]))
            if kind in OLD_FORMATS:
                # version 1 was LLaVA's tower only, whose vision model is a CLIP one
                encoders = [{"family": "llava", "name": "clip_vision_model", "source": "llava",
                             **{k: v for k, v in meta.items() if k in ("pooling", "feature_layer", "dtype")}}]
                vectors = [data["vectors"]]
            else:
                encoders = json.loads(str(data["encoders"]))
                vectors = [data[f"vectors_{m}"] for m in range(len(encoders))]
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"{path} is not an embeddings file written by concept_index.py embed ({e})") from None
    vectors = [v.astype(np.float32, copy=False).reshape(len(ids), -1) for v in vectors]
    for e, v in zip(encoders, vectors, strict=True):
        e.setdefault("dim", int(v.shape[1]))
    return Embeddings(ids, vectors, encoders, failed, meta)


def combine(parts: list[Embeddings], names: list[str]) -> Embeddings:
    """Several files of the same images (one per encoder) as one ensemble; refused, before any work, when
    their images differ or an encoder comes twice."""
    first = parts[0]
    for emb, name in zip(parts[1:], names[1:], strict=True):
        if emb.ids != first.ids or set(emb.failed) != set(first.failed):
            only = sorted(set(emb.ids) ^ set(first.ids))
            raise UserError(f"{names[0]} and {name} hold different images ({len(first.ids)} vs {len(emb.ids)} "
                            + (f"embedded, e.g. {only[0]}" if only else "embedded, in another order")
                            + "): embed the same images with each encoder")
    encoders = [e for emb in parts for e in emb.encoders]
    for m, e in enumerate(encoders):
        if any(same_encoder(e, other) for other in encoders[:m]):
            raise UserError(f"encoder {encoder_label(e)} is given twice; an ensemble takes each encoder once")
    return Embeddings(first.ids, [v for emb in parts for v in emb.vectors], encoders, first.failed, first.meta)


def load_ensemble(paths: list[str]) -> Embeddings:
    """One or more embeddings files (--embeddings A B ...) as one set of vectors per encoder."""
    return combine([load_embeddings(p) for p in paths], [str(p) for p in paths])


@dataclass(frozen=True)
class EmbedOptions:
    base_model_path: str = DEFAULT_BASE_MODEL  # the model of the 'llava' encoder
    pooling: str = "default"  # for every encoder without its own (see `encoders`)
    batch_size: int | None = None  # None: GPU_BATCH on a GPU, CPU_BATCH on the CPU
    chunk_size: int = 4096  # images per checkpoint file
    device: str = "auto"
    dtype: str = "auto"
    num_workers: int | None = None  # None: 16 (at most cores - 1) with a GPU, 0 on CPU
    resume: bool = False
    overwrite: bool = False
    encoders: tuple = ()  # specs ('timm:...'), or (spec, pooling) pairs; empty: LLaVA's tower alone

    def choices(self) -> list[tuple[str, str]]:
        """(spec, pooling) of each encoder, pooling resolved for its family."""
        chosen = [(e, self.pooling) if isinstance(e, str) else tuple(e) for e in self.encoders] or [("llava",
                                                                                                      self.pooling)]
        return [(spec, resolve_pooling(parse_spec(spec)[0], pooling)) for spec, pooling in chosen]


def embed_items(encoder: Encoder, items: list[tuple[str, str]], batch_size: int, num_workers: int) -> Embeddings:
    """Embed (ID, path) images in order; unreadable ones are in `failed`, never raised."""
    import torch
    from torch.utils.data import DataLoader

    cuda = getattr(encoder.device, "type", "cpu") == "cuda"
    loader = DataLoader(ImageDataset(items), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=PixelCollate(encoder.preprocess), worker_init_fn=ignore_stop_signals,
                        pin_memory=cuda, prefetch_factor=4 if num_workers else None,
                        persistent_workers=False)
    vectors: dict[str, object] = {}
    failed: dict[str, str] = {}
    for batch in loader:
        for image_id, error in batch.failures:
            log(f"warning: {image_id}: cannot embed image: {error}")
            failed[image_id] = error
        if batch.inputs is not None:
            vectors.update(zip(batch.ids, pooled_features(encoder, batch.inputs["pixel_values"]), strict=True))
    kept = [i for i, _ in items if i in vectors]
    matrix = torch.stack([vectors[i] for i in kept]).numpy() if kept else np.zeros((0, 0), np.float32)
    return Embeddings(kept, [matrix], [encoder.describe()], {i: failed[i] for i, _ in items if i in failed})


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
    return {"encoders": [list(c) for c in options.choices()], "base_model_path": options.base_model_path,
            "dtype": options.dtype, "chunk_size": options.chunk_size, "images": len(items), "ids_sha256": ids}


def check_embed_options(options: EmbedOptions) -> None:
    if options.pooling not in POOLINGS:
        raise UserError(f"--pooling must be one of {', '.join(POOLINGS)}, got {options.pooling!r}")
    for name in ("batch_size", "chunk_size"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    options.choices()  # every spec parses and takes its pooling


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
                 encoder: Encoder | None = None) -> Embeddings:
    """Embed every image with every encoder of `options` into one file, resumably: chunks of `chunk_size`
    images are saved as they complete under `<output>.parts/` (the manifest with the first of them); a
    resumed run skips finished chunks (redoing those with failed images); at the end they are joined into
    `output`, failures listed in `<output stem>.errors.csv`. `encoder`: LLaVA's tower already loaded (a
    generate run's), used for the 'llava' encoder instead of loading it again.
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

    chunks = [items[start:start + options.chunk_size] for start in range(0, len(items), options.chunk_size)]
    choices = options.choices()
    members = []
    for m, (spec, pooling) in enumerate(choices):
        name = f"encoder {m + 1}/{len(choices)} ({spec}): " if len(choices) > 1 else ""
        todo = [n for n in range(len(chunks)) if not chunk_is_done(parts, m, n)]
        if len(todo) < len(chunks):
            log(f"{name}resuming: {len(chunks) - len(todo)} of {len(chunks)} chunks already embedded")
        if todo:
            reuse = encoder is not None and spec == "llava" and encoder.pooling == pooling
            loaded = encoder if reuse else load_encoder(spec, pooling, options.device, options.dtype,
                                                        options.base_model_path)
            embed_chunks(loaded, chunks, todo, parts, m, manifest, settings, options, name)
            if not reuse:
                del loaded
                free_memory()
        members.append(join_chunks([load_embeddings(chunk_path(parts, m, n)) for n in range(len(chunks))]))
    result = ensemble_of(members, settings)
    save_embeddings(output, result)
    errors_csv = output.with_name(f"{output.stem}.errors.csv")
    if result.failed:
        files.write_csv_atomic(errors_csv, ["ID", "Error"], ([i, e] for i, e in result.failed.items()))
        log(f"{len(result.failed)} images could not be embedded (listed in {errors_csv})")
    else:
        errors_csv.unlink(missing_ok=True)
    shutil.rmtree(parts, ignore_errors=True)
    return result


def embed_chunks(encoder: Encoder, chunks: list, todo: list[int], parts: Path, m: int, manifest: Path,
                 settings: dict, options: EmbedOptions, name: str) -> None:
    cuda = getattr(encoder.device, "type", "cpu") == "cuda"
    workers = options.num_workers
    if workers is None:
        # Decoding and resizing a JPEG costs a CPU core several milliseconds; a GPU embeds a ViT-B batch in far
        # less, so with a GPU every core but one decodes.
        workers = min(16, max(0, (os.cpu_count() or 1) - 1)) if cuda else 0
    batch_size = options.batch_size or (GPU_BATCH if cuda else CPU_BATCH)
    start, count = time.perf_counter(), 0
    for n in todo:
        part = embed_items(encoder, chunks[n], batch_size, workers)
        if not manifest.exists():
            files.write_text_atomic(manifest, json.dumps(settings, indent=1))
        save_embeddings(chunk_path(parts, m, n), part)
        count += len(chunks[n])
        seconds = time.perf_counter() - start
        log(f"{name}chunk {n + 1}/{len(chunks)}: {count} images in {seconds:.0f} s "
            f"({count / max(seconds, 1e-9):.1f} images/s)")


def free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def chunk_path(parts: Path, m: int, n: int) -> Path:
    return parts / f"encoder-{m}-chunk-{n:06d}.npz"


def chunk_is_done(parts: Path, m: int, n: int) -> bool:
    """A chunk is done when its file exists with no failed image (failures are retried, as in the generate runs)."""
    path = chunk_path(parts, m, n)
    return path.exists() and not load_embeddings(path).failed


def join_chunks(chunks: list[Embeddings]) -> Embeddings:
    """One encoder's chunks, in order, as one set of vectors."""
    ids = [i for c in chunks for i in c.ids]
    vectors = [c.vectors[0] for c in chunks if len(c.ids)]
    failed = {i: e for c in chunks for i, e in c.failed.items()}
    described = next((c.encoders[0] for c in chunks if c.encoders), {})
    return Embeddings(ids, [np.concatenate(vectors) if vectors else np.zeros((0, described.get("dim", 0)),
                                                                            np.float32)], [described], failed)


def ensemble_of(members: list[Embeddings], settings: dict) -> Embeddings:
    """Each encoder's vectors of the same images; an image that failed for one encoder is failed for all."""
    failed = {i: e for m in members for i, e in m.failed.items()}
    ids = [i for i in members[0].ids if i not in failed]
    vectors = []
    for m in members:
        row = {i: n for n, i in enumerate(m.ids)}
        vectors.append(m.vectors[0][[row[i] for i in ids]] if ids else m.vectors[0][:0])
    return Embeddings(ids, vectors, [m.encoders[0] for m in members], failed, {"settings": settings})
