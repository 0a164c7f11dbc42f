"""Concept detection from image embeddings: what LLaVA's vision tower sees, turned into CUIs.

One pass of the vision tower (no text generation) gives one vector per image. Two methods score
CUIs from those vectors: the nearest training images (kNN, exact cosine search) and a linear probe
trained on the training vectors. Their scores, and the CUIs the model's generated text maps to, are
combined with weights and thresholds tuned on the validation split against the official primary F1
(scores.image_f1 / concept_scores). This is what the 2025 winner did with CNN features:
retrieval, per-label thresholds, ensembles.

    train = embed_images(list_images("train/"), "train.npz", EmbedOptions())      # the GPU part
    index = fit_index(train, read_cui_sets("train_concepts.csv"), "index/")
    settings, table = tune(index, load_embeddings("valid.npz"), read_concept_csv("valid_concepts.csv"),
                           generated=read_cui_sets("valid_generated.csv"))
    cuis = predict_concepts(index, settings["methods"]["fused"], load_embeddings("test.npz"), generated)

The score of CUI c for an image is
    knn * (weighted share of its k nearest training images that carry c)
  + probe * (probe probability of c)
  + generated * (1 if the generated text mapped to c)
and c is kept if the score reaches its threshold (one per CUI where validation support allows,
else the global one); with `keep_top` an image whose scores pass no threshold keeps its best CUI.
Union (generated weight 1, vision threshold) and intersection (weight 1, threshold 1 + vision
threshold) of vision and generated concepts are corners of this weighted vote.

Only embedding needs the GPU; fitting, tuning and prediction run on a CPU in minutes.
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

from . import files, scores
from .errors import UserError, first_line, log
from .images import Collate, ImageDataset, id_sort_key, ignore_stop_signals
from .model import DEFAULT_BASE_MODEL
from .submission import MAX_CONCEPTS, concept_pairs, read_rows

EMBEDDINGS_FORMAT = "jj-vmed-embeddings/1"
INDEX_FORMAT = "jj-vmed-concept-index/1"
SETTINGS_FORMAT = "jj-vmed-concept-settings/1"
POOLINGS = ("mean", "cls")
METHODS = ("knn", "probe", "fused")

# The tuning grids. kNN: neighbours, and how much closer neighbours count (0: all the same; else
# softmax of cosine / temperature: CLIP cosines of neighbours sit within a few hundredths).
K_GRID = (1, 2, 3, 5, 10, 20, 30, 50, 100)
TEMPERATURES = (0.0, 0.1, 0.03, 0.01)
BLEND_GRID = (0.25, 0.5, 0.75)  # kNN's share when kNN and probe are blended
GENERATED_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # weight of a generated CUI
THRESHOLDS = np.round(np.arange(1, 200) * 0.01, 2)  # 0.01 .. 1.99: fused scores reach 2
MIN_SUPPORT = 5  # validation images that must carry a CUI before it gets its own threshold
ROWS_PER_CHUNK = 2048  # images scored at once: bounds the dense (images x CUIs) block in memory


# ---------------------------------------------------------------------------------------------
# Embeddings: one vector per image, saved with the IDs
# ---------------------------------------------------------------------------------------------


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


@dataclass
class VisionEncoder:
    """LLaVA's vision tower alone, with what it needs to give the features the projector gets."""
    tower: object
    image_processor: object
    feature_layer: int  # -2 for LLaVA-LLaMA-3-8B
    drop_cls: bool  # vision_feature_select_strategy "default" feeds only the patch tokens
    device: object

    def describe(self) -> dict:
        return {"feature_layer": self.feature_layer, "dtype": str(next(self.tower.parameters()).dtype)}


def vision_encoder_from(model, processor) -> VisionEncoder:
    """The vision tower of a loaded LLaVA (also one wrapped by PEFT).

    The JJ-VMed LoRA (finetune.LORA_TARGETS, the published adapter's recipe) targets the language
    model's projections and the projector's two layers, never the vision tower: the features are
    the same with or without the adapter, so embedding needs only the base model. An adapter that
    does reach the tower would make features that no longer match an index built without it.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    tower = base.model.vision_tower
    if any("lora_" in name for name, _ in tower.named_modules()):
        raise UserError("this adapter changes the vision tower, so its image features would not match a concept "
                        "index built from the base model; embed with the base model")
    device = next(p.device for p in tower.parameters())
    return VisionEncoder(tower, processor.image_processor, int(config.vision_feature_layer),
                         config.vision_feature_select_strategy == "default", device)


def load_vision_encoder(base_model_path: str, device: str = "auto", dtype: str = "auto") -> VisionEncoder:
    """Load the base model (model.load_base_model) and keep only its vision tower (no adapter needed)."""
    import torch

    from .model import load_base_model, load_processor, resolve_device_and_dtype

    device_map, torch_dtype = resolve_device_and_dtype(device, dtype)
    target = device_map.get("") if isinstance(device_map, dict) else f"cuda:{torch.cuda.current_device()}"
    # Only the tower (0.3 B parameters) goes to the GPU; the language model (16 GB for the 8B one) is
    # read into host memory and freed at once, so a small card is enough.
    device_map = {"model.vision_tower": target, "model.multi_modal_projector": "cpu", "model.language_model": "cpu",
                  "lm_head": "cpu"}
    processor = load_processor(base_model_path)
    model = load_base_model(base_model_path, device_map, torch_dtype, load_in_4bit=False)
    encoder = vision_encoder_from(model, processor)
    encoder.tower.eval()
    del model
    return encoder


def pooled_features(encoder: VisionEncoder, pixel_values, pooling: str):
    """(batch, hidden) float32, L2-normalised: the projector's input tokens, pooled to one vector."""
    import torch

    dtype = next(encoder.tower.parameters()).dtype
    with torch.inference_mode():
        out = encoder.tower(pixel_values.to(encoder.device, dtype), output_hidden_states=True)
        hidden = out.hidden_states[encoder.feature_layer].float()
        if pooling == "cls":
            vectors = hidden[:, 0]
        else:
            vectors = (hidden[:, 1:] if encoder.drop_cls else hidden).mean(dim=1)
        return torch.nn.functional.normalize(vectors, dim=-1).cpu()


