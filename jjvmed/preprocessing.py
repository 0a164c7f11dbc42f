"""Image preprocessing as timm and open_clip prescribe it for inference, done with PIL from the model's own config.

timm (`transforms_imagenet_eval`) and open_clip (`image_transform`, not training) build their inference
transforms from torchvision; torchvision on a PIL image resizes with PIL itself. The same steps are
written here with PIL and numpy, with torchvision's size and crop arithmetic, so the pixels do not
depend on torchvision being installed (on the project's CPU machines it cannot be: FACTS.md, section 7).
Hugging Face models keep their own image processors (transformers' PIL backend).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Preprocessing:
    """Resize, crop, scale to [0, 1], normalise: images -> (batch, 3, height, width) float32."""
    size: tuple[int, int]  # (height, width) the model takes
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize: str = "shortest"  # shortest: shorter side to size / crop_pct, then a centre crop; squash: both sides;
    #                           longest: longer side to size / crop_pct, padded with `fill`, then cropped
    crop_pct: float = 1.0  # timm resizes to size / crop_pct before cropping (0.875 for many ImageNet models)
    fill: tuple[int, int, int] = (0, 0, 0)

    def __call__(self, images: list) -> object:
        import torch

        return torch.from_numpy(np.stack([self.array(image) for image in images]))

    def array(self, image) -> np.ndarray:
        image = self.crop(self.resized(image.convert("RGB")))
        pixels = np.asarray(image, np.float32) / 255.0
        pixels = (pixels - np.array(self.mean, np.float32)) / np.array(self.std, np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def resized(self, image):
        from PIL import Image

        resample = getattr(Image.Resampling, self.interpolation.upper())
        height, width = self.size
        scale_h, scale_w = math.floor(height / self.crop_pct), math.floor(width / self.crop_pct)
        w, h = image.size
        if self.resize == "squash":
            new_h, new_w = scale_h, scale_w
        elif self.resize == "shortest" and scale_h == scale_w:
            # torchvision's Resize(int): the shorter side to the size, the longer one in proportion, truncated
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = scale_h, int(scale_h * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        else:
            # timm's and open_clip's ResizeKeepRatio: the ratio of the shorter (or longer) side, rounded
            ratios = (h / scale_h, w / scale_w)
            ratio = max(ratios) if self.resize == "longest" else min(ratios)
            new_h, new_w = round(h / ratio), round(w / ratio)
        if (new_w, new_h) == (w, h):
            return image
        return image.resize((new_w, new_h), resample)

    def crop(self, image):
        """torchvision's CenterCrop: pad evenly when the image is smaller, then take the centre."""
        from PIL import Image

        height, width = self.size
        w, h = image.size
        if w < width or h < height:
            padded = Image.new("RGB", (max(w, width), max(h, height)), self.fill)
            padded.paste(image, ((max(w, width) - w) // 2, (max(h, height) - h) // 2))
            image, (w, h) = padded, padded.size
        top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
        return image.crop((left, top, left + width, top + height))


def from_timm_config(config: dict) -> Preprocessing:
    """timm's resolved data config (timm.data.resolve_model_data_config): input_size, interpolation,
    mean, std, crop_pct, crop_mode ('center', 'squash' or 'border')."""
    _, height, width = config["input_size"]
    mode = config.get("crop_mode") or "center"
    resize = {"center": "shortest", "squash": "squash", "border": "longest"}[mode]
    mean = tuple(config["mean"])
    return Preprocessing((height, width), mean, tuple(config["std"]), config.get("interpolation") or "bilinear",
                         resize, float(config.get("crop_pct") or 0.875),
                         tuple(round(255 * v) for v in mean) if resize == "longest" else (0, 0, 0))


OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's defaults (OPENAI_DATASET_MEAN / STD)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def from_open_clip_config(preprocess_cfg: dict, image_size: int | list) -> Preprocessing:
    """open_clip's PreprocessCfg (the `preprocess_cfg` of open_clip_config.json) for inference."""
    size = preprocess_cfg.get("size", image_size)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    fill = int(preprocess_cfg.get("fill_color", 0))
    return Preprocessing((height, width), tuple(preprocess_cfg.get("mean", OPENAI_MEAN)),
                         tuple(preprocess_cfg.get("std", OPENAI_STD)), preprocess_cfg.get("interpolation", "bicubic"),
                         preprocess_cfg.get("resize_mode", "shortest"), 1.0, (fill, fill, fill))
