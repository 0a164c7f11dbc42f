"""Tiny random image encoders and image-text rerankers of every family the tool loads, built offline with the
families' real classes and saved the way their libraries save them (Hugging Face save_pretrained, timm's
save_for_hf, open_clip's open_clip_config.json + weights): the tests and benchmarks load them through the same
code a real checkpoint goes through.

Encoders (vision towers): ENCODERS, name -> a builder that returns the `--encoder` spec. Rerankers (both
towers, seeded): save_hf_clip, save_hf_siglip, save_open_clip.
"""

from __future__ import annotations

import json
from pathlib import Path

SIZE = 32  # pixels: every tiny encoder and reranker takes 32 x 32 images


def import_family(name: str):
    from jjvmed.encoders import import_optional

    return import_optional(name)


def save_hf_clip_vision(folder: Path) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                              image_size=SIZE, patch_size=8, projection_dim=16)
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
    return folder


def save_hf_siglip_vision(folder: Path) -> Path:
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                                image_size=SIZE, patch_size=8)
    SiglipVisionModel(config).save_pretrained(folder)
    SiglipImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
    return folder


def save_hf_dinov2(folder: Path) -> Path:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=SIZE,
                          patch_size=8)
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def save_open_clip_vision(folder: Path, vision_cfg: dict) -> Path:
    """A whole open_clip CLIP (image and text towers) from a model config dict, saved as open_clip saves one."""
    import torch
    from safetensors.torch import save_file

    open_clip = import_family("open_clip")
    model_cfg = {"embed_dim": 16, "vision_cfg": vision_cfg,
                 "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    model = open_clip.CLIP(**model_cfg)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                                   "std": [0.26862954, 0.26130258, 0.27577711]}}))
    return folder


def save_timm(folder: Path, name: str) -> Path:
    import torch

    timm = import_family("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5)
    timm.models.save_for_hf(model, folder, safe_serialization=True)
    return folder


ENCODERS = {
    "hf-clip": lambda d: f"hf:{save_hf_clip_vision(d)}",
    "hf-siglip": lambda d: f"hf:{save_hf_siglip_vision(d)}",
    "hf-dinov2": lambda d: f"hf:{save_hf_dinov2(d)}",
    "open_clip-vit": lambda d: f"open_clip:{save_open_clip_vision(d, {'image_size': SIZE, 'layers': 2, 'width': 32, 'patch_size': 8, 'head_width': 16})}",  # noqa: E501
    "open_clip-timm": lambda d: f"open_clip:{save_open_clip_vision(d, {'timm_model_name': 'test_vit', 'timm_model_pretrained': False, 'timm_pool': '', 'timm_proj': 'linear', 'image_size': SIZE})}",  # noqa: E501
    "timm-convnext": lambda d: f"timm:{save_timm(d, 'test_convnext')}",
    "timm-efficientnet": lambda d: f"timm:{save_timm(d, 'test_efficientnet')}",
}


def text_tokenizer(length: int):
    """A small BPE tokenizer (the tiny LLaVA's vocabulary) that ends every text with its end token, as CLIP's
    does: CLIP pools the text at that token."""
    from tiny_llava import train_tokenizer
    from tokenizers import processors

    tok = train_tokenizer(vocab_size=512)
    bos, eos = tok.convert_tokens_to_ids("<|begin_of_text|>"), tok.convert_tokens_to_ids("<|end_of_text|>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A <|end_of_text|>", special_tokens=[("<|begin_of_text|>", bos),
                                                                      ("<|end_of_text|>", eos)])
    tok.model_max_length = length
    return tok, bos, eos


def save_hf_clip(folder: Path, seed: int) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tok, bos, eos = text_tokenizer(64)
    config = CLIPConfig(text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 37,
                                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 64,
                                     "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": tok.pad_token_id},
                        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                                       "num_attention_heads": 2, "image_size": SIZE, "patch_size": 8},
                        projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
    return folder


def save_hf_siglip(folder: Path, seed: int) -> Path:
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    tok, _, _ = text_tokenizer(16)
    config = SiglipConfig(text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 37,
                                       "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 16,
                                       "pad_token_id": tok.pad_token_id},
                          vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                                         "num_attention_heads": 2, "image_size": SIZE, "patch_size": 8})
    torch.manual_seed(seed)
    SiglipModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    SiglipImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
    return folder


def save_open_clip(folder: Path, seed: int) -> Path:
    """A whole open_clip CLIP from a config (its own tokenizer's vocabulary, a tiny width), saved as open_clip
    saves one: open_clip_config.json and the weights."""
    import torch
    from safetensors.torch import save_file

    open_clip = import_family("open_clip")
    model_cfg = {"embed_dim": 16,
                 "vision_cfg": {"image_size": SIZE, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
                 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    return folder
