"""The embedding store: one vector per image and encoder, saved with the IDs in one .npz file.

A file holds the vectors of one encoder (`concept_index.py embed --encoder SPEC`) or of several (an
ensemble: a generate run embeds with every encoder its concept index uses). Each encoder's vectors
carry its description (encoders.describe), so vectors of different encoders are never compared, and
each image's vectors the identity of the file they were made from (files.file_identity).

`ensure_embeddings` is the one way every command makes a file. It keeps the vectors it finds at the
path (the file, and the chunks of a run cut short) of every image whose file is unchanged, embeds the
others, and writes the file whole (atomically), holding a lock on it. Compared, per image: its ID and
its file's identity now (size, modification time, status-change time) with the one recorded when its
vector was made; per encoder: what decides its vectors as the options say (`made_with`: the --encoder
spec, the pooling, the dtype, and for LLaVA's tower the base model). Embedding is cheap next to
generating, so a changed identity simply means embed again (no reading of the bytes to compare). The
file keeps the vectors of images outside the run too; only vectors of other encoder settings would be
lost, and that is refused unless --overwrite. A run with more encoders than a finished file, on fewer of
its images, is refused too: the file could not keep those images, lacking the new encoder's vectors.
"""

from __future__ import annotations

import gc
import io
import json
import os
import shutil
import time
import zipfile
from contextlib import nullcontext
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
    source_files,
)
from .errors import UserError, log
from .images import ImageDataset, id_sort_key, ignore_stop_signals
from .model import DEFAULT_BASE_MODEL

EMBEDDINGS_FORMAT = "jj-vmed-embeddings/3"
# 1: one LLaVA encoder; 2: several. Neither recorded the images' file identities, so nothing of them is reused.
OLD_FORMATS = ("jj-vmed-embeddings/1", "jj-vmed-embeddings/2")
NO_IDENTITY = [-1, -1, -1]  # a row of `identities` for an image whose file identity is not known
GPU_BATCH = 256  # images per forward pass on a GPU: a ViT-B/16 or ConvNeXt-B at 224 px uses a few GB
CPU_BATCH = 32


@dataclass(frozen=True)
class Embeddings:
    """Images' vectors by one or more encoders: row i of `vectors[m]` is image ids[i] as encoder m sees it."""
    ids: list[str]
    vectors: list[np.ndarray]  # per encoder: (len(ids), dim) float32, rows L2-normalised
    encoders: list[dict]  # per encoder: what made its vectors (Encoder.describe)
    failed: dict[str, str] = field(default_factory=dict)  # ID -> why the image could not be embedded
    meta: dict = field(default_factory=dict)  # "made_with": per encoder, the settings that made it (see made_with)
    identities: dict[str, list[int]] = field(default_factory=dict)  # ID -> its file's identity when embedded

    def member(self, description: dict, what: str) -> np.ndarray:
        """The vectors made by the encoder `description`, or one line saying which encoders the file has."""
        for made, vectors in zip(self.encoders, self.vectors, strict=True):
            if same_encoder(made, description):
                return vectors
        have = "; ".join(f"{encoder_label(e)} ({differences(e, description)})" for e in self.encoders) or "none"
        # `description` is one encoder the caller needs (of an ensemble index, maybe not all of its encoders)
        raise UserError(f"{what} needs vectors of encoder {encoder_label(description)}; the embeddings hold other "
                        f"ones ({have}): embed the images with --encoder {description.get('source', '?')}")


def save_embeddings(path: str | Path, emb: Embeddings) -> Path:
    """One uncompressed .npz (IDs as a unicode array, no pickle): 80,000 x 1,024 loads in well under a second."""
    buffer = io.BytesIO()
    arrays = {f"vectors_{m}": np.ascontiguousarray(v, dtype=np.float32) for m, v in enumerate(emb.vectors)}
    identities = [emb.identities.get(i) or NO_IDENTITY for i in emb.ids]
    np.savez(buffer, format=np.array(EMBEDDINGS_FORMAT), ids=np.array(emb.ids, dtype=str),
             identities=np.array(identities, dtype=np.int64).reshape(len(emb.ids), len(NO_IDENTITY)),
             failed_ids=np.array(list(emb.failed), dtype=str),
             failed_errors=np.array(list(emb.failed.values()), dtype=str),
             encoders=np.array(json.dumps(emb.encoders)), meta=np.array(json.dumps(emb.meta)), **arrays)
    return files.write_bytes_atomic(path, buffer.getvalue())