class PixelCollate(Collate):
    """Images -> pixel values only (no prompt) in the DataLoader workers; a bad image fails alone."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def process(self, images: list) -> dict:
        return {"pixel_values": self.image_processor(images=images, return_tensors="pt")["pixel_values"]}


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


# ---------------------------------------------------------------------------------------------
# Concept files
# ---------------------------------------------------------------------------------------------


def read_concept_csv(path: str | Path) -> dict[str, tuple[str, ...]]:
    """ID -> concepts exactly as the official reader builds them (for ground truth)."""
    pairs = concept_pairs(read_rows(path))
    if not pairs:
        raise UserError(f"{path} has no ID,CUIs rows")
    return pairs


def read_cui_sets(path: str | Path) -> dict[str, list[str]]:
    """ID -> upper-cased CUIs without empty items or repeats (training labels, generated concepts)."""
    return {i: list(dict.fromkeys(c.strip().upper() for c in cuis if c.strip()))
            for i, cuis in read_concept_csv(path).items()}


# ---------------------------------------------------------------------------------------------
# The index: training vectors with their CUIs (for kNN) and the probe
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """Standardise, then a linear layer (or one hidden GELU layer); sigmoid gives one probability per CUI."""
    tensors: dict[str, np.ndarray]  # mean, std, w1, b1[, w2, b2]
    info: dict

    def predict(self, vectors: np.ndarray, device: str = "cpu", batch: int = 8192) -> np.ndarray:
        import torch

        t = {k: torch.from_numpy(v).to(device) for k, v in self.tensors.items()}
        out = []
        with torch.inference_mode():
            for start in range(0, len(vectors), batch):
                x = (torch.from_numpy(vectors[start:start + batch]).to(device) - t["mean"]) / t["std"]
                out.append(torch.sigmoid(probe_logits(t, x)).cpu().numpy())
        width = len(self.tensors["b2" if "w2" in self.tensors else "b1"])
        return np.concatenate(out) if out else np.zeros((0, width), np.float32)


def probe_logits(t: dict, x):
    import torch

    h = x @ t["w1"].T + t["b1"]
    if "w2" in t:
        h = torch.nn.functional.gelu(h) @ t["w2"].T + t["b2"]
    return h


@dataclass(frozen=True)
class ConceptIndex:
    cuis: list[str]  # the label space: every CUI of the training images
    ids: list[str]  # training images
    vectors: np.ndarray  # (images, dim) float32, L2-normalised
    label_ptr: np.ndarray  # CSR: image i carries cuis[label_idx[label_ptr[i]:label_ptr[i + 1]]]
    label_idx: np.ndarray
    probe: Probe | None
    meta: dict

    def label_matrix(self):
        from scipy.sparse import csr_matrix

        data = np.ones(len(self.label_idx), np.float32)
        return csr_matrix((data, self.label_idx, self.label_ptr), shape=(len(self.ids), len(self.cuis)))


@dataclass(frozen=True)
class ProbeOptions:
    hidden: int = 0  # 0: linear
    epochs: int = 10  # passes over the training vectors at most; 0: no probe
    batch_size: int = 2048
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    tolerance: float = 0.02  # stop when a pass lowers the mean training loss by less than this share
    seed: int = 0
    device: str = "auto"


# A pass is at least this many steps, so a small training set still gets enough updates between checks.
MIN_STEPS_PER_PASS = 50


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA GPU")
    return device


def train_probe(vectors: np.ndarray, labels, options: ProbeOptions) -> Probe:
    """Multi-label BCE on the training vectors (labels: scipy csr, images x CUIs): AdamW over shuffled
    batches, in passes over the data, until a pass lowers the mean training loss by less than
    `tolerance` of it (or after `epochs` passes).

    The output biases start at each CUI's log-odds in the training set. From zero (probability 0.5
    for all ~2,000 CUIs) the optimiser spent most of its steps just pushing the rare CUIs down; from
    the prior, one pass at batch 2048 reaches about the F1 that 3,000 steps of 512 reached before.
    """
    import math

    import torch

    device = resolve_device(options.device)
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    x_all = torch.from_numpy(vectors).to(device)
    mean = x_all.mean(0)
    std = x_all.std(0) + 1e-6  # a few CLIP dimensions dominate; standardising lets each count
    dim, n_cuis = vectors.shape[1], labels.shape[1]
    if options.hidden:
        net = torch.nn.Sequential(torch.nn.Linear(dim, options.hidden), torch.nn.GELU(),
                                  torch.nn.Linear(options.hidden, n_cuis))
    else:
        net = torch.nn.Sequential(torch.nn.Linear(dim, n_cuis))
    share = np.asarray(labels.sum(0), np.float64).ravel() / len(vectors)
    share = np.clip(share, 0.5 / len(vectors), 1 - 0.5 / len(vectors))
    with torch.no_grad():
        net[-1].bias.copy_(torch.from_numpy(np.log(share / (1 - share)).astype(np.float32)))
    net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=options.learning_rate, weight_decay=options.weight_decay)
    batch = min(options.batch_size, len(vectors))
    steps_per_pass = max(math.ceil(len(vectors) / batch), MIN_STEPS_PER_PASS)
    order = rng.permutation(len(vectors))
    position = 0
    losses: list[float] = []
    for _ in range(options.epochs):
        total = torch.zeros((), device=device)
        for _ in range(steps_per_pass):
            if position + batch > len(order):
                order, position = rng.permutation(len(vectors)), 0
            rows = order[position:position + batch]
            position += batch
            target = torch.from_numpy(labels[rows].toarray()).to(device)
            x = (x_all[torch.from_numpy(rows).to(device)] - mean) / std
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
        losses.append(float(total) / steps_per_pass)
        if len(losses) > 1 and losses[-2] - losses[-1] < options.tolerance * losses[-2]:
            break
    layers = [m for m in net if isinstance(m, torch.nn.Linear)]
    tensors = {"mean": mean, "std": std, "w1": layers[0].weight, "b1": layers[0].bias}
    if len(layers) == 2:
        tensors |= {"w2": layers[1].weight, "b2": layers[1].bias}
    info = {"hidden": options.hidden, "passes": len(losses), "steps": len(losses) * steps_per_pass,
            "batch_size": batch, "learning_rate": options.learning_rate, "weight_decay": options.weight_decay,
            "tolerance": options.tolerance, "losses": [round(x, 6) for x in losses],
            "final_loss": losses[-1] if losses else float("nan"), "dim": dim}
    return Probe({k: v.detach().float().cpu().contiguous().numpy() for k, v in tensors.items()}, info)


def fit_index(train: Embeddings, concepts: dict[str, list[str]], output_dir: str | Path,
              probe_options: ProbeOptions | None = ProbeOptions()) -> ConceptIndex:
    """Index the training vectors with their CUIs and train the probe; save both in output_dir."""
    keep = [n for n, i in enumerate(train.ids) if i in concepts]
    missing_concepts = len(train.ids) - len(keep)
    missing_images = len(set(concepts) - set(train.ids))
    if not keep:
        raise UserError("no training image has a row in the concepts file (do the IDs match?)")
    ids = [train.ids[n] for n in keep]
    cuis = sorted({c for i in ids for c in concepts[i]})
    if not cuis:
        raise UserError("the training concepts name no CUI")
    column = {c: n for n, c in enumerate(cuis)}
    label_idx = np.array([column[c] for i in ids for c in concepts[i]], np.int64)
    label_ptr = np.concatenate([[0], np.cumsum([len(concepts[i]) for i in ids])]).astype(np.int64)
    vectors = np.ascontiguousarray(train.vectors[keep])
    index = ConceptIndex(cuis, ids, vectors, label_ptr, label_idx, None, {})
    probe = None
    if probe_options and probe_options.epochs > 0:
        import time

        start = time.perf_counter()
        probe = train_probe(vectors, index.label_matrix(), probe_options)
        log(f"probe: {probe.info['passes']} passes ({probe.info['steps']} steps of {probe.info['batch_size']}) in "
            f"{time.perf_counter() - start:.1f} s, training loss per pass: "
            + ", ".join(f"{x:.5f}" for x in probe.info["losses"]))
    meta = {"images": len(ids), "cuis": len(cuis), "dim": int(vectors.shape[1]),
            "images_without_concepts_row": missing_concepts, "concept_rows_without_image": missing_images,
            "embeddings": {k: v for k, v in train.meta.items() if k != "settings"},
            "fingerprint": fingerprint(ids, cuis, label_idx, probe)}
    index = replace(index, probe=probe, meta=meta)
    save_index(index, output_dir)
    if missing_concepts or missing_images:
        log(f"left out: {missing_concepts} embedded images without a concepts row, {missing_images} concept rows "
            "without an embedded image")
    return index


def fingerprint(ids: list[str], cuis: list[str], label_idx: np.ndarray, probe: Probe | None) -> str:
    """Which fit this is: settings tuned on one index are refused with another (a refit changes the probe)."""
    h = hashlib.sha256("\n".join(ids).encode() + b"\0" + "\n".join(cuis).encode() + label_idx.tobytes())
    for name, tensor in sorted((probe.tensors if probe else {}).items()):
        h.update(name.encode() + np.ascontiguousarray(tensor).tobytes())
    return h.hexdigest()[:16]


def save_index(index: ConceptIndex, output_dir: str | Path) -> Path:
    from safetensors.numpy import save

    out = Path(output_dir)
    buffer = io.BytesIO()
    np.savez(buffer, format=np.array(INDEX_FORMAT), ids=np.array(index.ids, dtype=str),
             cuis=np.array(index.cuis, dtype=str), vectors=index.vectors, label_ptr=index.label_ptr,
             label_idx=index.label_idx, meta=np.array(json.dumps(index.meta)))
    files.write_bytes_atomic(out / "index.npz", buffer.getvalue())
    if index.probe is not None:
        files.write_bytes_atomic(out / "probe.safetensors", save(index.probe.tensors))
        files.write_text_atomic(out / "probe.json", json.dumps({**index.probe.info, "cuis": index.cuis}, indent=1))
    else:
        (out / "probe.safetensors").unlink(missing_ok=True)
        (out / "probe.json").unlink(missing_ok=True)
    return out


def load_index(index_dir: str | Path) -> ConceptIndex:
    from safetensors.numpy import load_file

    folder = Path(index_dir)
    path = folder / "index.npz"
    if not path.is_file():
        raise UserError(f"no index.npz in {folder} (make it with: concept_index.py fit)")
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["format"]) != INDEX_FORMAT:
                raise ValueError(f"format {data['format']}")
            cuis = data["cuis"].tolist()
            ids = data["ids"].tolist()
            vectors = data["vectors"].reshape(len(ids), -1)
            label_ptr, label_idx = data["label_ptr"], data["label_idx"]
            meta = json.loads(str(data["meta"]))
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"{path} is not a concept index written by concept_index.py fit ({e})") from None
    probe = None
    if (folder / "probe.safetensors").is_file():
        info = json.loads((folder / "probe.json").read_text())
        if info.pop("cuis") != cuis:
            raise UserError(f"{folder}/probe.json lists other CUIs than index.npz; fit the index again")
        probe = Probe(load_file(folder / "probe.safetensors"), info)
    return ConceptIndex(cuis, ids, vectors, label_ptr, label_idx, probe, meta)


# ---------------------------------------------------------------------------------------------
# Scores: nearest neighbours, probe, generated CUIs
# ---------------------------------------------------------------------------------------------


def nearest(keys: np.ndarray, queries: np.ndarray, k: int, device: str = "cpu",
            chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(cosine similarities, key rows) of the k nearest keys per query, nearest first: exact search,
    chunked matrix products (rows are L2-normalised, so the dot product is the cosine)."""
    import torch

    k = min(k, len(keys))
    sims = np.zeros((len(queries), k), np.float32)
    rows = np.zeros((len(queries), k), np.int64)
    if not len(queries) or not k:
        return sims, rows
    key_t = torch.from_numpy(np.ascontiguousarray(keys)).to(device)
    for start in range(0, len(queries), chunk):
        q = torch.from_numpy(np.ascontiguousarray(queries[start:start + chunk])).to(device)
        top = torch.topk(q @ key_t.T, k, dim=1)
        sims[start:start + len(q)] = top.values.cpu().numpy()
        rows[start:start + len(q)] = top.indices.cpu().numpy()
    return sims, rows


