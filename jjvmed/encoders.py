"""Image encoders: any model that turns an image into one L2-normalised vector, named by a SPEC.

    llava                    LLaVA's own vision tower (the model of --base_model_path): the features its
                             projector gets, pooled
    hf:ID_OR_FOLDER          a Hugging Face vision model: the vision tower of a CLIP or SigLIP checkpoint
                             (MedSigLIP), a DINOv2 backbone (RAD-DINO), or any AutoModel, with its own image
                             processor
    open_clip:ID_OR_FOLDER   an open_clip model (BiomedCLIP): only its image tower is built and loaded
    timm:NAME_ID_OR_FOLDER   a timm backbone (ConvNeXt-V2, DenseNet, EfficientNet) without its classifier

A folder is read as it is; anything else is a hub ID (looked up in the local cache first). Each encoder
preprocesses as its model card prescribes (size, mean/std, crop) and pools as its family does by default
(`--pooling default`): CLIP's projected image embedding, SigLIP's attention-pooled one, DINOv2's CLS
token, timm's global pool, open_clip's image embedding, LLaVA's mean of the patch tokens.

`describe` says what made a vector; two vectors may be compared only if `same_encoder` says so. Models
other than LLaVA's tower are loaded on the CPU in their stored precision first, so the weights'
fingerprint does not depend on the device or dtype they then run in; LLaVA's tower, loaded with the
language model, is fingerprinted on values cast to bf16, for the same reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError, first_line, log
from .images import Collate

FAMILIES = ("llava", "hf", "open_clip", "timm")
POOLINGS = ("default", "mean", "cls", "gem")
FAMILY_POOLINGS = {"llava": ("mean", "cls"), "hf": ("default", "mean", "cls"), "open_clip": ("default",),
                   "timm": ("default", "mean", "gem")}
# What `describe` keys must agree for two sets of vectors to be comparable (the source path may differ).
IDENTITY = ("family", "name", "pooling", "dim", "weights", "image_size", "feature_layer")
GEM_P = 3.0  # generalised-mean pooling exponent (AUEB's CNN embeddings)
PACKAGES = {"timm": "timm", "open_clip": "open_clip_torch"}


@dataclass
class Encoder:
    """A loaded image encoder: the model, how images become its input, and how its output is pooled."""
    family: str
    model: object  # torch module, in eval mode, on `device`
    preprocess: object  # picklable callable: list of PIL images -> (batch, 3, H, W) tensor (runs in workers)
    pooling: str
    device: object
    info: dict = field(default_factory=dict)  # family details: feature_layer, drop_cls (llava), kind (hf)

    def describe(self) -> dict:
        import torch

        dtype = next(self.model.parameters()).dtype
        return {**self.info, "family": self.family, "pooling": self.pooling,
                "dtype": str(dtype).removeprefix("torch."), "device": str(torch.device(self.device).type)}


def parse_spec(spec: str) -> tuple[str, str]:
    """'timm:convnextv2_base' -> ('timm', 'convnextv2_base'); 'llava' -> ('llava', '')."""
    family, _, source = spec.partition(":")
    if family not in FAMILIES:
        raise UserError(f"--encoder {spec!r}: expected llava, hf:ID_OR_FOLDER, open_clip:ID_OR_FOLDER or "
                        "timm:NAME_ID_OR_FOLDER")
    if family != "llava" and not source:
        raise UserError(f"--encoder {spec}: name the model after the colon, e.g. {family}:/models/my-encoder")
    return family, source


def resolve_pooling(family: str, pooling: str) -> str:
    pooling = "mean" if family == "llava" and pooling == "default" else pooling
    if pooling not in FAMILY_POOLINGS[family]:
        raise UserError(f"--pooling {pooling} does not apply to {family} encoders (they take: "
                        f"{', '.join(FAMILY_POOLINGS[family])})")
    return pooling


def same_encoder(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in IDENTITY)


def check_recorded(description: dict, what: str, remedy: str) -> None:
    """Refuse LLaVA vectors from before the tower's weights fingerprint and image size were recorded: they
    cannot be told from another LLaVA checkpoint's of the same shape."""
    if description.get("family", "llava") == "llava" and not all(k in description for k in ("weights", "image_size")):
        raise UserError(f"{what} holds LLaVA vision-tower vectors made by an older version, which did not record "
                        f"which weights made them: {remedy}")