def load_embeddings(path: str | Path, vectors: bool = True) -> Embeddings:
    """The file at `path`; with `vectors=False` everything but the vectors (an .npz is read array by array,
    so the IDs, identities and encoders of a large file come at once)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--embeddings {path} is a folder; give the .npz file concept_index.py embed writes")
    if not path.is_file():
        raise UserError(f"embeddings file {path} does not exist (make it with: concept_index.py embed)")
    if not zipfile.is_zipfile(path):  # numpy's own error would speak of pickles and allow_pickle
        raise UserError(f"{path} is not an embeddings file written by concept_index.py embed (not an .npz file)")
    try:
        with np.load(path, allow_pickle=False) as data:
            kind = str(data["format"])
            if kind not in (EMBEDDINGS_FORMAT, *OLD_FORMATS):
                raise ValueError(f"format {kind}")
            ids = data["ids"].tolist()
            failed = dict(zip(data["failed_ids"].tolist(), data["failed_errors"].tolist(), strict=True))
            meta = json.loads(str(data["meta"]))
            identities = {}
            if "identities" in data.files:
                rows = data["identities"].reshape(len(ids), -1).tolist()
                identities = {i: row for i, row in zip(ids, rows, strict=True) if row != NO_IDENTITY}
            if kind == OLD_FORMATS[0]:
                # version 1 was LLaVA's tower only, whose vision model is a CLIP one
                encoders = [{"family": "llava", "name": "clip_vision_model", "source": "llava",
                             **{k: v for k, v in meta.items() if k in ("pooling", "feature_layer", "dtype")}}]
                names = ["vectors"]
            else:
                encoders = json.loads(str(data["encoders"]))
                names = [f"vectors_{m}" for m in range(len(encoders))]
            stored = [data[name] for name in names] if vectors else []
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is not an embeddings file written by concept_index.py embed ({e})") from None
    stored = [v.astype(np.float32, copy=False).reshape(len(ids), -1) for v in stored]
    for e, v in zip(encoders, stored, strict=False):
        e.setdefault("dim", int(v.shape[1]))
    if kind == OLD_FORMATS[1] and "settings" in meta:
        settings = meta["settings"]  # what version 2 recorded of the run, in the options' words
        meta["made_with"] = [made_with(spec, pooling, settings.get("base_model_path"), settings.get("dtype"))
                             for spec, pooling in settings.get("encoders", [])]
    return Embeddings(ids, stored, encoders, failed, meta, identities)


def combine(parts: list[Embeddings], names: list[str]) -> Embeddings:
    """Several files of the same images (one per encoder) as one ensemble; refused, before any work, when
    their images differ or an encoder comes twice. Rows are matched by ID: a file's row order is that of the
    run that wrote it last (an ID list's, a --limit's), which says nothing about its images."""
    first = parts[0]
    for emb, name in zip(parts[1:], names[1:], strict=True):
        if set(emb.ids) != set(first.ids) or set(emb.failed) != set(first.failed):
            only = sorted(set(emb.ids) ^ set(first.ids)) or sorted(set(emb.failed) ^ set(first.failed))
            raise UserError(f"{names[0]} and {name} hold different images ({len(first.ids)} vs {len(emb.ids)} "
                            f"embedded, e.g. {only[0]}): embed the same images with each encoder")
    encoders = [e for emb in parts for e in emb.encoders]
    for m, e in enumerate(encoders):
        if any(same_encoder(e, other) for other in encoders[:m]):
            raise UserError(f"encoder {encoder_label(e)} is given twice; an ensemble takes each encoder once")
    vectors = []
    for emb in parts:
        row = {i: n for n, i in enumerate(emb.ids)}
        order = [row[i] for i in first.ids]
        vectors += [v if emb.ids == first.ids else v[order] for v in emb.vectors]
    return Embeddings(first.ids, vectors, encoders, first.failed, first.meta)


def load_ensemble(paths: list[str]) -> Embeddings:
    """One or more embeddings files (--embeddings A B ...) as one set of vectors per encoder."""
    return combine([load_embeddings(p) for p in paths], [str(p) for p in paths])


# ---------------------------------------------------------------------------------------------
# Making a file: keep what is there and still right, embed the rest
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbedOptions:
    base_model_path: str = DEFAULT_BASE_MODEL  # the model of the 'llava' encoder
    pooling: str = "default"  # for every encoder without its own (see `encoders`)
    batch_size: int | None = None  # None: GPU_BATCH on a GPU, CPU_BATCH on the CPU
    chunk_size: int = 4096  # images per checkpoint file
    device: str = "auto"
    dtype: str = "auto"
    num_workers: int | None = None  # None: 16 (at most cores - 1) with a GPU, 0 on CPU
    overwrite: bool = False  # keep nothing of what is at the path: embed every image of the run
    encoders: tuple = ()  # specs ('timm:...'), or (spec, pooling) pairs; empty: LLaVA's tower alone

    def choices(self) -> list[tuple[str, str]]:
        """(spec, pooling) of each encoder, pooling resolved for its family."""
        chosen = [(e, self.pooling) if isinstance(e, str) else tuple(e) for e in self.encoders] or [("llava",
                                                                                                      self.pooling)]
        return [(spec, resolve_pooling(parse_spec(spec)[0], pooling)) for spec, pooling in chosen]

    def made_with(self) -> list[dict]:
        return [made_with(spec, pooling, self.base_model_path, self.dtype) for spec, pooling in self.choices()]


def made_with(spec: str, pooling: str, base_model_path: str | None, dtype: str | None) -> dict:
    """What decides an encoder's vectors, in the options' words: vectors made with the same are reused."""
    key = {"encoder": spec, "pooling": pooling, "dtype": dtype}
    if spec == "llava":  # the tower of the base model
        key["base_model_path"] = base_model_path
    return key


def key_text(key: dict | None) -> str:
    """What two settings are compared by: a local model folder by where it resolves here (`./clip` and
    `/data/clip` are one folder), any other name as written (a folder absent here, a hub ID)."""
    if not key:
        return json.dumps(key)
    resolved = dict(key)
    if isinstance(key.get("base_model_path"), str):
        resolved["base_model_path"] = files.resolved_folder(key["base_model_path"])
    family, _, source = str(key.get("encoder", "")).partition(":")
    if source:
        resolved["encoder"] = f"{family}:{files.resolved_folder(source)}"
    return json.dumps(resolved, sort_keys=True)


def settings_text(key: dict | None) -> str:
    if not key:
        return "settings an earlier version did not record"
    return ", ".join(f"{k.removesuffix('_path').replace('_', ' ')} {v}" for k, v in key.items())


def check_embed_options(options: EmbedOptions) -> None:
    if options.pooling not in POOLINGS:
        raise UserError(f"--pooling must be one of {', '.join(POOLINGS)}, got {options.pooling!r}")
    for name in ("batch_size", "chunk_size"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    options.choices()  # every spec parses and takes its pooling


def default_embeddings_path(output_csv: str | Path) -> Path:
    """Where a generate run keeps its images' embeddings: beside the output, `<stem>.embeddings.npz`.
    With the journal's raw text, it is all a later re-fusion needs (no GPU)."""
    out = Path(output_csv)
    return out.with_name(f"{out.stem}.embeddings.npz")