def check_compatible(index: ConceptIndex, emb: Embeddings) -> None:
    """Query vectors must be made like the index's: same size, pooling and layer (the model path may differ)."""
    made = index.meta.get("embeddings", {})
    if emb.vectors.size and emb.vectors.shape[1] != index.vectors.shape[1]:
        raise UserError(f"the embeddings have {emb.vectors.shape[1]} dimensions, the index {index.vectors.shape[1]}: "
                        "made with another model?")
    for key in ("pooling", "feature_layer"):
        if key in made and key in emb.meta and made[key] != emb.meta[key]:
            raise UserError(f"the embeddings were made with {key} {emb.meta[key]!r}, the index with {made[key]!r}; "
                            "embed them the same way")


@dataclass(frozen=True)
class ImageScores:
    """What each method says about a set of images, before weights and thresholds."""
    ids: list[str]
    space: list[str]  # score columns: the index's CUIs, then generated CUIs the index does not know
    embedded: np.ndarray  # (n,) bool: images with a vector (the others have only generated CUIs)
    sims: np.ndarray  # (n, K) cosine of the nearest training images, nearest first
    neighbours: np.ndarray  # (n, K) their index rows
    probe: np.ndarray | None  # (n, index CUIs) probabilities
    generated: object | None  # scipy csr (n, space) of 0/1, or None
    labels: object  # scipy csr (training images, index CUIs)


