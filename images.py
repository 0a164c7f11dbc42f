"""Images in: listing a folder, decoding any medical figure to RGB, and the loader that feeds the model.

A bad file never raises out of here: the dataset hands back its error, and the run writes an empty
row for it and lists it in the errors file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}

DIGIT_RUNS = re.compile(r"(\d+)")


def id_sort_key(image_id: str) -> tuple:
    """Natural order, so `..._test_2` comes before `..._test_10` (the 2025 IDs are not zero-padded)."""
    parts = DIGIT_RUNS.split(image_id)  # text, digits, text, digits, ..., text
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


def list_images(image_dir: str | Path) -> list[tuple[str, str]]:
    """(ID, path) for every image file in the folder, in ID order. Two files with one ID is an error."""
    folder = Path(image_dir)
    if not folder.is_dir():
        raise UserError(f"--image_dir {folder} is not a folder")
    found: dict[str, str] = {}
    # os.scandir and plain strings: pathlib costs ~40 us a file, most of a resume over 20,000 images.
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, dot, ext = entry.name.rpartition(".")
            if not dot or not stem or f".{ext.lower()}" not in IMAGE_EXTENSIONS or not entry.is_file():
                continue
            if stem in found:
                other = os.path.basename(found[stem])
                raise UserError(f"two images have the ID {stem!r}: {other} and {entry.name}")
            found[stem] = entry.path
    if not found:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {folder}")
    return sorted(found.items(), key=lambda item: id_sort_key(item[0]))


def load_image(path: str | Path):
    """Open any common medical/figure image as 8-bit RGB, upright, alpha flattened onto white."""
    import numpy as np
    from PIL import Image, ImageOps

    Image.MAX_IMAGE_PIXELS = 400_000_000  # whole-slide-like figures are legitimate input
    with Image.open(path) as img:
        img.seek(0)  # first frame of animated GIF / multi-page TIFF
        img.load()  # decode now, so a truncated file fails here and not in a worker later
        # Copies of a full-resolution scan cost as much as decoding it: only transpose/convert when needed.
        if img.getexif().get(0x0112, 1) != 1:
            img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            # 16-bit and float images (DICOM exports): stretch the used range to 0..255.
            arr = np.asarray(img, dtype=np.float32)
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
            img = Image.fromarray(arr.round().astype(np.uint8), mode="L")
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, rgba)
        return img if img.mode == "RGB" else img.convert("RGB")


class ImageDataset:
    """Map-style dataset of (ID, image or None, error message or None); never raises on bad files."""

    def __init__(self, items: list[tuple[str, str]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        image_id, path = self.items[index]
        try:
            return image_id, load_image(path), None
        except Exception as e:  # noqa: BLE001 - any decoding failure is reported per image
            return image_id, None, f"{type(e).__name__}: {e}".strip()


@dataclass
class Batch:
    ids: list[str]  # images that decoded and are in `inputs`, in row order
    inputs: dict | None  # processor output (input_ids, attention_mask, pixel_values) or None
    failures: list[tuple[str, str]]  # (ID, error) for images that could not be read


class Collate:
    """Runs the processor in the DataLoader workers, so preprocessing overlaps generation."""

    def __init__(self, processor, prompt: str):
        self.processor = processor
        self.prompt = prompt

    def process(self, images: list) -> dict:
        out = self.processor(text=[self.prompt] * len(images), images=images, return_tensors="pt", padding=True)
        return dict(out)

    def __call__(self, samples: list) -> Batch:
        good = [(i, img) for i, img, err in samples if err is None]
        failures = [(i, err) for i, _, err in samples if err is not None]
        if not good:
            return Batch([], None, failures)
        try:
            return Batch([i for i, _ in good], self.process([img for _, img in good]), failures)
        except Exception:  # noqa: BLE001 - find the image the processor cannot take, keep the others
            kept = []
            for image_id, img in good:
                try:
                    self.process([img])
                    kept.append((image_id, img))
                except Exception as e:  # noqa: BLE001
                    failures.append((image_id, f"preprocessing failed: {type(e).__name__}: {e}"))
            inputs = self.process([img for _, img in kept]) if kept else None
            return Batch([i for i, _ in kept], inputs, failures)


def make_loader(items: list[tuple[str, str]], processor, prompt: str, batch_size: int, num_workers: int,
                pin_memory: bool = False):
    from torch.utils.data import DataLoader

    return DataLoader(
        ImageDataset(items),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=Collate(processor, prompt),
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
    )