def parts_dir(output: Path) -> Path:
    """Where the chunks of a run not yet finished are kept, beside its file."""
    return output.with_name(f"{output.name}.parts")


def stored_files(path: Path) -> list[Path]:
    """What an earlier run left at `path`: the file, then the chunks of a run cut short, oldest first."""
    return ([path] if path.exists() else []) + sorted(parts_dir(path).glob("*.npz"))


Place = tuple[Path, int, int]  # a stored vector: (file, encoder in it, row)


@dataclass(frozen=True)
class Plan:
    """What a run finds at its embeddings path, per encoder of its options (read without the vectors)."""
    identities: dict[str, list[int]]  # the run's images' files, now
    reuse: list[dict[str, Place]]  # per encoder: run image -> its vector made from the file as it is now
    others: list[dict[str, Place]]  # per encoder: vectors of images outside the run (kept)
    changed: set[str]  # run images with a vector made from another file (or one not recorded), and none kept
    lost: str  # the vectors at the path this run would not keep, described ("" if none)
    other_failed: dict[str, str] = field(default_factory=dict)  # images outside the run that could not be read
    stranded: str = ""  # images of the finished file outside the run that lack one of its encoders ("" if none)

    def missing(self, ids: list[str]) -> list[str]:
        """IDs without a kept vector of every encoder: what the run embeds."""
        return [i for i in ids if any(i not in found for found in self.reuse)]

    def check(self, path: Path) -> None:
        """Vectors are never dropped without --overwrite (they would be, of other encoder settings), and a finished
        file is never cut to a trial's images (its other images' vectors would leave it for `<path>.parts/`)."""
        if self.stranded:
            raise UserError(f"{path} holds {self.stranded}, which this run would move out of the file: give this run "
                            "another --embeddings (a trial on a few images), or run it on all the file's images")
        if self.lost:
            raise UserError(f"{path} holds {self.lost}, which this run would not keep: add --overwrite to embed this "
                            "run's images into it anew, or give this run its own --embeddings")