def image_scores(index: ConceptIndex, emb: Embeddings, ids: list[str], generated: dict[str, list[str]] | None,
                 max_k: int = max(K_GRID), device: str = "cpu") -> ImageScores:
    """Neighbours, probe probabilities and generated CUIs for `ids` (embedded or not)."""
    from scipy.sparse import csr_matrix

    check_compatible(index, emb)
    position = {i: n for n, i in enumerate(emb.ids)}
    embedded = np.array([i in position for i in ids], bool)
    dim = index.vectors.shape[1]
    queries = np.zeros((len(ids), dim), np.float32)
    if embedded.any():
        queries[embedded] = emb.vectors[[position[i] for i, e in zip(ids, embedded, strict=True) if e]]
    sims, neighbours = nearest(index.vectors, queries, max_k, device)
    probe = index.probe.predict(queries, device) if index.probe is not None else None
    if probe is not None:
        probe[~embedded] = 0.0
    space = list(index.cuis)
    gen = None
    if generated is not None:
        per_image = [list(dict.fromkeys(c.strip().upper() for c in generated.get(i, []) if c.strip())) for i in ids]
        known = set(space)
        space += sorted({c for row in per_image for c in row if c not in known})
        column = {c: n for n, c in enumerate(space)}
        cols = [[column[c] for c in row] for row in per_image]
        ptr = np.concatenate([[0], np.cumsum([len(c) for c in cols])]).astype(np.int64)
        flat = np.array([c for row in cols for c in row], np.int64)
        gen = csr_matrix((np.ones(len(flat), np.float32), flat, ptr), shape=(len(ids), len(space)))
    return ImageScores(ids, space, embedded, sims, neighbours, probe, gen, index.label_matrix())


@dataclass(frozen=True)
class Fusion:
    """Weights of the three sources and the kNN neighbourhood."""
    knn: float = 0.0
    probe: float = 0.0
    generated: float = 0.0
    k: int = 30
    temperature: float = 0.0  # 0: every neighbour counts the same; else softmax(cosine / temperature)


def dense_scores(s: ImageScores, fusion: Fusion, rows: slice) -> np.ndarray:
    """(rows, space) fused scores of a block of images."""
    from scipy.sparse import csr_matrix

    n = len(s.ids[rows])
    n_index = s.labels.shape[1]
    out = np.zeros((n, len(s.space)), np.float32)
    if fusion.knn and s.sims.shape[1]:
        k = min(fusion.k, s.sims.shape[1])
        sims, nb = s.sims[rows, :k], s.neighbours[rows, :k]
        if fusion.temperature > 0:
            weights = np.exp((sims - sims[:, :1]) / fusion.temperature)
        else:
            weights = np.ones_like(sims)
        weights = weights / weights.sum(1, keepdims=True) * s.embedded[rows, None]
        w = csr_matrix((weights.ravel(), nb.ravel(), np.arange(0, n * k + 1, k)), shape=(n, s.labels.shape[0]))
        out[:, :n_index] += fusion.knn * (w @ s.labels).toarray()
    if fusion.probe and s.probe is not None:
        out[:, :n_index] += fusion.probe * s.probe[rows]
    if fusion.generated and s.generated is not None:
        out += fusion.generated * s.generated[rows].toarray()
    return out


