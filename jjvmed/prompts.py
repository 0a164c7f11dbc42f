"""What the model is asked, and how its answers are read: prompt templates, instructions, answer
openings, answer lengths, and the readers that turn a raw answer into a caption or concept phrases.

Kept together because they are one protocol: the adapter was trained on these exact instructions
and answer openings (FACTS.md section 2), and the readers must recognise what the prompts ask for.
Fine-tuning builds its training answers from the same constants.
"""

from __future__ import annotations

import re

from .cui_mapper import normalize
from .errors import UserError

# The original tool's answer lengths, in tokens.
MAX_NEW_TOKENS = {"caption": 100, "concepts": 150}

# `vicuna` is the adapter's training format; `llama3` is the base model's native chat format.
# The tokenizer adds <|begin_of_text|> itself.
PROMPT_TEMPLATES = {
    "vicuna": "USER: <image>\n{instruction}\nASSISTANT:{prefill}",
    "llama3": (
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\n{instruction}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n{prefill}"
    ),
}
LANGUAGES = ("es", "en")

# (task, language) -> instruction. The Spanish ones are the adapter's exact training instructions.
INSTRUCTIONS = {
    ("caption", "es"): "¿Cuál es la descripción o el pie de foto de esta imagen médica?",
    ("caption", "en"): "What is the caption of this medical image?",
    ("concepts", "es"): "Enumera los conceptos médicos clave (CUIs) observados o inferidos en esta imagen.",
    ("concepts", "en"): "List the key medical concepts (CUIs) observed or inferred in this image.",
}

# The opening of the trained concept answer. Concept prompts end with it so the model goes straight
# into the list. Training answers followed "ASSISTANT:" after one space, so the prefill keeps that space.
ANSWER_PREFIXES = {
    ("concepts", "es"): "Los conceptos médicos clave son:",
    ("concepts", "en"): "The key medical concepts are:",
}
# The trained answer for an image without concepts.
NO_CONCEPTS_ANSWER = "ningún concepto médico específico fue identificado"

# The readers below recognise the openings above (with or without article and verb, with or without
# accents) and the mixed template's "Descripción: ...\nConceptos médicos clave: ..." answer.
CONCEPT_LIST_OPENING = (r"(?:(?:los|the)\s+)?(?:conceptos\s+m[eé]dicos\s+clave|key\s+medical\s+concepts)"
                        r"\s*(?:son|are)?\s*:")
NO_CONCEPT_ANSWERS = re.compile(
    r"ning[uú]n\s+concepto\s+m[eé]dico\s+espec[ií]fico\s+fue\s+identificado|no\s+specific\s+medical\s+concepts?\s+"
    r"(?:was|were)\s+identified",
    re.IGNORECASE,
)


def build_prompt(template: str, instruction: str, prefill: str = "") -> str:
    """The full prompt for one image; `prefill` is text the answer is forced to start with."""
    if template not in PROMPT_TEMPLATES:
        raise UserError(f"unknown prompt template {template!r}; choose from {sorted(PROMPT_TEMPLATES)}")
    if prefill and template == "vicuna":
        prefill = " " + prefill
    return PROMPT_TEMPLATES[template].format(instruction=instruction, prefill=prefill)


def resolve_template(template: str, adapter: str | None) -> str:
    """`auto` = the adapter's training format when an adapter is loaded, else the native one."""
    if template != "auto":
        return template
    return "vicuna" if adapter else "llama3"


def task_prompt(task: str, template: str, language: str, instruction: str | None = None) -> str:
    """The prompt of a task: the built-in instruction and answer opening, or the user's own instruction
    (then without an opening: the model answers as the user's words ask)."""
    if instruction:
        return build_prompt(template, instruction)
    return build_prompt(template, INSTRUCTIONS[(task, language)], ANSWER_PREFIXES.get((task, language), ""))


# ---------------------------------------------------------------------------------------------
# Retrieval-augmented captions (--method rag)
# ---------------------------------------------------------------------------------------------

# The captions of the training images nearest to this one go before the caption question, under a line
# that says they describe other, similar images: the model may borrow their words and findings, and is
# told they are not this image's. The question after them is the adapter's own training instruction.
CONTEXT_MARK = "{context}"  # where the retrieved captions go in a RAG instruction (also in --prompt)
RAG_CONTEXT = {
    "es": "Pies de foto de imágenes médicas parecidas a esta (describen otras imágenes, no esta):\n" + CONTEXT_MARK,
    "en": "Captions of medical images similar to this one (they describe other images, not this one):\n"
          + CONTEXT_MARK,
}
CONTEXT_ITEM = "- {caption}"  # one retrieved caption, one line each, nearest first
# Words of a retrieved caption kept in the prompt: the 99th percentile of ROCO's 8,180 validation captions
# is 75 words (median 16, longest 348), so this cuts under 1% of them and bounds the prompt's length.
MAX_CONTEXT_WORDS = 100


