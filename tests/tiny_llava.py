"""Build a tiny random LLaVA with the same classes and files as xtuner/llava-llama-3-8b-v1_1-transformers.

The folder it writes is loaded by the project with exactly the calls used for the 8B model:
a Llama text model, a CLIP ViT vision tower at 336 px / patch 14 (576 image tokens), a byte-level
BPE tokenizer with the Llama-3 special tokens plus `<image>` and `<pad>`, a CLIP image processor,
and -- like the real repo -- no `processor_config.json`, no chat template, and a generation config
that lists only `<|end_of_text|>` as eos. Runs offline in a few seconds (measured on a 2-core machine:
2.5 s to build and save, 4 s from the command line; the tokenizer training is most of it; a loaded
machine can take ten times that).

    python tests/tiny_llava.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# Words the tokenizer should know as whole pieces: the instructions, the answer wrappers and some
# radiology vocabulary, so generations look like text and fine-tuning targets are short.
CORPUS = """
USER: ASSISTANT: user assistant
¿Cuál es la descripción o el pie de foto de esta imagen médica?
Enumera los conceptos médicos clave (CUIs) observados o inferidos en esta imagen.
Describe esta imagen médica en detalle y lista los conceptos médicos clave.
Los conceptos médicos clave son: ningún concepto médico específico fue identificado
Descripción: Conceptos médicos clave:
What is the caption of this medical image? List the key medical concepts in this image.
The key medical concepts are: Caption:
Computed tomography of the chest showing a mass in the right upper lobe.
Magnetic resonance imaging of the brain with contrast. Ultrasonography of the abdomen.
Plain x-ray of the pelvis. Angiogram of the coronary artery. Lung, Kidney, Liver, Heart, Brain.
X-Ray Computed Tomography; Magnetic Resonance Imaging; Chest; Abdomen; Pelvis; Breast.
red green blue yellow circle square triangle cross left right upper lower
tomografía computarizada resonancia magnética radiografía ecografía tórax abdomen
"""


def train_tokenizer(extra_text: list[str] | None = None, vocab_size: int = 1024):
    """A byte-level BPE with Llama-3's special tokens appended after the learned vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    lines = CORPUS.strip().splitlines() * 20 + list(extra_text or [])
    tok.train_from_iterator(lines, trainer=trainer)
    # Appended in the 8B model's order: the Llama-3 specials, then <image>, then <pad>.
    tok.add_special_tokens(LLAMA3_SPECIALS + ["<image>", "<pad>"])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<pad>",
        padding_side="right",
        model_max_length=8192,
    )


def tiny_config(tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2):
    """LlavaConfig shaped like the 8B one, shrunk. Hidden >= 64 keeps bitsandbytes' CPU kernel happy.
    `heads` / `kv_heads`: the text model's query and KV heads (the 8B has 32 and 8, a ratio of 4)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vocab = (len(tokenizer) + 63) // 64 * 64  # padded, as the 8B vocab is padded to 128320
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        rope_theta=500000.0,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|begin_of_text|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|end_of_text|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=336,
        patch_size=14,
        projection_dim=hidden,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=576,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def llava_llama3_8b_config():
    """The config of xtuner/llava-llama-3-8b-v1_1-transformers, for random-weight benchmarks."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=128320, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001, pad_token_id=128258,
    )
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=128257, image_seq_length=576,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        pad_token_id=128258, tie_word_embeddings=False,
    )


def image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )


def build_tiny_llava(out_dir: str | Path, seed: int = 0, extra_text: list[str] | None = None,
                     layers: int = 2, heads: int = 4, kv_heads: int = 2) -> Path:
    """Write a tiny random LLaVA to out_dir, laid out like the 8B repo, and return the folder."""
    import torch
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(extra_text)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_config(tokenizer, layers=layers, heads=heads, kv_heads=kv_heads)).eval()
    with torch.no_grad():
        # A wide lm_head gives peaked, well-separated logits: greedy decoding is then stable
        # under the tiny float differences of padding and batching, and the random model writes
        # text instead of stopping at once. The special tokens keep small rows, so they are
        # only produced once fine-tuning asks for them.
        first_special = tokenizer.convert_tokens_to_ids(LLAMA3_SPECIALS[0])
        model.lm_head.weight.normal_(0.0, 1.0)
        model.lm_head.weight[first_special:].normal_(0.0, 0.02)
    # The 8B generation config names only <|end_of_text|>; keeping that trap here makes the tests
    # check that the engine adds <|eot_id|> itself.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor().save_pretrained(out)  # preprocessor_config.json, and no processor_config.json
    for name in ("processor_config.json", "chat_template.json", "chat_template.jinja"):
        (out / name).unlink(missing_ok=True)
    # The class names the 8B repo's files carry.
    patch_json(out / "preprocessor_config.json", processor_class="LlavaProcessor")
    patch_json(out / "tokenizer_config.json", tokenizer_class="PreTrainedTokenizerFast")
    return out


def patch_json(path: Path, **values) -> None:
    data = json.loads(path.read_text())
    data.update(values)
    path.write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    print(build_tiny_llava(sys.argv[1] if len(sys.argv) > 1 else "tiny-llava"))