@dataclass(frozen=True)
class Ranked:
    """The best `MAX_CONCEPTS` CUIs of every image by fused score, best first (column -1 / score 0 pads)."""
    cols: np.ndarray  # (n, M) int64 columns of ImageScores.space
    scores: np.ndarray  # (n, M) float32


def ranked(s: ImageScores, fusion: Fusion) -> Ranked:
    m = min(MAX_CONCEPTS, len(s.space))
    cols = np.full((len(s.ids), m), -1, np.int64)
    scores = np.zeros((len(s.ids), m), np.float32)
    for start in range(0, len(s.ids), ROWS_PER_CHUNK):
        block = dense_scores(s, fusion, slice(start, start + ROWS_PER_CHUNK))
        top = np.argpartition(-block, m - 1, axis=1)[:, :m] if m < block.shape[1] else \
            np.tile(np.arange(block.shape[1]), (len(block), 1))
        values = np.take_along_axis(block, top, 1)
        order = np.lexsort((top, -values), axis=-1)  # best first; ties by column, so results are reproducible
        top, values = np.take_along_axis(top, order, 1), np.take_along_axis(values, order, 1)
        top[values <= 0] = -1
        cols[start:start + len(block)], scores[start:start + len(block)] = top, np.maximum(values, 0)
    return Ranked(cols, scores)


# ---------------------------------------------------------------------------------------------
# Thresholds and the official F1
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Truth:
    """Ground truth of the scored images, laid over a Ranked: what the fast F1 needs."""
    hits: np.ndarray  # (n, M) bool: the ranked CUI is in the image's ground truth
    sizes: np.ndarray  # (n,) size of the ground-truth set (as the evaluator builds it, '' included)
    empty_hit: np.ndarray  # (n,) bool: '' is in the ground truth, so an empty prediction ('ID,') scores


def truth_for(r: Ranked, s: ImageScores, gt: dict[str, tuple[str, ...]]) -> Truth:
    column = {c: n for n, c in enumerate(s.space)}
    width = len(s.space) + 1
    codes = [n * width + column[c] for n, i in enumerate(s.ids) for c in {x.upper() for x in gt[i]} if c in column]
    hits = np.isin(np.arange(len(s.ids))[:, None] * width + r.cols, np.array(codes, np.int64)) & (r.cols >= 0)
    sizes = np.array([len({x.upper() for x in gt[i]}) for i in s.ids], np.int64)
    return Truth(hits, sizes, np.array(["" in gt[i] for i in s.ids], bool))


def f1_per_image(r: Ranked, t: Truth, thresholds, keep_top: bool) -> np.ndarray:
    """scores.image_f1 of every image for a threshold per ranked position (or one for all): exact,
    vectorised. An image with no CUI is written as 'ID,', which the official reader takes as ('',)."""
    chosen = (r.scores >= thresholds) & (r.cols >= 0)
    return f1_from_counts(chosen.sum(1), (chosen & t.hits).sum(1), r, t, keep_top)


def f1_from_counts(n_pred: np.ndarray, tp: np.ndarray, r: Ranked, t: Truth, keep_top: bool,
                   rows: np.ndarray | slice = slice(None)) -> np.ndarray:
    n_pred, tp = n_pred.copy(), tp.copy()
    none = n_pred == 0
    if keep_top:
        top = none & (r.cols[rows, 0] >= 0)
        n_pred[top], tp[top] = 1, t.hits[rows, 0][top]
        none = none & ~top
    n_pred[none], tp[none] = 1, t.empty_hit[rows][none]
    return 2 * tp / (t.sizes[rows] + n_pred)


def best_global_threshold(r: Ranked, t: Truth) -> tuple[float, bool, float]:
    """(threshold, keep_top, mean F1) maximising the mean F1 with one threshold for all CUIs, over THRESHOLDS."""
    if not len(r.cols):
        return float(THRESHOLDS[0]), False, 0.0
    n_rows, n_t = len(r.cols), len(THRESHOLDS)
    # How many thresholds each score reaches (score >= THRESHOLDS[j] for j below it), then per image the
    # number of CUIs passing each threshold. Scores are sorted best first, so those CUIs are a prefix.
    reached = np.searchsorted(THRESHOLDS, r.scores, side="right") * ((r.scores > 0) & (r.cols >= 0))
    hist = np.bincount((np.arange(n_rows)[:, None] * (n_t + 1) + reached).ravel(), minlength=n_rows * (n_t + 1))
    n_pred = np.cumsum(hist.reshape(n_rows, n_t + 1)[:, ::-1], 1)[:, ::-1][:, 1:]  # (images, thresholds)
    cum_hits = np.concatenate([np.zeros((n_rows, 1), np.int64), np.cumsum(t.hits, 1)], 1)
    tp = np.take_along_axis(cum_hits, n_pred, 1)
    none = n_pred == 0
    n_counted = np.where(none, 1, n_pred)  # an empty prediction is the one concept ''
    totals = {}
    for keep_top in (False, True):
        top = none & (r.cols[:, :1] >= 0) if keep_top else np.zeros_like(none)
        hits = np.where(top, t.hits[:, :1], np.where(none, t.empty_hit[:, None], tp))
        totals[keep_top] = (2 * hits / (t.sizes[:, None] + n_counted)).sum(0)
    best = (float(THRESHOLDS[0]), False, -1.0)
    for keep_top in (False, True):
        j = int(np.argmax(totals[keep_top]))  # the lowest threshold among equals
        score = float(totals[keep_top][j] / n_rows)
        if score > best[2] + 1e-12:
            best = (float(THRESHOLDS[j]), keep_top, score)
    return best


