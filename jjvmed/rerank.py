"""Best of N: each candidate caption of an image scored against the image by an image-text model, the best kept.

The model is a CLIP-style pair of towers, named by `--rerank_model`: an open_clip model (BiomedCLIP) or a
Hugging Face CLIP or SigLIP model (MedSigLIP), a local folder or a hub ID, with an optional `open_clip:` or
`hf:` prefix (without one, a folder holding open_clip_config.json is open_clip, anything else Hugging Face).
A candidate's score is the cosine of its text embedding and the image's, the quantity the 2026 relevance's
image-caption part is made of (MedImageInsight: 2.5 x max(cos, 0)). The highest score wins, the generation's
own first candidate on a tie; an empty caption is not scored (it scores 0 officially) and wins only when every
candidate is empty. Scores are kept in the journal under the reranker's key (the model and a fingerprint of
its weights), so another reranker scores the same candidates again without generating them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError, first_line
from .prompts import clean_caption
from .records import Record

FAMILIES = ("open_clip", "hf")
HF_KINDS = ("clip", "siglip", "siglip2")
# The files a Hugging Face tokenizer is built from (a fast tokenizer's, BPE's, WordPiece's, SentencePiece's).
# Without any, AutoTokenizer still builds one, with an empty vocabulary: every caption is the same unknown
# tokens, every candidate scores the same, and the first always wins.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "spiece.model", "tokenizer.model",
                   "sentencepiece.bpe.model")
BATCH = 32  # images per reranker pass: each brings its N candidates, so up to 32 x N texts at once


@dataclass
class Reranker:
    """A loaded image-text model: how images become its input, and both towers as (batch, dim) unit vectors."""
    key: str  # what the journal keeps scores under: family, name and weights
    preprocess: object  # picklable: list of PIL images -> (batch, 3, H, W) (runs in the loader's workers)
    image_vectors: Callable  # pixel values -> (batch, dim), L2-normalised
    text_vectors: Callable[[list[str]], object]  # texts -> (n, dim), L2-normalised


def parse_source(source: str) -> tuple[str, str]:
    """('open_clip' | 'hf', folder or hub ID) from --rerank_model."""
    family, colon, rest = source.partition(":")
    if colon and family in FAMILIES:
        return family, rest
    folder = Path(source).expanduser()
    return ("open_clip" if (folder / "open_clip_config.json").is_file() else "hf"), source


def check_source(source: str) -> None:
    """Before any model loads (a wrong reranker must not cost a night of generation first): its package is
    installed; a folder exists with its config, of a model with both towers; a hub ID is in the local cache
    when the hub is off (HF_HUB_OFFLINE)."""
    import importlib.util

    from huggingface_hub import constants, try_to_load_from_cache

    from .model import looks_like_hub_id

    family, where = parse_source(source)
    if family == "open_clip" and importlib.util.find_spec("open_clip") is None:
        raise UserError(f"--rerank_model {source} needs the package open_clip_torch (not installed)")
    wanted = "open_clip_config.json" if family == "open_clip" else "config.json"
    folder = Path(where).expanduser()
    if folder.is_dir():
        config = folder / wanted
    elif where.startswith(("/", ".", "~")) or not looks_like_hub_id(where):
        raise UserError(f"--rerank_model {source}: no such folder, and not a hub ID (owner/name)")
    else:
        cached = try_to_load_from_cache(where, wanted)
        if not isinstance(cached, str):
            if constants.HF_HUB_OFFLINE:
                raise UserError(f"--rerank_model {source} is not in the local cache and HF_HUB_OFFLINE is set; "
                                "download it once where there is network and give the local folder")
            return  # downloaded when the run gets there
        config = Path(cached)
    if not config.is_file():
        raise UserError(f"--rerank_model {source}: {folder} has no {wanted} (an image-text model folder: "
                        "open_clip, or Hugging Face CLIP / SigLIP)")
    if family == "hf":
        try:
            kind = json.loads(config.read_text()).get("model_type")
        except (OSError, ValueError):
            kind = None
        check_kind(kind, source)
        if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise UserError(f"--rerank_model {source}: {folder} has no tokenizer files (one of "
                            f"{', '.join(TOKENIZER_FILES)}); save the tokenizer with the model")


def load_reranker(source: str, device: str = "auto", dtype: str = "auto") -> Reranker:
    import torch

    from .encoders import weights_fingerprint
    from .model import resolve_device_and_dtype, target_device

    family, where = parse_source(source)
    model, preprocess, tokenize, name, tokens = (load_open_clip if family == "open_clip" else load_hf)(where, source)
    # The weights as stored (before any move or cast), and the tokenizer's vocabulary: either changes the scores.
    key = f"{family}:{name}@{weights_fingerprint(model)}" + (f"+{tokens}" if tokens else "")
    device_map, torch_dtype = resolve_device_and_dtype(device, dtype)
    target = torch.device(target_device(device_map))
    model = model.to(target, torch_dtype).eval()

    def unit(x):
        return torch.nn.functional.normalize(x.float(), dim=-1)

    def image_vectors(pixels):
        with torch.inference_mode():
            return unit(image_features(model, family, pixels.to(target, torch_dtype))).cpu()

    def text_vectors(texts: list[str]):
        with torch.inference_mode():
            tokens = {k: v.to(target) for k, v in tokenize(texts).items()}
            return unit(text_features(model, family, tokens)).cpu()

    return Reranker(key, preprocess, image_vectors, text_vectors)


def pooled(out):
    """transformers 5 returns the projected embedding as the pooler output of a model output; 4 returned it bare."""
    return out if hasattr(out, "shape") else out.pooler_output


def image_features(model, family: str, pixels):
    if family == "open_clip":
        return model.encode_image(pixels)
    return pooled(model.get_image_features(pixel_values=pixels))


def text_features(model, family: str, tokens: dict):
    if family == "open_clip":
        return model.encode_text(tokens["input_ids"])
    return pooled(model.get_text_features(**tokens))


def check_kind(kind: str | None, source: str) -> None:
    if kind not in HF_KINDS:
        raise UserError(f"--rerank_model {source} is a {kind or 'unknown'} model; best of N needs an image-text "
                        f"model with both towers ({', '.join(HF_KINDS)}, or open_clip)")


def load_hf(where: str, source: str):
    """A Hugging Face CLIP or SigLIP model with its tokenizer and image processor (transformers' PIL backend)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

    from .encoders import HFPreprocess
    from .model import IMAGE_BACKEND

    try:
        config = AutoConfig.from_pretrained(where)
    except (OSError, ValueError) as e:
        raise UserError(f"--rerank_model {source}: cannot load its config ({first_line(e)})") from None
    check_kind(config.model_type, source)
    try:
        model = AutoModel.from_pretrained(where)
        tokenizer = AutoTokenizer.from_pretrained(where)
        processor = AutoImageProcessor.from_pretrained(where, backend=IMAGE_BACKEND)
    except Exception as e:  # a missing, partial or foreign checkpoint: the library's first line says which
        raise UserError(f"--rerank_model {source}: cannot load the model ({first_line(e)})") from None
    length = config.text_config.max_position_embeddings
    # SigLIP was trained on texts padded to their full length (its model card asks for padding="max_length").
    padding = "max_length" if config.model_type.startswith("siglip") else True

    def tokenize(texts: list[str]) -> dict:
        return dict(tokenizer(texts, padding=padding, truncation=True, max_length=length, return_tensors="pt"))

    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    tokens = hashlib.sha256(vocabulary).hexdigest()[:8]
    return model, HFPreprocess(processor), tokenize, f"{config.model_type}:{Path(where).name or where}", tokens


def load_open_clip(where: str, source: str):
    """An open_clip model, both towers, built by open_clip from its open_clip_config.json (local-dir: or hf-hub:);
    preprocessing with PIL from the same config (preprocessing.py)."""
    from .encoders import import_optional, model_file, torchvision_placeholders
    from .preprocessing import from_open_clip_config

    where = where.removeprefix("hf-hub:").removeprefix("local-dir:")
    spec = f"--rerank_model {source}"
    config_path = model_file(where, ("open_clip_config.json",), spec)
    open_clip = import_optional("open_clip")
    name = f"local-dir:{where}" if Path(where).expanduser().is_dir() else f"hf-hub:{where}"
    try:
        with torchvision_placeholders():
            model = open_clip.create_model(name)
            tokenizer = open_clip.get_tokenizer(name)
    except UserError:
        raise
    except Exception as e:  # weights that do not fit, a text tower's model not cached offline
        raise UserError(f"{spec}: cannot build or load the model ({first_line(e)})") from None
    config = json.loads(config_path.read_text())
    model_cfg = config.get("model_cfg", config)
    preprocess = from_open_clip_config(config.get("preprocess_cfg", {}), model_cfg["vision_cfg"].get("image_size", 224))

    def tokenize(texts: list[str]) -> dict:
        return {"input_ids": tokenizer(texts)}

    # its tokenizer comes with the model's config (the text tower's name), which the weights' fingerprint covers
    return model, preprocess, tokenize, Path(where).name or where, ""


# ---------------------------------------------------------------------------------------------
# Scoring and choosing
# ---------------------------------------------------------------------------------------------


def score(reranker: Reranker, pixels, candidates: list[tuple[str, ...]]) -> list[tuple[float | None, ...]]:
    """Each image's candidates' cosines with the image (cleaned as the CSV writes them; None for an empty one)."""
    images = reranker.image_vectors(pixels)
    cleaned = [[clean_caption(c) for c in cands] for cands in candidates]
    texts = [c for cands in cleaned for c in cands if c]
    vectors = reranker.text_vectors(texts) if texts else None
    out, row = [], 0
    for n, cands in enumerate(cleaned):
        scores = []
        for c in cands:
            if not c:
                scores.append(None)
                continue
            scores.append(float(vectors[row] @ images[n]))
            row += 1
        out.append(tuple(scores))
    return out


def best(scores: tuple[float | None, ...]) -> int:
    """The position of the highest score; the first of equals; 0 when nothing was scored."""
    scored = [(s, -n) for n, s in enumerate(scores) if s is not None]
    return -max(scored)[1] if scored else 0


def chosen(record: Record, key: str | None) -> Record:
    """The record with the text the run keeps: the candidate `key`'s reranker scores highest, or without a
    reranker (or its scores) the generation's first; a record without candidates as it is."""
    if not record.candidates:
        return record
    scores = record.scores.get(key) if key else None
    text = record.candidates[best(scores) if scores else 0]
    return Record(record.id, text, record.error, record.candidates, record.scores)


def rerank_batches(reranker: Reranker, items: list[tuple[str, str]], records: dict[str, Record], num_workers: int
                   ) -> Iterator[tuple[list[Record], dict[str, str]]]:
    """Score the candidates of `items` (ID, path) against their images: per batch, the records with this
    reranker's scores added, and the digests of the files decoded (for the journal). An image that cannot be
    read keeps its record unscored (its first candidate is then kept)."""
    from torch.utils.data import DataLoader

    from .encoders import PixelCollate
    from .images import ImageDataset, Loader, ignore_stop_signals

    loader = Loader(DataLoader(ImageDataset(items, digests=True), batch_size=BATCH, shuffle=False,
                               num_workers=num_workers, collate_fn=PixelCollate(reranker.preprocess),
                               worker_init_fn=ignore_stop_signals, prefetch_factor=4 if num_workers else None))
    for batch in loader:
        if batch.inputs is None:
            continue
        scored = score(reranker, batch.inputs["pixel_values"], [records[i].candidates for i in batch.ids])
        done = []
        for image_id, scores in zip(batch.ids, scored, strict=True):
            r = records[image_id]
            done.append(Record(r.id, r.text, r.error, r.candidates, {**r.scores, reranker.key: scores}))
        yield done, batch.digests