def encoder_label(description: dict) -> str:
    """A short name for tables and messages: 'llava', 'hf:rad-dino', 'timm:convnextv2_base'."""
    family = description.get("family", "llava")
    if family == "llava":
        return "llava"
    source = description.get("source", "").partition(":")[2].rstrip("/")
    return f"{family}:{Path(source).name or description.get('name', '?')}"


def differences(a: dict, b: dict) -> str:
    return ", ".join(f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in IDENTITY if a.get(k) != b.get(k))


def load_encoder(spec: str, pooling: str = "default", device: str = "auto", dtype: str = "auto",
                 base_model_path: str | None = None) -> Encoder:
    """Load the encoder of `spec` ('llava' takes the tower of `base_model_path`)."""
    family, source = parse_spec(spec)
    pooling = resolve_pooling(family, pooling)
    if family == "llava":
        from .model import DEFAULT_BASE_MODEL

        return load_vision_encoder(source or base_model_path or DEFAULT_BASE_MODEL, device, dtype, pooling)
    import torch

    from .model import resolve_device_and_dtype, target_device

    device_map, torch_dtype = resolve_device_and_dtype(device, dtype)
    target = target_device(device_map)
    model, preprocess, info = LOADERS[family](source)
    info = {"source": spec, **info, "weights": weights_fingerprint(model)}
    model = model.to(target, torch_dtype).eval()
    encoder = Encoder(family, model, preprocess, pooling, torch.device(target), info)
    pixels = preprocess([blank_image()])
    encoder.info["image_size"] = [int(pixels.shape[2]), int(pixels.shape[3])]  # what the model takes, as preprocessed
    encoder.info["dim"] = int(pooled_features(encoder, pixels).shape[1])
    return encoder


def blank_image():
    from PIL import Image

    return Image.new("RGB", (64, 64), (128, 128, 128))


