"""The linear probe: one logistic output per CUI (optionally behind one hidden layer) trained on an encoder's
vectors of the training images, stopped by the F1 on a held-out slice of them. index.py keeps one per encoder
of the concept index; fusion.py weighs its probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .model import resolve_device


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
class ProbeOptions:
    hidden: int = 0  # 0: linear
    epochs: int = 30  # passes over the training vectors at most; 0: no probe
    batch_size: int = 256
    learning_rate: float = 1e-2
    weight_decay: float = 1e-4
    patience: int = 3  # stop after this many passes without a better held-out F1
    held_out: float = 0.1  # share of the training images (at most MAX_HELD_OUT) that decides when to stop
    seed: int = 0
    device: str = "auto"


MIN_STEPS_PER_PASS = 20  # a pass is at least this many steps, so a small set gets updates between checks
MAX_HELD_OUT = 2000  # images: enough to rank passes by F1, few enough to leave the rest for training
MIN_HELD_OUT = 20  # below this the probe trains all `epochs` passes on every image
F1_THRESHOLDS = np.round(np.arange(1, 20) * 0.05, 2).astype(np.float32)  # for the held-out F1 only


def held_out_f1(probabilities: np.ndarray, truth: np.ndarray) -> float:
    """Mean per-image F1 (images with concepts) at the best single threshold: what tuning will maximise."""
    keep = truth.any(1)
    p, t = probabilities[keep], truth[keep]
    if not len(p):
        return 0.0
    sizes = t.sum(1)
    best = 0.0
    for threshold in F1_THRESHOLDS:
        chosen = p >= threshold
        best = max(best, float((2 * (chosen & t).sum(1) / (sizes + np.maximum(chosen.sum(1), 1))).mean()))
    return best


def train_probe(vectors: np.ndarray, labels, options: ProbeOptions) -> Probe:
    """Multi-label BCE on the training vectors (labels: scipy csr, images x CUIs): AdamW over shuffled
    batches, in passes over the data; after each pass the F1 on a held-out slice of the training images
    (the official per-image F1 at the best single threshold) is measured, and training stops once it has
    not risen for `patience` passes. The weights of the best pass are kept.

    Stopping on the training loss never fired at 8,000 images (the loss keeps falling long after the
    held-out F1 peaks). The output biases start at each CUI's log-odds in the training set: from zero
    (probability 0.5 for all ~2,000 CUIs) the optimiser spent most of its steps pushing rare CUIs down.
    """
    import math

    import torch

    device = resolve_device(options.device)
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    n = len(vectors)
    held = min(int(n * options.held_out), MAX_HELD_OUT) if options.held_out > 0 else 0
    held = held if held >= MIN_HELD_OUT else 0
    order = rng.permutation(n)
    train_rows, held_rows = np.sort(order[held:]), np.sort(order[:held])
    x_all = torch.from_numpy(vectors).to(device)
    mean = x_all.mean(0)
    std = x_all.std(0) + 1e-6  # a few CLIP dimensions dominate; standardising lets each count
    dim, n_cuis = vectors.shape[1], labels.shape[1]
    if options.hidden:
        net = torch.nn.Sequential(torch.nn.Linear(dim, options.hidden), torch.nn.GELU(),
                                  torch.nn.Linear(options.hidden, n_cuis))
    else:
        net = torch.nn.Sequential(torch.nn.Linear(dim, n_cuis))
    share = np.asarray(labels[train_rows].sum(0), np.float64).ravel() / len(train_rows)
    share = np.clip(share, 0.5 / len(train_rows), 1 - 0.5 / len(train_rows))
    with torch.no_grad():
        net[-1].bias.copy_(torch.from_numpy(np.log(share / (1 - share)).astype(np.float32)))
    net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=options.learning_rate, weight_decay=options.weight_decay)
    batch = min(options.batch_size, len(train_rows))
    steps_per_pass = max(math.ceil(len(train_rows) / batch), MIN_STEPS_PER_PASS)
    x_held = (x_all[torch.from_numpy(held_rows).to(device)] - mean) / std if held else None
    truth_held = labels[held_rows].toarray() > 0 if held else None
    shuffled, position = rng.permutation(train_rows), 0
    losses: list[float] = []
    scores: list[float] = []
    best_state, best_score = None, -1.0
    for _ in range(options.epochs):
        net.train()
        total = torch.zeros((), device=device)
        for _ in range(steps_per_pass):
            if position + batch > len(shuffled):
                shuffled, position = rng.permutation(train_rows), 0
            rows = shuffled[position:position + batch]
            position += batch
            target = torch.from_numpy(labels[rows].toarray()).to(device)
            x = (x_all[torch.from_numpy(rows).to(device)] - mean) / std
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
        losses.append(float(total) / steps_per_pass)
        if not held:
            continue
        with torch.inference_mode():
            scores.append(held_out_f1(torch.sigmoid(net(x_held)).cpu().numpy(), truth_held))
        if scores[-1] > best_score + 1e-6:
            best_score = scores[-1]
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        elif len(scores) - 1 - int(np.argmax(scores)) >= options.patience:
            break
    if best_state is not None:
        net.load_state_dict(best_state)
    layers = [m for m in net if isinstance(m, torch.nn.Linear)]
    tensors = {"mean": mean, "std": std, "w1": layers[0].weight, "b1": layers[0].bias}
    if len(layers) == 2:
        tensors |= {"w2": layers[1].weight, "b2": layers[1].bias}
    best_pass = int(np.argmax(scores)) + 1 if scores else len(losses)
    info = {"hidden": options.hidden, "passes": len(losses), "best_pass": best_pass,
            "steps": len(losses) * steps_per_pass, "train_images": len(train_rows), "batch_size": batch,
            "learning_rate": options.learning_rate,
            "weight_decay": options.weight_decay, "patience": options.patience, "held_out_images": held,
            "losses": [round(x, 6) for x in losses], "held_out_f1": [round(x, 4) for x in scores],
            "final_loss": losses[-1] if losses else float("nan"), "dim": dim}
    return Probe({k: v.detach().float().cpu().contiguous().numpy() for k, v in tensors.items()}, info)