def tune_cui_thresholds(r: Ranked, t: Truth, threshold: float, keep_top: bool, support: np.ndarray,
                        rows: np.ndarray | None = None) -> dict[int, float]:
    """Greedy per-CUI thresholds (the 2025 winner's procedure, searched both ways): for each CUI with
    enough support, most frequent first, pick the threshold that most raises the summed F1 of the
    images it ranks, the others fixed. Returns {space column: threshold} for the CUIs that changed."""
    rows = np.arange(len(r.cols)) if rows is None else rows
    cols, scores, hits = r.cols[rows], r.scores[rows], t.hits[rows]
    chosen = (scores >= threshold) & (cols >= 0)
    n_pred, tp = chosen.sum(1), (chosen & hits).sum(1)
    sub = Truth(hits, t.sizes[rows], t.empty_hit[rows])
    sub_r = Ranked(cols, scores)
    flat = cols.ravel()
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(len(support) + 1))
    out: dict[int, float] = {}
    for c in np.argsort(-support, kind="stable"):
        if support[c] < MIN_SUPPORT:
            break
        where = order[bounds[c]:bounds[c + 1]]
        if not len(where):
            continue
        img, pos = np.divmod(where, cols.shape[1])
        s, h, now = scores[img, pos], hits[img, pos], chosen[img, pos]
        take = s[:, None] >= THRESHOLDS[None, :]
        delta = take.astype(np.int64) - now[:, None]
        old = f1_from_counts(n_pred[img], tp[img], sub_r, sub, keep_top, img)
        new_n = (n_pred[img][:, None] + delta).ravel()
        new_tp = (tp[img][:, None] + delta * h[:, None]).ravel()
        new = f1_from_counts(new_n, new_tp, sub_r, sub, keep_top, np.repeat(img, len(THRESHOLDS)))
        gain = (new.reshape(len(img), -1) - old[:, None]).sum(0)
        best = int(np.argmax(gain))
        if gain[best] > 1e-9 and THRESHOLDS[best] != threshold:
            out[int(c)] = float(THRESHOLDS[best])
            chosen[img, pos] = take[:, best]
            n_pred[img] += delta[:, best]
            tp[img] += delta[:, best] * h
    return out


def threshold_matrix(r: Ranked, threshold: float, per_column: dict[int, float]) -> np.ndarray:
    table = np.full(int(r.cols.max(initial=-1)) + 2, threshold, np.float32)
    for col, value in per_column.items():
        if col < len(table) - 1:
            table[col] = value
    return table[r.cols]  # column -1 (padding) reads the last entry: the global threshold


# ---------------------------------------------------------------------------------------------
# Tuning on the validation split
# ---------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    name: str
    fusion: Fusion
    threshold: float
    keep_top: bool
    f1: float  # mean F1 on the tuning images (fast path; the report recomputes it with scores.py)
    cui_thresholds: dict[str, float] = field(default_factory=dict)
    note: str = ""


def fit_thresholds(name: str, s: ImageScores, fusion: Fusion, t_gt: dict) -> tuple[Candidate, Ranked, Truth]:
    r = ranked(s, fusion)
    t = truth_for(r, s, t_gt)
    threshold, keep_top, f1 = best_global_threshold(r, t)
    return Candidate(name, fusion, threshold, keep_top, f1), r, t


def gt_columns(s: ImageScores, gt: dict) -> list[np.ndarray]:
    """Per image, the score columns of its ground-truth CUIs."""
    column = {x: n for n, x in enumerate(s.space)}
    return [np.array(sorted({column[x.upper()] for x in gt[i] if x.upper() in column}), np.int64) for i in s.ids]


def support_of(gt_cols: list[np.ndarray], rows: np.ndarray, width: int) -> np.ndarray:
    """How many of the images `rows` carry each column."""
    picked = [gt_cols[n] for n in rows]
    return np.bincount(np.concatenate(picked) if picked else np.zeros(0, np.int64), minlength=width)


def with_cui_thresholds(c: Candidate, s: ImageScores, r: Ranked, t: Truth, gt: dict) -> Candidate:
    """Add per-CUI thresholds if they raise the F1 on held-out halves (tuned on one half, scored on the other)."""
    gt_cols = gt_columns(s, gt)
    halves = [np.arange(0, len(s.ids), 2), np.arange(1, len(s.ids), 2)]
    gains = []
    for tune_rows, test_rows in (halves, halves[::-1]):
        if not len(tune_rows) or not len(test_rows):
            continue
        per_col = tune_cui_thresholds(r, t, c.threshold, c.keep_top, support_of(gt_cols, tune_rows, len(s.space)),
                                      tune_rows)
        sub_r = Ranked(r.cols[test_rows], r.scores[test_rows])
        sub_t = Truth(t.hits[test_rows], t.sizes[test_rows], t.empty_hit[test_rows])
        tuned = f1_per_image(sub_r, sub_t, threshold_matrix(sub_r, c.threshold, per_col), c.keep_top).mean()
        plain = f1_per_image(sub_r, sub_t, c.threshold, c.keep_top).mean()
        gains.append(float(tuned - plain))
    gain = sum(gains) / len(gains) if gains else 0.0
    if gain <= 0:
        return replace(c, note=f"no per-CUI thresholds ({gain:+.4f} F1 on held-out halves)")
    support = support_of(gt_cols, np.arange(len(s.ids)), len(s.space))
    per_col = tune_cui_thresholds(r, t, c.threshold, c.keep_top, support)
    f1 = float(f1_per_image(r, t, threshold_matrix(r, c.threshold, per_col), c.keep_top).mean())
    return replace(c, f1=f1, cui_thresholds={s.space[k]: v for k, v in per_col.items()},
                   note=f"{len(per_col)} per-CUI thresholds ({gain:+.4f} F1 on held-out halves)")