def plan_embeddings(items: list[tuple[str, str]], path: str | Path, options: EmbedOptions) -> Plan:
    """Compare what is stored at `path` (the file, unfinished chunks) with the run's images and encoders: each
    vector is kept if its encoder settings (`made_with`) are the run's and its image's file identity is the
    one recorded when it was made. With --overwrite nothing is kept."""
    path = Path(path)
    keys = [key_text(k) for k in options.made_with()]
    identities = {i: files.file_identity(p) for i, p in items}
    reuse: list[dict[str, Place]] = [{} for _ in keys]
    others: list[dict[str, Place]] = [{} for _ in keys]
    changed: set[str] = set()
    other_failed: dict[str, str] = {}
    foreign: list[str] = []
    in_file: set[str] = set()  # images outside the run in the file itself (not in the chunks of a run cut short)
    for source in [] if options.overwrite else stored_files(path):
        try:
            stored = load_embeddings(source, vectors=False)
        except UserError as e:
            raise UserError(f"{e}: add --overwrite to embed this run's images anew at {path}, or give this run "
                            "another --embeddings") from None
        other_failed.update({i: error for i, error in stored.failed.items() if i not in identities})
        made = stored.meta.get("made_with") or [None] * len(stored.encoders)
        for j, key in enumerate(made):
            if key_text(key) not in keys:
                foreign.append(f"vectors made with {settings_text(key)}" + ("" if source == path else
                                                                      f" (in {parts_dir(path).name}/)"))
                continue
            m = keys.index(key_text(key))
            for row, i in enumerate(stored.ids):
                if i not in identities:
                    others[m][i] = (source, j, row)
                    if source == path:
                        in_file.add(i)
                elif identities[i] and stored.identities.get(i) == identities[i]:
                    reuse[m][i] = (source, j, row)
                else:
                    changed.add(i)
    lost = ""
    if foreign:
        lost = (f"{' and '.join(dict.fromkeys(foreign))} (this run embeds with "
                f"{'; '.join(settings_text(k) for k in options.made_with())})")
    # Vectors of images outside the run that lack one of its encoders wait in <path>.parts/ for a run with every
    # encoder. That is right for a run cut short (they were there already), not for a finished file: an ensemble
    # trial with --limit would empty it into the chunks.
    stranded = sorted(in_file - set.intersection(*(set(o) for o in others)), key=id_sort_key) if others else []
    lacking = [spec for (spec, _), found in zip(options.choices(), others, strict=True)
               if any(i not in found for i in stranded)]
    text = (f"vectors of {len(stranded)} other images without this run's encoder {', '.join(lacking)} (first: "
            f"{', '.join(stranded[:3])})") if stranded else ""
    kept_everywhere = set.intersection(*(set(r) for r in reuse)) if reuse else set()
    return Plan(identities, reuse, others, changed - kept_everywhere, lost, other_failed, text)