def weights_fingerprint(model, cast=None) -> str:
    """Which weights these are: parameter names, shapes and a sample of each tensor's values, so BiomedCLIP
    and an OpenAI ViT-B/16 of the same shape differ. Taken as stored (before any move or cast), or, with
    `cast` (a torch dtype), with the sampled values cast to it first: then one checkpoint loaded in bf16 on a
    GPU and in fp32 on the CPU gives the same fingerprint."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64]
        if cast is not None and sample.is_floating_point():
            sample = sample.to(cast)
        h.update(f"{name}{tuple(tensor.shape)}".encode() + sample.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Finding a model's files
# ---------------------------------------------------------------------------------------------------


def local_folder(source: str) -> Path | None:
    path = Path(source).expanduser()
    return path if path.is_dir() else None


def source_files(spec: str, base_model_path: str | None = None) -> list[list] | None:
    """The identity (files.file_identity) of every file in the local folder of `spec`'s model ('llava': of
    `base_model_path`), without loading it: when it differs from the one recorded with stored vectors, the model
    is loaded to check they are still its own. None for a hub ID (its cache keeps each revision apart)."""
    from .files import file_identity

    family, source = parse_spec(spec)
    source = (source or base_model_path or "") if family == "llava" else source
    folder = local_folder(source.removeprefix("hf-hub:").removeprefix("local-dir:")) if source else None
    if folder is None:
        return None
    return [[p.name, *file_identity(p)] for p in sorted(folder.iterdir()) if p.is_file()]


def hub_file(repo: str, names: tuple[str, ...], spec: str) -> Path:
    """The first of `names` in a hub repo: from the local cache when any is there (BiomedCLIP ships only
    open_clip_pytorch_model.bin), else downloaded; offline or unreachable, one line saying so."""
    from .model import looks_like_hub_id

    if not looks_like_hub_id(repo):
        raise UserError(f"--encoder {spec}: no such folder, and not a hub ID (owner/name)")
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import RemoteEntryNotFoundError

    for name in names:
        cached = try_to_load_from_cache(repo, name)
        if isinstance(cached, str):
            return Path(cached)
    problems = []
    for name in names:
        try:
            return Path(hf_hub_download(repo, name))
        except RemoteEntryNotFoundError:
            continue  # the repo is there, without this file: try the next name
        except Exception as e:  # offline, not cached, no such repo: all say the same to the user
            problems.append(first_line(e))
    if problems:
        raise UserError(f"--encoder {spec}: cannot get {' or '.join(names)} from {repo} ({problems[0]}); download "
                        "the model once where there is network and give its local folder")
    raise UserError(f"--encoder {spec}: {repo} has none of {', '.join(names)}")


def model_file(source: str, names: tuple[str, ...], spec: str) -> Path:
    folder = local_folder(source)
    if folder is None:
        return hub_file(source, names, spec)
    found = next((folder / n for n in names if (folder / n).is_file()), None)
    if found is None:
        raise UserError(f"--encoder {spec}: {folder} has none of {', '.join(names)}")
    return found


@contextlib.contextmanager
def torchvision_placeholders():
    """Let timm and open_clip import where torchvision is not installed.

    Both import torchvision's transforms and ops when they load, though building and running a model
    calls none of them (preprocessing here follows the model's config with PIL: preprocessing.py).
    On the project's CPU machines torchvision cannot be installed (FACTS.md, section 7). Where it is
    missing, its modules are stood in for, during the import only, by placeholders that raise if
    anything ever calls them; they are removed afterwards, so no other code sees a torchvision.
    transformers (which open_clip imports) caches whether torchvision is installed the first time it
    is asked; it is asked here, before the placeholders exist, or every later image processor would
    take the torchvision backend and fail to import.
    """
    import importlib.machinery
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        yield
        return
    from transformers.utils import is_torchvision_available

    is_torchvision_available()  # cached False now, while the answer is true

    class Missing(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return Missing(f"{cls.__name__}.{name}", (), {})

        def __call__(cls, *args, **kwargs):
            raise RuntimeError(f"{cls.__name__} needs torchvision, which is not installed")

    class MissingModule(type(sys)):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return Missing(f"{self.__name__}.{name}", (), {})

    class Finder:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "torchvision":
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            module = MissingModule(spec.name)
            module.__path__ = []
            return module

        def exec_module(self, module):
            pass

    finder = Finder()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n.partition(".")[0] == "torchvision"]:
            del sys.modules[name]


def import_optional(family: str):
    """timm or open_clip, or one line naming the package to install."""
    try:
        with torchvision_placeholders():
            import timm

            if family == "open_clip":
                import open_clip

                return open_clip
            return timm
    except ModuleNotFoundError as e:
        if e.name and e.name.partition(".")[0] in ("timm", "open_clip", "ftfy", "regex"):
            raise UserError(f"{family} encoders need the package {PACKAGES[family]} (pip install --no-deps "
                            f"{PACKAGES[family]}{' timm ftfy' if family == 'open_clip' else ''}; README: Concepts "
                            "from the vision tower)") from None
        raise


# ---------------------------------------------------------------------------------------------------
# The families
# ---------------------------------------------------------------------------------------------------


def load_hf(source: str):
    """CLIP / SigLIP checkpoints: only their vision tower; anything else: AutoModel. Preprocessing: the
    checkpoint's own image processor, with transformers' PIL backend (the same pixels on every machine)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    from .model import IMAGE_BACKEND

    spec = f"hf:{source}"
    try:
        config = AutoConfig.from_pretrained(source)
        processor = AutoImageProcessor.from_pretrained(source, backend=IMAGE_BACKEND)
    except (OSError, ValueError) as e:
        raise UserError(f"--encoder {spec}: cannot load its config or image processor ({first_line(e)})") from None
    kind = config.model_type
    if kind in ("clip", "clip_vision_model"):
        from transformers import CLIPVisionModelWithProjection as cls
    elif kind in ("siglip", "siglip_vision_model"):
        from transformers import SiglipVisionModel as cls
    else:
        cls = AutoModel
    if kind in ("clip", "siglip"):  # a whole image-text model: its vision tower's own config
        vision = config.vision_config
        if kind == "clip":
            vision.projection_dim = config.projection_dim  # the vision config's own says 512 whatever the model has
        config = vision
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    # transformers reports the weights it could not place key by key (a whole CLIP or SigLIP checkpoint's text
    # tower, which this model leaves out, is hundreds of them) and loads on; check_loading_info says it in one line
    # instead, and refuses what would leave part of the model random.
    hf_logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(source, config=config, output_loading_info=True)
    except Exception as e:  # a missing or foreign checkpoint: the library's first line says which
        raise UserError(f"--encoder {spec}: cannot load the model "
                        f"({first_line(e).replace(' For details look at the above report!', '')})") from None
    finally:
        hf_logging.set_verbosity(before)
    check_loading_info(info, spec, whole_image_text=kind in ("clip", "siglip"))
    return model, HFPreprocess(processor), {"name": kind}


SHOWN_KEYS = 3  # weight names quoted in a loading report's one line


def check_loading_info(info: dict, spec: str, whole_image_text: bool) -> None:
    """Refuse a checkpoint that lacks weights the model needs (they would stay random: vectors partly of noise);
    name the checkpoint's weights the model does not use, unless it is a whole image-text model (the text tower's
    are expected)."""
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ())
    for keys, what in ((missing, "are missing from its checkpoint"),
                       (mismatched, "have another shape in its checkpoint")):
        if keys:
            raise UserError(f"--encoder {spec}: {len(keys)} weights of the model {what} (first: "
                            f"{', '.join(keys[:SHOWN_KEYS])}): its vectors would come partly from random weights; "
                            "give a complete checkpoint of this model")
    unused = sorted(info.get("unexpected_keys") or ())
    if unused and not whole_image_text:
        log(f"--encoder {spec}: {len(unused)} weights of its checkpoint are not part of the image model and are left "
            f"out (first: {', '.join(unused[:SHOWN_KEYS])})")


