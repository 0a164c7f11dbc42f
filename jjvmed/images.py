"""Images in: listing a folder, decoding any medical figure to RGB, and the loader that feeds the model.

A bad file never raises out of here: the dataset hands back its error, and the run writes an empty
row for it and lists it in the errors file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .files import file_digest, is_utf8

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}

DIGIT_RUNS = re.compile(r"(\d+)")


def id_sort_key(image_id: str) -> tuple:
    """Natural order, so `..._test_2` comes before `..._test_10` (the 2025 IDs are not zero-padded)."""
    parts = DIGIT_RUNS.split(image_id)  # text, digits, text, digits, ..., text
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


# Decoding cost grows with the pixel count, not the file size: a 1.9 MB PNG of 25000 x 25000 pixels
# decodes to 1.9 GB. An image is decoded only if its header says it fits this budget (RGB at 64 MP
# is ~190 MB, a few hundred MB with the conversions); a larger JPEG is decoded at 1/2, 1/4 or 1/8 of
# its size by the JPEG decoder itself, anything else fails alone with the reason. The model sees
# 336 x 336 pixels in the end.
MAX_PIXELS = 64_000_000


@dataclass(frozen=True)
class FolderScan:
    items: list[tuple[str, str]]  # (ID, path) of every image, natural ID order
    skipped: dict[str, list[str]]  # why -> names of files and folders left out


SKIPPED_NOT_UTF8 = "file names that are not valid UTF-8 (cannot be an ID in a CSV; convmv renames them)"


def scan_folder(image_dir: str | Path) -> FolderScan:
    """Every image file in the folder, and what was left out and why. Two files with one ID is an error.

    A broken symbolic link named like an image is kept, a link in a loop too: the user expects a row
    for it, and it fails to load like any unreadable image (a warning, an empty row, the errors file).
    """
    folder = Path(image_dir)
    if not folder.is_dir():
        raise UserError(f"--image_dir {folder} is not a folder")
    found: dict[str, str] = {}
    skipped: dict[str, list[str]] = {}
    # os.scandir and plain strings: pathlib costs ~40 us a file, most of a resume over 20,000 images.
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, dot, ext = entry.name.rpartition(".")
            try:
                folder_or_link_to_one = entry.is_dir()
            except OSError:  # a link in a loop (to itself, or two to each other): a file that fails to load
                folder_or_link_to_one = False
            if folder_or_link_to_one:
                skipped.setdefault("subfolders (not searched)", []).append(entry.name)
                continue
            if not dot or not stem or f".{ext.lower()}" not in IMAGE_EXTENSIONS:
                continue
            if entry.name.startswith("._"):
                skipped.setdefault("macOS metadata files (._*)", []).append(entry.name)
                continue
            if any(c in stem for c in "\n\r"):
                skipped.setdefault("file names with a line break (cannot be an ID in a CSV)", []).append(entry.name)
                continue
            if not stem.isascii() and not is_utf8(stem):
                skipped.setdefault(SKIPPED_NOT_UTF8, []).append(entry.name)
                continue
            if not entry.is_file(follow_symlinks=False) and not entry.is_symlink():  # a FIFO, a device
                continue
            if stem in found:
                other = os.path.basename(found[stem])
                raise UserError(f"two images have the ID {stem!r}: {other} and {entry.name}")
            found[stem] = entry.path
    return FolderScan(sorted(found.items(), key=lambda item: id_sort_key(item[0])), skipped)


def list_images(image_dir: str | Path) -> list[tuple[str, str]]:
    """(ID, path) for every image file in the folder, in ID order; an error if there is none."""
    scan = scan_folder(image_dir)
    if not scan.items:
        subfolders = scan.skipped.get("subfolders (not searched)", [])
        hint = f"; it has {len(subfolders)} subfolder(s) ({', '.join(sorted(subfolders)[:3])}), which are not " \
            "searched: give the folder that holds the images" if subfolders else ""
        raise UserError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {image_dir}{hint}")
    return scan.items


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS):
    """Open any common medical/figure image as 8-bit RGB, upright, alpha flattened onto white.

    Raises ValueError, without decoding, for an image over the pixel budget that cannot be decoded smaller.
    """
    import numpy as np
    from PIL import Image, ImageOps

    Image.MAX_IMAGE_PIXELS = None  # the budget below decides, before decoding, not after a warning
    with Image.open(path) as img:
        img.seek(0)  # first frame of animated GIF / multi-page TIFF
        width, height = img.size
        if width * height > max_pixels:
            if img.format != "JPEG":
                raise ValueError(f"image is {width}x{height} ({width * height / 1e6:.0f} megapixels), over the "
                                 f"{max_pixels / 1e6:.0f}-megapixel budget per image; downscale it")
            scale = next(s for s in (2, 4, 8, 16) if width * height / s / s <= max_pixels or s == 16)
            img.draft(img.mode, (width // scale, height // scale))
            if img.size[0] * img.size[1] > max_pixels:
                raise ValueError(f"image is {width}x{height}, too large to decode within the "
                                 f"{max_pixels / 1e6:.0f}-megapixel budget; downscale it")
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


# Where a decoded image carries the digest of the file it came from (PIL's `info` holds file metadata),
# so it reaches the journal without changing what the dataset hands out.
DIGEST_KEY = "jjvmed_crc32"


class ImageDataset:
    """Map-style dataset of (ID, image or None, error message or None); never raises on bad files.

    With `digests`, the decoding worker also takes the file's digest (it reads the file anyway): the
    journal keeps it, so a resume can tell a copied file (same bytes) from a replaced one. Runs that
    keep no journal (embeddings) leave it off and do not pay for it.
    """

    def __init__(self, items: list[tuple[str, str]], digests: bool = False):
        self.items = items
        self.digests = digests

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        image_id, path = self.items[index]
        try:
            digest = file_digest(path) if self.digests else None
            image = load_image(path)
        except Exception as e:  # noqa: BLE001 - any decoding failure is reported per image
            return image_id, None, f"{type(e).__name__}: {e}".strip()
        if digest is not None:
            image.info[DIGEST_KEY] = digest
        return image_id, image, None


@dataclass
class Batch:
    ids: list[str]  # images that decoded and are in `inputs`, in row order
    inputs: dict | None  # processor output (input_ids, attention_mask, pixel_values) or None
    failures: list[tuple[str, str]]  # (ID, error) for images that could not be read
    digests: dict[str, str] = field(default_factory=dict)  # ID -> digest of the file decoded, when known

    def pin_memory(self) -> Batch:
        """A copy with its tensors in page-locked memory, so the copies to the GPU run asynchronously.

        The DataLoader (pin_memory=True) calls this on what the collate function returns; an object
        without it comes back unpinned, and every `non_blocking=True` copy then waits.
        """
        if self.inputs is None:
            return self
        return Batch(self.ids, {k: v.pin_memory() for k, v in self.inputs.items()}, self.failures, self.digests)


class Collate:
    """Runs the processor in the DataLoader workers, so preprocessing overlaps generation.

    `prompt`: one prompt for every image, or each image's own by ID (retrieval-augmented prompts, which
    differ in length: the processor pads them on the left, as the model's tokenizer is set to).
    """

    prompt: str | dict[str, str] = ""  # subclasses without a prompt (pixels only) process images alone

    def __init__(self, processor, prompt: str | dict[str, str]):
        self.processor = processor
        self.prompt = prompt

    def process(self, images: list, ids: list[str] | None = None) -> dict:
        texts = [self.prompt] * len(images) if isinstance(self.prompt, str) else [self.prompt[i] for i in ids]
        out = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
        return dict(out)

    def inputs(self, good: list[tuple[str, object]]) -> dict:
        """The model's inputs for (ID, image) pairs."""
        if isinstance(self.prompt, str):
            return self.process([img for _, img in good])
        return self.process([img for _, img in good], [i for i, _ in good])

    def __call__(self, samples: list) -> Batch:
        good = [(i, img) for i, img, err in samples if err is None]
        failures = [(i, err) for i, _, err in samples if err is not None]
        digests = {i: img.info[DIGEST_KEY] for i, img in good if DIGEST_KEY in img.info}
        if not good:
            return Batch([], None, failures)
        try:
            return Batch([i for i, _ in good], self.inputs(good), failures, digests)
        except Exception:  # noqa: BLE001 - find the image the processor cannot take, keep the others
            kept = []
            for image_id, img in good:
                try:
                    self.inputs([(image_id, img)])
                    kept.append((image_id, img))
                except Exception as e:  # noqa: BLE001
                    failures.append((image_id, f"preprocessing failed: {type(e).__name__}: {e}"))
            inputs = self.inputs(kept) if kept else None
            return Batch([i for i, _ in kept], inputs, failures, {i: digests[i] for i, _ in kept if i in digests})


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """In a decoding worker: leave Ctrl-C and SIGTERM to the main process.

    Schedulers (Slurm at the time limit, torchrun) and a terminal's Ctrl-C signal every process of
    the job. A worker that dies of it looks to the main process like a worker killed for lack of
    memory, and the clean stop after the current batch turns into an error; the main process ends
    the workers itself when it stops.
    """
    import signal

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


class Loader:
    """The run's batches, and the digest of every file they decoded, for the journal (`digests`, by ID)."""

    def __init__(self, loader):
        self.loader = loader
        self.digests: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            self.digests.update(batch.digests)
            yield batch


def make_loader(items: list[tuple[str, str]], processor, prompt: str | dict[str, str], batch_size: int,
                num_workers: int, pin_memory: bool = False) -> Loader:
    """The run's batches; `prompt`: one for every image, or ID -> its own."""
    from torch.utils.data import DataLoader

    return Loader(DataLoader(
        ImageDataset(items, digests=True),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=Collate(processor, prompt),
        worker_init_fn=ignore_stop_signals,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
    ))