@dataclass(frozen=True)
class Embedded:
    """What ensure_embeddings made, and how."""
    embeddings: Embeddings  # the run's images, in its order (those that could not be read in `failed`)
    reused: int  # images whose vectors were all kept
    embedded: int  # images embedded now by one encoder or more (failures left out: see embeddings.failed)
    changed: int  # of those, images whose file changed since their vector was made
    seconds: float  # spent embedding (loading the encoders left out)


def ensure_embeddings(items: list[tuple[str, str]], path: str | Path, options: EmbedOptions,
                      encoder: Encoder | None = None, locked: bool = False) -> Embedded:
    """The vectors of (ID, path) images by every encoder of `options`, kept at `path`: what is stored there and
    still right is reused (plan_embeddings), the rest is embedded in chunks of `chunk_size` saved under
    `<path>.parts/` as they complete (a killed run redoes at most one), then the file is written whole with the
    vectors and failures it held of other images, this run's failures listed in `<path stem>.errors.csv`. Vectors
    of other images that lack one of this run's encoders (a two-encoder run cut short, then a --limit trial) stay in
    `<path>.parts/` for a later run; those of the finished file are refused instead (Plan.check). A lock on `path`
    is held throughout; `locked`: the caller holds it already (a run that takes it before loading its model).
    `encoder`: LLaVA's tower already loaded (a generate run's), for 'llava'.
    """
    check_embed_options(options)
    path = Path(path)
    with nullcontext() if locked else files.lock_exclusive(path, "give this run another --embeddings"):
        plan = plan_embeddings(items, path, options)
        plan.check(path)
        parts = parts_dir(path)
        if options.overwrite:
            path.unlink(missing_ok=True)
            shutil.rmtree(parts, ignore_errors=True)
        keys = options.made_with()
        vectors, others, described, others_identity, recorded = read_places(plan, path, len(keys))
        choices = options.choices()
        model_files = [source_files(spec, options.base_model_path) for spec, _ in choices]
        failed: dict[str, str] = {}
        embedded_by: list[set[str]] = [set() for _ in choices]  # per encoder: the run's images it embedded now
        seconds = 0.0
        for m, (spec, pooling) in enumerate(choices):
            todo = [(i, p) for i, p in items if i not in vectors[m] and i not in failed]
            # New files in the model's folder since its vectors were made: load it once to see whether it is
            # another model (a run that only reuses would never notice, and an index fitted anew refuses them).
            verify = described[m] is not None and model_files[m] is not None and recorded[m] != model_files[m]
            if not todo and not verify:
                continue
            name = f"encoder {m + 1}/{len(choices)} ({spec}): " if len(choices) > 1 else ""
            reuse = encoder is not None and spec == "llava" and encoder.pooling == pooling
            loaded = encoder if reuse else load_encoder(spec, pooling, options.device, options.dtype,
                                                        options.base_model_path)
            made = loaded.describe()
            if described[m] is not None and not same_encoder(described[m], made):
                # the same settings, another model (e.g. new weights in the same folder): nothing of it is kept
                log(f"{name}the encoder differs from the one the stored vectors were made with "
                    f"({differences(described[m], made)}): embedding every image again")
                vectors[m], others[m] = {}, {}
                todo = [(i, p) for i, p in items if i not in failed]
            described[m] = made
            if todo:
                manifest = {"made_with": keys, "images": len(items)}
                chunk_meta = {"made_with": [keys[m]], "model_files": [model_files[m]]}
                new, new_failed, took = embed_chunks(loaded, todo, parts, chunk_meta, plan.identities, manifest,
                                                     options, name)
                vectors[m].update(new)
                failed.update(new_failed)
                embedded_by[m].update(new)
                seconds += took
            if not reuse:
                del loaded
                free_memory()
        ids = [i for i, _ in items if i not in failed and all(i in v for v in vectors)]
        complete = [i for i in others[0] if all(i in o for o in others)] if others else []
        incomplete = sorted({i for o in others for i in o} - set(complete), key=id_sort_key)
        # Natural ID order: the file's rows do not depend on which selection (ID list, --limit) wrote it last.
        rows = sorted(ids + complete, key=id_sort_key)
        run_vectors = [{**others[m], **vectors[m]} for m in range(len(keys))]
        matrices = [np.stack([run_vectors[m][i] for i in rows]) if rows else
                    np.zeros((0, (described[m] or {}).get("dim", 0)), np.float32) for m in range(len(keys))]
        identities = {**{i: others_identity[i] for i in complete}, **{i: plan.identities[i] for i in ids}}
        meta = {"made_with": keys, "model_files": model_files}
        descriptions = [d or {} for d in described]
        stored_failed = {**{i: e for i, e in plan.other_failed.items() if i not in identities}, **failed}
        save_embeddings(path, Embeddings(rows, matrices, descriptions, stored_failed, meta, identities))
        errors_csv = files.write_errors(path, list(failed.items()))
        if errors_csv:
            log(f"{len(failed)} images could not be embedded (listed in {errors_csv})")
        keep_incomplete(parts, incomplete, others, descriptions, meta, others_identity)
    embedded = set().union(*embedded_by) - set(failed)
    reused = len(items) - len(embedded) - len(failed)
    changed = len(plan.changed & embedded)
    per_encoder = ""
    if len(choices) > 1:
        done = set(ids)
        per_encoder = "; by encoder: " + ", ".join(f"{spec} {len(done - embedded_by[m])} reused, "
                                                   f"{len(done & embedded_by[m])} embedded"
                                                   for m, (spec, _) in enumerate(choices))
    log(f"{path}: {reused} images reused, {len(embedded)} embedded" + (f", {len(failed)} failed" if failed else "")
        + (f" ({changed} changed since)" if changed else "") + per_encoder
        + (f"; kept {len(complete)} other images" if complete else ""))
    if incomplete:
        log(f"{len(incomplete)} other images lack one of this run's encoders: their vectors are kept in {parts}/ "
            f"for a run that embeds them with every encoder (first: {', '.join(incomplete[:3])})")
    position = {i: n for n, i in enumerate(rows)}
    mine = Embeddings(ids, [v[[position[i] for i in ids]] for v in matrices], descriptions, failed, meta,
                      {i: plan.identities[i] for i in ids})
    return Embedded(mine, reused, len(embedded), changed, seconds)