class HFPreprocess:
    def __init__(self, processor):
        self.processor = processor

    def __call__(self, images: list):
        return self.processor(images=images, return_tensors="pt")["pixel_values"]


def load_open_clip(source: str):
    """The image tower of an open_clip model (open_clip_config.json + weights), built by open_clip itself;
    the text tower is never built, so BiomedCLIP needs no text model from the hub."""
    spec = f"open_clip:{source}"
    source = source.removeprefix("hf-hub:").removeprefix("local-dir:")
    config_path = model_file(source, ("open_clip_config.json",), spec)
    weights_path = model_file(source, ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                                       "open_clip_pytorch_model.bin"), spec)
    open_clip = import_optional("open_clip")
    from open_clip.model import _build_vision_tower

    config = json.loads(config_path.read_text())
    model_cfg = config.get("model_cfg", config)
    visual = _build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"], model_cfg.get("quick_gelu", False))
    state = open_clip.factory.load_state_dict(str(weights_path))
    state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    try:
        visual.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"--encoder {spec}: the weights do not fit the image tower of its config "
                        f"({first_line(e)})") from None
    image_size = model_cfg["vision_cfg"].get("image_size", 224)
    from .preprocessing import from_open_clip_config

    preprocess = from_open_clip_config(config.get("preprocess_cfg", {}), image_size)
    name = model_cfg["vision_cfg"].get("timm_model_name") or f"vit-{model_cfg['vision_cfg'].get('width')}"
    return visual, preprocess, {"name": name}


def load_timm(source: str):
    """A timm backbone without its classifier: a timm model name (weights from the hub), a hub ID, or a
    folder as timm saves one (config.json with `architecture` and `pretrained_cfg`, model.safetensors)."""
    timm = import_optional("timm")
    spec = f"timm:{source}"
    folder = local_folder(source)
    try:
        if folder is not None:
            config = json.loads(model_file(source, ("config.json",), spec).read_text())
            weights = model_file(source, ("model.safetensors", "pytorch_model.bin"), spec)
            model = timm.create_model(config["architecture"], pretrained=True, num_classes=0,
                                      pretrained_cfg_overlay={**config.get("pretrained_cfg", {}), "file": str(weights)},
                                      **{k: v for k, v in config.get("model_args", {}).items() if k != "num_classes"})
            name = config["architecture"]
        else:
            name = source.removeprefix("hf-hub:")
            model = timm.create_model(("hf-hub:" + name) if "/" in name else name, pretrained=True, num_classes=0)
    except UserError:
        raise
    except Exception as e:  # no such model name, weights that do not fit, not cached offline
        raise UserError(f"--encoder {spec}: cannot build or load the model ({first_line(e)})") from None
    from .preprocessing import from_timm_config

    preprocess = from_timm_config(timm.data.resolve_model_data_config(model))
    return model, preprocess, {"name": name}


LOADERS = {"hf": load_hf, "open_clip": load_open_clip, "timm": load_timm}


# ---------------------------------------------------------------------------------------------------
# LLaVA's vision tower
# ---------------------------------------------------------------------------------------------------