def tune(index: ConceptIndex, valid: Embeddings, gt: dict[str, tuple[str, ...]],
         generated: dict[str, list[str]] | None = None, manual: dict[str, tuple[str, ...]] | None = None,
         device: str = "cpu", per_cui: bool = True) -> tuple[dict, list[dict]]:
    """Choose k, weights, thresholds and fusion by maximising the official F1 on the validation split.

    Returns (settings, table): settings["methods"] holds knn, probe and fused, each usable by
    predict_concepts; table has one row per candidate with its official F1 (scores.concept_scores;
    secondary F1 too with `manual`). Fused is the best of all candidates, single methods included,
    so on the tuning images it is never worse than the best single method.
    """
    device = resolve_device(device)
    embedded = set(valid.ids)
    ids = sorted((i for i in gt if gt[i] and i in embedded), key=id_sort_key)
    if not ids:
        raise UserError("no validation image has both a ground-truth row and an embedding (do the IDs match?)")
    left_out = sum(1 for i in gt if gt[i]) - len(ids)
    if left_out:
        log(f"tuning on {len(ids)} images; {left_out} ground-truth images have no embedding and are left out")
    s = image_scores(index, valid, ids, generated, device=device)
    gt = {i: gt[i] for i in ids}

    found: dict[str, tuple[Candidate, Ranked, Truth]] = {}
    for k in (k for k in K_GRID if k <= len(index.ids)):
        for temperature in TEMPERATURES if k > 1 else (0.0,):
            entry = fit_thresholds("knn", s, Fusion(knn=1.0, k=k, temperature=temperature), gt)
            if "knn" not in found or entry[0].f1 > found["knn"][0].f1 + 1e-12:
                found["knn"] = entry
    if index.probe is not None:
        found["probe"] = fit_thresholds("probe", s, Fusion(probe=1.0), gt)
        blends = [fit_thresholds("knn+probe", s, replace(found["knn"][0].fusion, knn=a, probe=1 - a), gt)
                  for a in BLEND_GRID]
        found["knn+probe"] = max(blends, key=lambda e: e[0].f1)
    vision = max(found.values(), key=lambda e: e[0].f1)[0]
    if generated is not None:
        # The generated CUIs as they are: weight 1, threshold 1.
        alone, r, t = fit_thresholds("generated", s, Fusion(generated=1.0), gt)
        found["generated"] = (replace(alone, threshold=1.0, keep_top=False,
                                      f1=float(f1_per_image(r, t, 1.0, False).mean())), r, t)
        both = replace(vision.fusion, generated=1.0)
        r = ranked(s, both)
        t = truth_for(r, s, gt)
        union = Candidate("union", both, vision.threshold, vision.keep_top,
                          float(f1_per_image(r, t, vision.threshold, vision.keep_top).mean()))
        inter_threshold = round(1 + vision.threshold, 2)
        inter = Candidate("intersection", both, inter_threshold, False,
                          float(f1_per_image(r, t, inter_threshold, False).mean()))
        found["union"], found["intersection"] = (union, r, t), (inter, r, t)
        votes = [fit_thresholds("weighted vote", s, replace(vision.fusion, generated=b), gt) for b in GENERATED_GRID]
        found["weighted vote"] = max(votes, key=lambda e: e[0].f1)
    fused_name = max(found, key=lambda n: found[n][0].f1)

    chosen: dict[str, Candidate] = {}
    for method, name in (("knn", "knn"), ("probe", "probe"), ("fused", fused_name)):
        if name not in found:
            continue
        cand, r, t = found[name]
        chosen[method] = with_cui_thresholds(cand, s, r, t, gt) if per_cui and (cand.fusion.knn or cand.fusion.probe) \
            else cand
    # Per-CUI thresholds can lift a single method past the fused choice: fused is then that method.
    best = max(chosen.values(), key=lambda c: c.f1)
    if best.f1 > chosen["fused"].f1 + 1e-12:
        chosen["fused"] = best

    table = [report_row(name, cand, s, gt, manual) for name, (cand, _, _) in found.items()]
    table += [report_row(f"{m} (chosen)", c, s, gt, manual) for m, c in chosen.items()]
    methods = {}
    for m, c in chosen.items():
        row = next(r for r in table if r["method"] == f"{m} (chosen)")
        methods[m] = settings_of(c) | {k: v for k, v in row.items() if k.startswith("f1")}
    settings = {
        "format": SETTINGS_FORMAT,
        "index": {k: index.meta.get(k) for k in ("images", "cuis", "dim", "fingerprint", "embeddings")},
        "tuned_on": {"images": len(ids), "left_out": left_out, "generated": generated is not None,
                     "manual": manual is not None},
        "methods": methods,
        "table": table,
    }
    return settings, table


def settings_of(c: Candidate) -> dict:
    return {"source": c.name, "weights": {"knn": c.fusion.knn, "probe": c.fusion.probe,
                                          "generated": c.fusion.generated},
            "k": c.fusion.k, "temperature": c.fusion.temperature, "threshold": c.threshold, "keep_top": c.keep_top,
            "cui_thresholds": c.cui_thresholds, "note": c.note}


def report_row(name: str, c: Candidate, s: ImageScores, gt: dict, manual: dict | None) -> dict:
    """One table row, scored by scores.concept_scores on the predictions as the CSV would hold them."""
    pred = predict_from_scores(s, settings_of(c))
    as_read = {i: tuple(cuis) if cuis else ("",) for i, cuis in pred.items()}  # 'ID,' reads as ('',)
    manual_sub = {i: manual[i] for i in s.ids if i in manual} if manual is not None else None
    summary, _ = scores.concept_scores(gt, as_read, manual_sub)
    row = {"method": name, "f1": round(summary["f1"], 4), "settings": describe(c)}
    if manual_sub is not None:
        row["f1_secondary"] = round(summary["f1_secondary"], 4)
    return row