def keep_incomplete(parts: Path, incomplete: list[str], others: list[dict], descriptions: list[dict], meta: dict,
                    identities: dict[str, list[int]]) -> None:
    """Replace the chunks under `parts` (now in the file) by one chunk per encoder holding the vectors of the images
    outside the run that the file cannot take (they lack one of its encoders), or remove `parts` when there are none.
    The new chunks are written before the old ones are removed, so a kill in between loses nothing."""
    if not incomplete:
        shutil.rmtree(parts, ignore_errors=True)
        return
    old = sorted(parts.glob("*.npz"))
    first = next_chunk(parts)
    for m, found in enumerate(others):
        have = [i for i in incomplete if i in found]
        if have:
            chunk_meta = {"made_with": [meta["made_with"][m]], "model_files": [meta["model_files"][m]]}
            save_embeddings(parts / f"chunk-{first + m:06d}.npz",
                            Embeddings(have, [np.stack([found[i] for i in have])], [descriptions[m]], {}, chunk_meta,
                                       {i: identities[i] for i in have}))
    for chunk in old:
        chunk.unlink(missing_ok=True)


def read_places(plan: Plan, path: Path, encoders: int
                ) -> tuple[list[dict], list[dict], list[dict | None], dict, list[list | None]]:
    """The vectors the plan keeps, read once per file: per encoder the run's images' and the other images',
    each encoder's description and the identity of its model's files when it was made (None if not recorded),
    and the other images' recorded identities. Of vectors with the same settings made by different models (new
    weights in the same folder, the run that noticed it cut short), those of the newest file are kept, the
    others embedded again."""
    sources = {place[0] for found in (*plan.reuse, *plan.others) for place in found.values()}
    stored = {source: load_embeddings(source) for source in sources}
    order = {source: n for n, source in enumerate(stored_files(path))}
    described: list[dict | None] = [None] * encoders
    model_files: list[list | None] = [None] * encoders
    identities: dict[str, list[int]] = {}
    for m in range(encoders):
        places = [*plan.reuse[m].values(), *plan.others[m].values()]
        if places:
            source, j, _ = max(places, key=lambda place: order[place[0]])
            described[m] = stored[source].encoders[j]
            model_files[m] = (stored[source].meta.get("model_files") or [None] * (j + 1))[j]

    def read(found: dict[str, Place], m: int) -> dict:
        return {i: stored[source].vectors[j][row] for i, (source, j, row) in found.items()
                if same_encoder(stored[source].encoders[j], described[m])}

    vectors = [read(found, m) for m, found in enumerate(plan.reuse)]
    others = [read(found, m) for m, found in enumerate(plan.others)]
    for found in plan.others:
        for i, (source, _, _) in found.items():
            identities[i] = stored[source].identities.get(i, NO_IDENTITY)
    return vectors, others, described, identities, model_files


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


