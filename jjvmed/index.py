"""The concept index: the training images' vectors with their CUIs (for nearest neighbours) and the
probe trained on them, saved in one folder by `fit_index`; and the concept files they are built from.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import files
from .embeddings import Embeddings
from .errors import UserError, log
from .submission import concept_pairs, read_rows

INDEX_FORMAT = "jj-vmed-concept-index/1"


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