def vision_encoder_from(model, processor, pooling: str = "mean") -> Encoder:
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
    import torch

    device = next(p.device for p in tower.parameters())
    preprocess = HFPreprocess(processor.image_processor)
    pixels = preprocess([blank_image()])
    # The fingerprint tells two LLaVA checkpoints of the same shape apart; taken in bf16, the coarsest
    # precision the tower runs in, so an index embedded in bf16 on a GPU accepts queries embedded in fp32
    # on a CPU.
    info = {"name": config.vision_config.model_type, "feature_layer": int(config.vision_feature_layer),
            "drop_cls": config.vision_feature_select_strategy == "default",
            "dim": int(config.vision_config.hidden_size), "source": "llava",
            "weights": weights_fingerprint(tower, cast=torch.bfloat16),
            "image_size": [int(pixels.shape[2]), int(pixels.shape[3])]}
    return Encoder("llava", tower, preprocess, pooling, device, info)


def load_vision_encoder(base_model_path: str, device: str = "auto", dtype: str = "auto",
                        pooling: str = "mean") -> Encoder:
    """Load the base model (model.load_base_model) and keep only its vision tower (no adapter needed)."""

    from .model import load_base_model, load_processor, resolve_device_and_dtype, target_device

    device_map, torch_dtype = resolve_device_and_dtype(device, dtype)
    target = target_device(device_map)
    # Only the tower (0.3 B parameters) goes to the GPU; the language model (16 GB for the 8B one) is
    # read into host memory and freed at once, so a small card is enough.
    device_map = {"model.vision_tower": target, "model.multi_modal_projector": "cpu", "model.language_model": "cpu",
                  "lm_head": "cpu"}
    processor = load_processor(base_model_path)
    model = load_base_model(base_model_path, device_map, torch_dtype, load_in_4bit=False)
    encoder = vision_encoder_from(model, processor, pooling)
    encoder.model.eval()
    del model
    return encoder


# ---------------------------------------------------------------------------------------------------
# Vectors
# ---------------------------------------------------------------------------------------------------


def pooled_features(encoder: Encoder, pixel_values):
    """(batch, dim) float32 on the CPU, L2-normalised: the encoder's image embedding, pooled as asked."""
    import torch

    dtype = next(encoder.model.parameters()).dtype
    with torch.inference_mode():
        x = pixel_values.to(encoder.device, dtype, non_blocking=True)
        vectors = POOL[encoder.family](encoder, x).float()
        return torch.nn.functional.normalize(vectors, dim=-1).cpu()


def pool_llava(encoder: Encoder, x):
    out = encoder.model(x, output_hidden_states=True)
    hidden = out.hidden_states[encoder.info["feature_layer"]]
    if encoder.pooling == "cls":
        return hidden[:, 0]
    return (hidden[:, 1:] if encoder.info["drop_cls"] else hidden).mean(dim=1)


def pool_hf(encoder: Encoder, x):
    out = encoder.model(pixel_values=x)
    hidden = out.last_hidden_state
    if encoder.pooling == "default":
        embeds = getattr(out, "image_embeds", None)  # CLIP: the projected embedding
        if embeds is None:
            embeds = getattr(out, "pooler_output", None)  # SigLIP's attention pool, DINOv2's normed CLS
        if embeds is not None:
            return embeds.flatten(1)
    if hidden.dim() == 4:  # convolutional backbones: (batch, channels, height, width)
        return hidden.mean(dim=(2, 3))
    if encoder.pooling == "cls":
        return hidden[:, 0]
    return hidden.mean(dim=1)


def pool_open_clip(encoder: Encoder, x):
    return encoder.model(x)


def pool_timm(encoder: Encoder, x):
    if encoder.pooling == "default":
        return encoder.model(x)  # num_classes=0: the model's own global pool (and head norm)
    features = encoder.model.forward_features(x)
    if features.dim() == 4 and encoder.pooling == "gem":
        return features.clamp(min=1e-6).pow(GEM_P).mean(dim=(2, 3)).pow(1.0 / GEM_P)
    if features.dim() == 4:
        return features.mean(dim=(2, 3))
    if encoder.pooling == "gem":
        raise UserError("--pooling gem needs a convolutional backbone (its features are a grid)")
    return features.mean(dim=1)


POOL = {"llava": pool_llava, "hf": pool_hf, "open_clip": pool_open_clip, "timm": pool_timm}


class PixelCollate(Collate):
    """Images -> pixel values only (no prompt) in the DataLoader workers; a bad image fails alone."""

    def __init__(self, preprocess):
        self.preprocess = preprocess

    def process(self, images: list) -> dict:
        return {"pixel_values": self.preprocess(images)}