def embed_chunks(encoder: Encoder, todo: list[tuple[str, str]], parts: Path, chunk_meta: dict,
                 identities: dict[str, list[int]], manifest: dict, options: EmbedOptions, name: str
                 ) -> tuple[dict[str, np.ndarray], dict[str, str], float]:
    """Embed `todo` in chunks, each saved under `parts` as it completes with its images' file identities (taken
    before the images are read, so a file changed meanwhile shows as changed next time); returns the vectors,
    the failures and the seconds it took."""
    cuda = getattr(encoder.device, "type", "cpu") == "cuda"
    workers = options.num_workers
    if workers is None:
        # Decoding and resizing a JPEG costs a CPU core several milliseconds; a GPU embeds a ViT-B batch in far
        # less, so with a GPU every core but one decodes.
        workers = min(16, max(0, (os.cpu_count() or 1) - 1)) if cuda else 0
    batch_size = options.batch_size or (GPU_BATCH if cuda else CPU_BATCH)
    first = next_chunk(parts)
    chunks = [todo[start:start + options.chunk_size] for start in range(0, len(todo), options.chunk_size)]
    vectors: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {}
    start, count = time.perf_counter(), 0
    for n, chunk in enumerate(chunks):
        part = embed_items(encoder, chunk, batch_size, workers)
        if not (parts / "manifest.json").exists():  # what the chunks are of, written with the first of them
            files.write_text_atomic(parts / "manifest.json", json.dumps(manifest, indent=1))
        save_embeddings(parts / f"chunk-{first + n:06d}.npz",
                        Embeddings(part.ids, part.vectors, part.encoders, part.failed, chunk_meta,
                                   {i: identities[i] for i in part.ids}))
        vectors.update(zip(part.ids, part.vectors[0], strict=True))
        failed.update(part.failed)
        count += len(chunk)
        seconds = time.perf_counter() - start
        log(f"{name}chunk {n + 1}/{len(chunks)}: {count} images in {seconds:.1f} s "
            f"({count / max(seconds, 1e-9):.1f} images/s)")
    return vectors, failed, time.perf_counter() - start


def next_chunk(parts: Path) -> int:
    """The number of the next chunk file: after those a run cut short left (their vectors are still to be kept)."""
    numbers = [int(p.stem.removeprefix("chunk-")) for p in parts.glob("chunk-*.npz")
               if p.stem.removeprefix("chunk-").isdigit()]
    return max(numbers, default=-1) + 1


def free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_has_ids(emb: Embeddings, ids: list[str], where: Path, what: str, remedy: str) -> None:
    """Every ID has a vector or a recorded failure in `emb` (read from `where`), or one line saying what to do."""
    known = set(emb.ids) | set(emb.failed)
    missing = [i for i in ids if i not in known]
    if missing:
        raise UserError(f"{len(missing)} {what} are not in {where} (first: {', '.join(missing[:3])}): {remedy}")
