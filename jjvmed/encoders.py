"""Image encoders: a model that turns preprocessed images into one L2-normalised vector each.

Today LLaVA's own vision tower (the features its projector gets), loaded alone from the base model.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError
from .images import Collate

POOLINGS = ("mean", "cls")


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
