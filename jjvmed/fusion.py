"""From an image's vectors to its CUIs: what each method says (nearest training images, probe,
generated CUIs), fused with weights, ranked, and kept above thresholds, as tuned settings say.

The score of CUI c for an image is
    knn * (weighted share of its k nearest training images that carry c)
  + probe * (probe probability of c)
  + generated * (1 if the generated text mapped to c)
and c is kept if the score reaches its threshold (one per CUI where validation support allows,
else the global one); with `keep_top` an image whose scores pass no threshold keeps its best CUI.
Union (generated weight 1, vision threshold) and intersection (weight 1, threshold 1 + vision
threshold) of vision and generated concepts are corners of this weighted vote. tuning.py chooses
the settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .embeddings import Embeddings
from .errors import UserError, first_line
from .images import id_sort_key
from .index import ConceptIndex, nearest, resolve_device
from .submission import MAX_CONCEPTS

SETTINGS_FORMAT = "jj-vmed-concept-settings/1"
METHODS = ("knn", "probe", "fused")
ROWS_PER_CHUNK = 2048  # images scored at once: bounds the dense (images x CUIs) block in memory


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
                 max_k: int, device: str = "cpu") -> ImageScores:
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


def threshold_matrix(r: Ranked, threshold: float, per_column: dict[int, float]) -> np.ndarray:
    table = np.full(int(r.cols.max(initial=-1)) + 2, threshold, np.float32)
    for col, value in per_column.items():
        if col < len(table) - 1:
            table[col] = value
    return table[r.cols]  # column -1 (padding) reads the last entry: the global threshold


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