def describe(c: Candidate) -> str:
    f = c.fusion
    parts = []
    if f.knn:
        parts.append(f"knn {f.knn:g} (k={f.k}, " + (f"T={f.temperature:g})" if f.temperature else "uniform)"))
    if f.probe:
        parts.append(f"probe {f.probe:g}")
    if f.generated:
        parts.append(f"generated {f.generated:g}")
    text = " + ".join(parts) + f", threshold {c.threshold:g}" + (", keep top" if c.keep_top else "")
    return text + (f"; {c.note}" if c.note else "")


def format_table(table: list[dict]) -> str:
    secondary = any("f1_secondary" in row for row in table)
    lines = [f"{'method':<18} {'F1':>7}" + (f" {'F1 sec.':>8}" if secondary else "") + "  settings"]
    for row in table:
        sec = f" {row.get('f1_secondary', float('nan')):>8.4f}" if secondary else ""
        lines.append(f"{row['method']:<18} {row['f1']:>7.4f}{sec}  {row['settings']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------


def load_settings(path: str | Path, method: str, index: ConceptIndex | None = None) -> dict:
    """One method's settings ('knn', 'probe' or 'fused') from a file written by tune; with `index`,
    also check that they were tuned on that index and that it has what they use."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"concept settings {path} do not exist (make them with: concept_index.py tune)")
    try:
        settings = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({first_line(e)})") from None
    if not isinstance(settings, dict) or settings.get("format") != SETTINGS_FORMAT:
        raise UserError(f"{path} is not a settings file written by concept_index.py tune")
    if method not in settings["methods"]:
        raise UserError(f"{path} has no settings for --method {method} (it has: {', '.join(settings['methods'])})")
    chosen = settings["methods"][method]
    if index is not None:
        tuned = settings.get("index", {})
        differ = [k for k in ("fingerprint", "images", "cuis", "dim")
                  if tuned.get(k) is not None and index.meta.get(k) is not None and tuned[k] != index.meta[k]]
        if differ:
            what = ", ".join(f"{k} {tuned[k]} there, {index.meta[k]} here" for k in differ if k != "fingerprint")
            raise UserError(f"{path} was tuned on another concept index ({what or 'it was fitted again since'}): "
                            "run concept_index.py tune on this one")
        check_usable(index, chosen)
    return chosen


def check_usable(index: ConceptIndex, method_settings: dict) -> None:
    if fusion_of(method_settings).probe and index.probe is None:
        raise UserError("these settings use the probe, but the concept index has none (fit it with --probe_epochs > 0)")


def check_model_matches(base_model_path: str, index: ConceptIndex) -> None:
    """Before any model loads: the model's config (when it is on disk) must make vectors like the index's,
    so a mismatch fails now rather than after hours of generation."""
    config_file = Path(base_model_path).expanduser() / "config.json"
    if not config_file.is_file():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base_model_path, "config.json")
        if not isinstance(cached, str):
            return  # not on disk: the model load says what is wrong
        config_file = Path(cached)
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return
    dim = config.get("vision_config", {}).get("hidden_size")
    layer = config.get("vision_feature_layer")
    made = index.meta.get("embeddings", {})
    if dim is not None and dim != index.vectors.shape[1]:
        raise UserError(f"the vision tower of {base_model_path} gives {dim}-dimensional features, the concept index "
                        f"has {index.vectors.shape[1]}: it was built with another model")
    if layer is not None and made.get("feature_layer") not in (None, layer):
        raise UserError(f"{base_model_path} feeds its projector layer {layer}, the concept index was built from layer "
                        f"{made['feature_layer']}: embed with the same model")


def uses_generated(method_settings: dict) -> bool:
    """True if the method needs the generated CUIs (fused settings that kept them)."""
    return bool(method_settings["weights"].get("generated"))


def fusion_of(method_settings: dict) -> Fusion:
    w = method_settings["weights"]
    return Fusion(float(w.get("knn", 0.0)), float(w.get("probe", 0.0)), float(w.get("generated", 0.0)),
                  int(method_settings["k"]), float(method_settings["temperature"]))


def predict_from_scores(s: ImageScores, method_settings: dict) -> dict[str, list[str]]:
    r = ranked(s, fusion_of(method_settings))
    column = {c: n for n, c in enumerate(s.space)}
    per_col = {column[c]: v for c, v in method_settings.get("cui_thresholds", {}).items() if c in column}
    chosen = (r.scores >= threshold_matrix(r, float(method_settings["threshold"]), per_col)) & (r.cols >= 0)
    out = {}
    for n, image_id in enumerate(s.ids):
        picked = r.cols[n][chosen[n]]
        if not len(picked) and method_settings["keep_top"] and r.cols[n, 0] >= 0:
            picked = r.cols[n, :1]
        out[image_id] = [s.space[c] for c in picked[:MAX_CONCEPTS]]
    return out


def predict_concepts(index: ConceptIndex, method_settings: dict, emb: Embeddings,
                     generated: dict[str, list[str]] | None = None, device: str = "cpu") -> dict[str, list[str]]:
    """ID -> final CUIs (best first, at most 100, no repeats) for every image of `emb` (embedded or
    failed) and of `generated`, in ID order. An image without a vector gets only generated CUIs."""
    fusion = fusion_of(method_settings)
    if fusion.generated and generated is None:
        raise UserError("these settings fuse the generated concepts: give the generated CUIs too")
    check_usable(index, method_settings)
    ids = sorted(set(emb.ids) | set(emb.failed) | set(generated or {}), key=id_sort_key)
    s = image_scores(index, emb, ids, generated if fusion.generated else None, max_k=fusion.k if fusion.knn else 1,
                     device=resolve_device(device))
    return predict_from_scores(s, method_settings)