def rag_template(template: str, language: str, instruction: str | None = None) -> str:
    """The full RAG prompt with CONTEXT_MARK where each image's retrieved captions go: the built-in context
    line and caption question, or the user's own instruction (which must hold CONTEXT_MARK)."""
    if instruction is None:
        instruction = RAG_CONTEXT[language] + "\n" + INSTRUCTIONS[("caption", language)]
    elif CONTEXT_MARK not in instruction:
        raise UserError(f"--prompt with --method rag must say where the retrieved captions go: put {CONTEXT_MARK} "
                        "in it")
    return build_prompt(template, instruction)


def rag_prompt(template: str, captions: list[str]) -> str:
    """One image's prompt: the RAG template with its neighbours' captions (whitespace collapsed, each cut at
    MAX_CONTEXT_WORDS words; empty ones left out) in place of CONTEXT_MARK."""
    lines = [CONTEXT_ITEM.format(caption=" ".join(c.split()[:MAX_CONTEXT_WORDS])) for c in captions if c.strip()]
    return template.replace(CONTEXT_MARK, "\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Reading captions
# ---------------------------------------------------------------------------------------------

# Openings the model may echo before the caption: template words and trained answer labels.
CAPTION_PREFIXES = re.compile(
    r"^\s*(?:(?:ASSISTANT|USER|assistant|Caption|Pie de foto|Descripción|Description|Answer|Respuesta)\s*:\s*)+",
    re.IGNORECASE,
)
QUOTES = "\"'“”‘’«»"


def clean_caption(text: str) -> str:
    """Strip echoed prompt parts and answer prefixes, quotes, and collapse all whitespace to single spaces."""
    text = text.split("USER:")[0]  # the model sometimes starts a new turn
    text = re.split(r"\n\s*" + CONCEPT_LIST_OPENING, text, flags=re.IGNORECASE)[0]
    text = " ".join(text.split())
    text = CAPTION_PREFIXES.sub("", text).strip()
    if len(text) >= 2 and text[0] in QUOTES and text[-1] in QUOTES:
        text = text[1:-1].strip()
    return text


# ---------------------------------------------------------------------------------------------
# Reading concept answers: phrases for the mapper
# ---------------------------------------------------------------------------------------------

ANSWER_WRAPPERS = re.compile(
    CONCEPT_LIST_OPENING + r"|^\s*(?:ASSISTANT|USER)\s*:|^\s*(?:concepts?|conceptos?|cuis?)\s*:",
    re.IGNORECASE | re.MULTILINE,
)
BULLET = re.compile(r"^\s*(?:[-*•·]+|\d+[.)]|[a-z][.)])\s+", re.IGNORECASE)
COMMA_GUARD = "\x00"


def parse_answer(text: str, mapper=None) -> list[str]:
    """Ordered, de-duplicated concept phrases from a raw answer.

    Splits on newlines, semicolons and commas, except commas inside a name the mapping file knows
    (`Foramen Ovale, Patent`). For the mixed caption+concepts answer, only the concept part is used.
    """
    text = text.split("USER:")[0]
    parts = re.split(CONCEPT_LIST_OPENING, text, flags=re.IGNORECASE)
    if len(parts) > 1:
        text = parts[-1]
    text = re.sub(r"^\s*(?:descripci[oó]n|description)\s*:.*$", "", text, flags=re.IGNORECASE | re.MULTILINE)
    text = ANSWER_WRAPPERS.sub("\n", text)
    text = NO_CONCEPT_ANSWERS.sub("\n", text)
    if mapper is not None and mapper.comma_names is not None:
        text = mapper.comma_names.sub(lambda m: m.group(0).replace(",", COMMA_GUARD), text)
    phrases: list[str] = []
    seen: set[str] = set()
    for line in text.splitlines():
        line = BULLET.sub("", line)
        for piece in re.split(r"[;,]", line):
            phrase = clean_phrase(piece.replace(COMMA_GUARD, ","))
            key = normalize(phrase)
            if phrase and key and key not in seen:
                seen.add(key)
                phrases.append(phrase)
    return phrases


def clean_phrase(piece: str) -> str:
    piece = BULLET.sub("", piece.strip())
    piece = piece.strip(" \t\"'“”‘’«»`*.·:-")
    return " ".join(piece.split())
