"""Concept phrases, as the model writes them (English or Spanish), to the UMLS CUIs of a mapping file.

Its own module because it is the part of the tool that most decides the concept score, and it is
used without the model: by generate_concepts.py (also in --from_natural_csv mode) and its tests.

    mapper = CuiMapper.from_csv("data/cui_names.csv")
    mapper.lookup("tomografía computarizada")   # Match(cui='C0040405', ..., method='alias')
    phrases = prompts.parse_answer(raw_text, mapper)    # ordered, de-duplicated concept phrases
    cuis, unmapped = mapper.map_phrases(phrases)

Matching goes from most to least certain, and stops at the first level that gives one CUI:
CUI token, exact name, normalized name (case, accents, punctuation, hyphens, British spelling,
plurals), lenient name (UMLS qualifiers like "Structure of" or "(disorder)" dropped), word order,
anatomy form ("cyst of the spleen", "spleen cyst" -> "Splenic cyst"), built-in
synonyms/abbreviations/Spanish names, word-by-word translation and abbreviation expansion
(SPECT, MRCP, CTA, TEE, AP ...), a phrase made of several known concepts ("chest CT"), and last a
fuzzy match for typos.
A key that two CUIs share at the same level is ambiguous and maps to nothing at that level.
"""

from __future__ import annotations

import csv
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import UserError
from .files import write_csv_atomic

CUI_RE = re.compile(r"\bC\d{7}\b", re.IGNORECASE)
NAME_COLUMNS = ("name", "canonical name", "canonical_name", "preferred_name", "preferred name", "str")
SYNONYM_COLUMNS = ("synonyms", "synonym", "aliases")

# Fuzzy matching is for typos only. Medical names are full of near-twins (hypoplasia/hyperplasia,
# axilla/maxilla, ascending/descending) and a plain similarity cut-off that catches typos also maps
# concepts missing from the file onto their twins: on the ROCOv2 list a ratio of 90 gave a wrong CUI
# for 10% of held-out names. So a candidate (pre-selected by rapidfuzz ratio >= FUZZY_PRESELECT)
# is accepted only if it differs from the phrase in exactly one word, by one edit or one swap of
# neighbouring letters, keeping the first letter, in a word of at least FUZZY_MIN_WORD letters.
# tests/test_cui_mapper.py measures both sides on the ROCOv2 list.
FUZZY_PRESELECT = 70.0
FUZZY_MIN_WORD = 5

# Phrases that name no concept: the model's filler and the trained "no concept" answer.
NON_CONCEPTS = {
    "image", "imagen", "medical image", "imagen medica", "patient", "paciente", "normal", "unknown",
    "desconocido", "finding", "hallazgo", "none", "ninguno", "ninguna", "n a", "na", "no", "other", "otro",
    "etc", "concept", "concepto", "medical concept", "concepto medico", "key medical concept",
    "concepto medico clave", "cui", "figure", "figura", "scan", "view", "study", "estudio",
    "ningun concepto medico especifico fue identificado", "no specific medical concept was identified",
    "no medical concept", "not applicable",
}

# Built-in synonyms, abbreviations and Spanish names, keyed by CUI. One only applies when the
# mapping file holds that CUI, so it can never produce a code the file does not know.
ALIASES: dict[str, list[str]] = {
    # imaging modalities (the secondary-score list)
    "C0040405": ["ct", "ct scan", "cat scan", "computed tomography", "computerized tomography", "ct imaging",
                 "tomografia computarizada", "tomografia computada", "tomografia axial computarizada", "tac", "tc"],
    "C0024485": ["mri", "mr", "mr imaging", "mri scan", "magnetic resonance", "nuclear magnetic resonance", "nmr",
                 "resonancia magnetica", "resonancia magnetica nuclear", "rm", "rmn"],
    "C0041618": ["us", "ultrasound", "ultrasonogram", "sonography", "sonogram", "echography", "ecografia",
                 "ultrasonido", "ultrasonografia"],
    "C1306645": ["x ray", "xray", "radiograph", "radiography", "plain radiograph", "plain film", "plain radiography",
                 "conventional radiograph", "roentgenogram", "radiografia", "radiografia simple", "rx"],
    "C0002978": ["angiography", "arteriography", "arteriogram", "digital subtraction angiography", "dsa",
                 "angiografia", "arteriografia"],
    "C0032743": ["pet", "pet scan", "positron emission tomography", "tomografia por emision de positrones"],
    "C0920367": ["oct", "optical coherence tomography", "tomografia de coherencia optica"],
    # A specific echo technique falls back to Echocardiography when the file lacks its own CUI
    # (a name in the file outranks any alias, so a file that has it gets it).
    "C0013516": ["echocardiogram", "echo", "ecocardiografia", "ecocardiograma", "transthoracic echocardiography",
                 "transesophageal echocardiography", "ecocardiografia transtoracica",
                 "ecocardiografia transesofagica"],
    "C0243032": ["mra", "mr angiography", "mr angiogram", "magnetic resonance angiogram", "angiorresonancia"],
    # nuclear medicine
    "C0034606": ["scintigraphy", "scintigram", "scintiscan", "nuclear medicine", "nuclear medicine imaging",
                 "nuclear medicine scan", "nuclear scan", "isotope scan", "radioisotope scan", "bone scan",
                 "bone scintigraphy", "skeletal scintigraphy", "gammagrafia", "gammagrafia osea",
                 "medicina nuclear"],
    "C1699633": ["pet ct", "pet tc", "petct", "positron emission tomography computed tomography"],
    "C3472245": ["spect ct", "spect tc"],
    # cholangiography and venography
    "C0994163": ["magnetic resonance cholangiography", "mr cholangiography", "colangiorresonancia",
                 "colangiopancreatografia por resonancia magnetica"],
    "C1690005": ["mr venography", "mrv", "magnetic resonance venography", "venorresonancia"],
    "C0449900": ["contrast", "with contrast", "contrast enhanced", "contrast medium", "contrast agent", "contraste",
                 "medio de contraste", "con contraste"],
    # body regions (the secondary-score list)
    "C0817096": ["thorax", "thoracic", "torax", "pecho", "toracico"],
    "C0000726": ["abdominal", "abdomen"],
    "C0030797": ["pelvic", "pelvis", "pelvico"],
    "C0006141": ["mammary", "mama", "seno", "mamario"],
    "C0037949": ["spine", "spinal column", "backbone", "columna vertebral", "raquis"],
    "C0037303": ["skull", "cranium", "craneo"],
    "C1140618": ["upper limb", "arm", "extremidad superior", "miembro superior", "brazo"],
    "C0023216": ["lower limb", "leg", "extremidad inferior", "miembro inferior", "pierna"],
    # frequent organs and structures
    "C0006104": ["encephalon", "cerebro", "encefalo"],
    "C0024109": ["lung", "pulmon"],
    "C0023884": ["hepatic", "higado"],
    "C0022646": ["renal", "rinon"],
    "C0018787": ["cardiac", "corazon"],
    "C0037993": ["splenic", "bazo"],
    "C0030274": ["pancreas"],
    "C0005682": ["bladder", "vejiga", "vejiga urinaria"],
    "C0014876": ["oesophagus", "esofago"],
    "C3714551": ["stomach", "estomago"],
    "C0021853": ["intestine", "bowel", "intestino"],
    "C0003483": ["aorta"],
    "C0003842": ["artery", "arteria"],
    "C0042449": ["vein", "vena"],
    "C0015811": ["thigh bone", "femur"],
    "C0027530": ["cuello"],
    "C0728985": ["c spine", "columna cervical"],
    "C3887615": ["lumbar spine", "l spine", "columna lumbar"],
    "C0581269": ["thoracic spine", "dorsal spine", "columna toracica", "columna dorsal"],
    "C0025066": ["mediastino"],
    "C0040578": ["windpipe", "traquea"],
    "C0006255": ["bronchus", "bronquio"],
    "C0040132": ["thyroid", "tiroides"],
    "C0033572": ["prostata"],
    "C0042149": ["womb", "utero"],
    "C0029939": ["ovario"],
    "C0034896": ["recto"],
    "C0013303": ["duodeno"],
    "C1281569": ["colon"],
    "C0021852": ["small intestine", "small bowel", "intestino delgado"],
    "C0021851": ["large bowel", "intestino grueso"],
    "C0019552": ["hip", "cadera"],
    "C0022745": ["knee", "rodilla"],
    "C0037004": ["hombro"],
    "C0016504": ["pie"],
    "C0003087": ["ankle", "tobillo"],
    "C0013770": ["elbow", "codo"],
    "C0035561": ["rib", "costilla"],
    "C0008913": ["clavicle", "collarbone", "clavicula"],
    "C0036277": ["scapula", "shoulder blade", "escapula"],
    "C0024204": ["lymph node", "ganglio linfatico"],
    "C0085590": ["catheter", "cateter"],
    "C0038257": ["stent"],
    # frequent findings
    "C0027651": ["tumor", "neoplasm", "neoplasia", "tumoracion"],
    "C0028259": ["nodulo"],
    "C0000833": ["absceso"],
    "C0019080": ["bleeding", "hemorragia", "sangrado"],
    "C0013604": ["edema"],
    "C0002940": ["aneurisma"],
    "C1261287": ["narrowing", "estenosis"],
    "C0040053": ["trombosis"],
    "C0087086": ["clot", "blood clot", "trombo"],
    "C0013922": ["embolia"],
    "C0032326": ["neumotorax"],
    "C0032227": ["pleural effusion", "derrame pleural"],
    "C0031039": ["derrame pericardico"],
    "C0003962": ["ascitis"],
    "C0020295": ["hidronefrosis"],
    "C0032285": ["neumonia"],
    "C0034065": ["pe", "pulmonary emboli", "pulmonary embolus", "embolia pulmonar", "tromboembolismo pulmonar",
                 "tep"],
    "C0021308": ["infarct", "infarto"],
    "C0027051": ["heart attack", "infarto de miocardio", "infarto agudo de miocardio"],
    "C0007785": ["cerebral infarct", "infarto cerebral"],
    "C0008350": ["gallstone", "colelitiasis"],
    "C0022650": ["kidney stone", "renal calculus", "nephrolithiasis", "litiasis renal", "calculo renal"],
    "C0012359": ["dilatation", "dilation", "dilatacion"],
    "C0006267": ["bronquiectasia"],
    "C1956089": ["bone spur", "osteofito"],
    "C0038525": ["sah", "hemorragia subaracnoidea"],
    "C0151699": ["intracranial bleed", "hemorragia intracraneal"],
    "C0016658": ["fracture", "bone fracture", "fractura"],
    "C0221198": ["lesion"],
}

# Word-level knowledge used when a whole phrase is unknown: abbreviations to words, Spanish words
# to English ones. Rewritten phrases go through the name indexes again, so they only ever reach
# concepts that the mapping file names.
WORD_EXPANSIONS = {
    "ct": "computed tomography", "mr": "magnetic resonance", "mri": "magnetic resonance imaging",
    "pet": "positron emission tomography", "cxr": "chest x ray", "axr": "abdominal x ray", "ap": "anteroposterior",
    "pa": "posteroanterior",
    # imaging techniques: nuclear medicine, cholangiography, angiography, contrast studies, endoscopy, echo
    "spect": "single photon emission computed tomography", "mrcp": "magnetic resonance cholangiopancreatography",
    "ercp": "endoscopic retrograde cholangiopancreatography", "ptc": "percutaneous transhepatic cholangiography",
    "cta": "computed tomography angiography", "mra": "magnetic resonance angiography",
    "mrv": "magnetic resonance venography", "dsa": "digital subtraction angiography",
    "ivu": "intravenous urography", "ivp": "intravenous pyelography", "hsg": "hysterosalpingography",
    "eus": "endoscopic ultrasound", "tee": "transesophageal echocardiography",
    "toe": "transesophageal echocardiography", "tte": "transthoracic echocardiography",
    "oct": "optical coherence tomography", "cbct": "cone beam computed tomography",
    "hrct": "high resolution computed tomography", "cect": "contrast enhanced computed tomography",
    "dwi": "diffusion weighted imaging",
    "lat": "lateral", "lt": "left", "rt": "right", "bil": "bilateral",
    "lll": "left lower lobe", "lul": "left upper lobe", "rll": "right lower lobe", "rul": "right upper lobe",
    "rml": "right middle lobe", "ivc": "inferior vena cava", "svc": "superior vena cava", "lv": "left ventricle",
    "rv": "right ventricle", "lad": "left anterior descending artery", "rca": "right coronary artery",
    "ica": "internal carotid artery", "eca": "external carotid artery", "cca": "common carotid artery",
    "mca": "middle cerebral artery", "aca": "anterior cerebral artery", "pca": "posterior cerebral artery",
    "sma": "superior mesenteric artery", "smv": "superior mesenteric vein", "ima": "inferior mesenteric artery",
    "cbd": "common bile duct", "tmj": "temporomandibular joint", "gb": "gallbladder", "ge": "gastroesophageal",
    "dvt": "deep vein thrombosis", "pe": "pulmonary embolism", "hcc": "hepatocellular carcinoma",
    "rcc": "renal cell carcinoma", "ild": "interstitial lung disease", "copd": "chronic obstructive lung disease",
    # Spanish -> English, accents already removed by normalize()
    "tomografia": "tomography", "computarizada": "computed", "resonancia": "resonance", "magnetica": "magnetic",
    "radiografia": "x ray", "ecografia": "ultrasound", "angiografia": "angiography", "torax": "chest",
    "pulmon": "lung", "pulmonar": "pulmonary", "higado": "liver", "hepatico": "hepatic", "hepatica": "hepatic",
    "rinon": "kidney", "corazon": "heart", "cerebro": "brain", "cerebral": "cerebral", "craneo": "skull",
    "columna": "spine", "vertebral": "vertebral", "cervical": "cervical", "lumbar": "lumbar", "bazo": "spleen",
    "vejiga": "bladder", "estomago": "stomach", "intestino": "intestine", "delgado": "small", "grueso": "large",
    "arteria": "artery", "vena": "vein", "aortico": "aortic", "aortica": "aortic", "coronaria": "coronary",
    "carotida": "carotid", "derecho": "right", "derecha": "right", "izquierdo": "left", "izquierda": "left",
    "superior": "upper", "inferior": "lower", "lobulo": "lobe", "mama": "breast", "cuello": "neck",
    "cabeza": "head", "rodilla": "knee", "cadera": "hip", "hombro": "shoulder", "tobillo": "ankle", "pie": "foot",
    "mano": "hand", "muneca": "wrist", "codo": "elbow", "femur": "femur", "tibia": "tibia", "costilla": "rib",
    "derrame": "effusion", "pleural": "pleural", "masa": "mass", "quiste": "cyst", "fractura": "fracture",
    "tumor": "tumor", "nodulo": "nodule", "absceso": "abscess", "hemorragia": "hemorrhage", "edema": "edema",
    "estenosis": "stenosis", "aneurisma": "aneurysm", "trombosis": "thrombosis", "calcificacion": "calcification",
    "metastasis": "metastasis", "carcinoma": "carcinoma", "neumonia": "pneumonia", "neumotorax": "pneumothorax",
    "ganglio": "node", "linfatico": "lymph", "tiroides": "thyroid", "prostata": "prostate", "utero": "uterus",
    "ovario": "ovary", "recto": "rectum", "esofago": "esophagus", "traquea": "trachea", "bronquio": "bronchus",
    "pelvis": "pelvis", "abdomen": "abdomen", "contraste": "contrast", "cateter": "catheter", "tc": "ct",
    "gammagrafia": "scintigraphy", "vesicula": "gallbladder",
}

# Anatomical adjectives to their organ, and interchangeable finding words, for the anatomy-form
# key: "hepatic cyst", "cyst of the liver" and "Liver cyst" are one concept.
ORGAN_ADJECTIVES = {
    "hepatic": "liver", "renal": "kidney", "nephric": "kidney", "pulmonary": "lung", "pulmonic": "lung",
    "splenic": "spleen", "gastric": "stomach", "cardiac": "heart", "cerebral": "brain", "encephalic": "brain",
    "femoral": "femur", "tibial": "tibia", "fibular": "fibula", "humeral": "humerus", "ulnar": "ulna",
    "sacral": "sacrum", "mandibular": "mandible", "maxillary": "maxilla", "tracheal": "trachea",
    "bronchial": "bronchus", "laryngeal": "larynx", "pharyngeal": "pharynx", "esophageal": "esophagus",
    "duodenal": "duodenum", "jejunal": "jejunum", "ileal": "ileum", "cecal": "cecum", "colonic": "colon",
    "rectal": "rectum", "appendiceal": "appendix", "pancreatic": "pancreas", "intestinal": "intestine",
    "pericardial": "pericardium", "pleural": "pleura", "peritoneal": "peritoneum", "mediastinal": "mediastinum",
    "vesical": "bladder", "uterine": "uterus", "ovarian": "ovary", "testicular": "testis", "prostatic": "prostate",
    "mammary": "breast", "orbital": "orbit", "nasal": "nose", "lingual": "tongue", "aortic": "aorta",
    "arterial": "artery", "venous": "vein", "osseous": "bone", "muscular": "muscle", "cutaneous": "skin",
    "abdominal": "abdomen", "thoracic": "chest", "thorax": "chest", "pelvic": "pelvis", "vertebral": "vertebra",
    "spinal": "spine", "ventricular": "ventricle", "atrial": "atrium", "axillary": "axilla", "inguinal": "groin",
    "thyroidal": "thyroid",
}
FINDING_WORDS = {"infarct": "infarction", "tumor": "neoplasm", "neoplasia": "neoplasm", "stone": "calculus",
                 "dilation": "dilatation", "bleed": "hemorrhage", "bleeding": "hemorrhage"}
# "X of/in the Y" names the same concept as "Y X".
OF_WORDS = {"of", "in", "within", "involving", "affecting", "de", "del"}
# Direction pairs a file may spell as one word or two ("Anterior-Posterior", "anteroposterior").
JOINED_PAIRS = {("anterior", "posterior"): "anteroposterior", ("antero", "posterior"): "anteroposterior",
                ("posterior", "anterior"): "posteroanterior", ("postero", "anterior"): "posteroanterior"}

# Words that carry no concept of their own: ignored for word order and for multi-concept phrases.
FILLER_WORDS = {"of", "the", "a", "an", "in", "on", "at", "to", "with", "and", "or", "de", "del", "la", "el",
                "los", "las", "y", "con", "en", "scan", "image", "imaging", "view", "study", "showing", "projection",
                "plane"}
# UMLS qualifiers dropped by the lenient key ("Structure of X", "Entire X", "X (disorder)").
QUALIFIER_WORDS = {"structure", "entire", "disorder", "substance", "device", "finding", "procedure"}

IRREGULAR_SINGULARS = {
    "vertebrae": "vertebra", "metastases": "metastasis", "bronchi": "bronchus", "calculi": "calculus",
    "diverticula": "diverticulum", "emboli": "embolus", "thrombi": "thrombus", "nuclei": "nucleus", "foci": "focus",
    "alveoli": "alveolus", "villi": "villus", "fungi": "fungus", "pelves": "pelvis", "testes": "testis",
    "teeth": "tooth", "feet": "foot", "atria": "atrium", "septa": "septum", "ostia": "ostium", "ilia": "ilium",
    "apices": "apex", "cortices": "cortex", "vertices": "vertex", "appendices": "appendix", "menisci": "meniscus",
    "bases": "base", "children": "child", "women": "woman", "men": "man",
    "bronchiectases": "bronchiectasis", "atelectases": "atelectasis",
}
BRITISH = [(re.compile(p), r) for p, r in [
    (r"^haem", "hem"), (r"^anaem", "anem"), (r"aemi", "emi"), (r"^oedem", "edem"), (r"^oesoph", "esoph"),
    (r"^oestr", "estr"), (r"^paed", "ped"), (r"^foet", "fet"), (r"^caec", "cec"), (r"^coeli", "celi"),
    (r"orthopaed", "orthoped"), (r"gynaec", "gynec"), (r"oea$", "ea"), (r"haem", "hem"), (r"([^aeiou])our$", r"\1or"),
    (r"([tb])re$", r"\1er"), (r"sulph", "sulf"), (r"isation$", "ization"), (r"ised$", "ized"), (r"ise$", "ize"),
]]


def strip_accents(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def singular(word: str) -> str:
    """A rough singular: applied alike to names and phrases, so it only has to be consistent."""
    if word in IRREGULAR_SINGULARS:
        return IRREGULAR_SINGULARS[word]
    if len(word) <= 3 or word.endswith(("ss", "us", "is", "as", "ous")):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "ches", "shes")):
        return word[:-2]
    if word.endswith("oses") or word.endswith("eses"):
        return word[:-2] + "is"
    if word.endswith("ae"):
        return word[:-1]
    if word.endswith("s"):
        return word[:-1]
    return word


def american(word: str) -> str:
    for pattern, repl in BRITISH:
        word = pattern.sub(repl, word)
    return word


@lru_cache(maxsize=200_000)
def normal_word(word: str) -> str:
    return american(singular(word))


def tokens(text: str) -> list[str]:
    """Lower-case, accent-free, punctuation-free words, singular and in American spelling."""
    text = strip_accents(text).casefold().replace("'s ", " ")
    words = [normal_word(w) for w in re.sub(r"[^0-9a-z]+", " ", text).split()]
    for i in range(len(words) - 1, 0, -1):
        joined = JOINED_PAIRS.get((words[i - 1], words[i]))
        if joined:
            words[i - 1:i + 1] = [joined]
    return words


@lru_cache(maxsize=200_000)
def normalize(text: str) -> str:
    # Cached: 20,000 answers repeat the same few thousand phrases.
    return " ".join(tokens(text))


def lenient_key(text: str) -> str:
    # UMLS names bones "Bone structure of X": the model just says "X".
    text = re.sub(r"^\s*bone\s+structure\s+of\s+", "", text, flags=re.IGNORECASE)
    words = tokens(re.sub(r"\([^)]*\)", " ", text))
    return " ".join(w for w in words if w not in QUALIFIER_WORDS)


def bag_key(text: str) -> str:
    words = lenient_key(text).split()
    return " ".join(sorted({w for w in words if w not in FILLER_WORDS}))


def anatomy_key(text: str) -> str:
    """Finding-of-organ phrasings in one order: "cyst of the spleen", "splenic cyst" -> "spleen cyst".

    Order is kept ("Renal pelvis" is not "Pelvic kidney"): what follows "of"/"in" goes first, UMLS's
    inverted names are turned round ("Tomography, Emission-Computed, Single-Photon" -> "Single-Photon
    Emission-Computed Tomography"), organ adjectives become the organ.
    """
    text = " ".join(reversed(text.split(",")))
    words = [w for w in lenient_key(text).split() if w in OF_WORDS or w not in FILLER_WORDS]
    return " ".join(form_word(w) for w in invert_of(words))


def form_word(word: str) -> str:
    """One form per word: organ adjective -> organ, finding synonyms, the image -> its technique (-gram -> -graphy)."""
    word = ORGAN_ADJECTIVES.get(word, FINDING_WORDS.get(word, word))
    return word[:-4] + "graphy" if word.endswith("gram") and len(word) > 7 else word


def invert_of(words: list[str]) -> list[str]:
    for i, w in enumerate(words):
        if w in OF_WORDS:
            return invert_of(words[i + 1:]) + words[:i]
    return words


@dataclass(frozen=True)
class Match:
    cui: str
    name: str
    method: str  # cui | exact | normalized | lenient | word_order | anatomy | alias | rewritten | fuzzy


class KeyIndex:
    """key -> CUI, where a lower tier wins and two CUIs on the best tier make the key ambiguous."""

    def __init__(self):
        self.best: dict[str, tuple[int, set[str]]] = {}

    def add(self, key: str, cui: str, tier: int) -> None:
        if not key:
            return
        current = self.best.get(key)
        if current is None or tier < current[0]:
            self.best[key] = (tier, {cui})
        elif tier == current[0]:
            current[1].add(cui)

    def get(self, key: str) -> str | None:
        hit = self.best.get(key)
        return next(iter(hit[1])) if hit and len(hit[1]) == 1 else None

    def unique_keys(self) -> dict[str, str]:
        return {k: next(iter(c)) for k, (_, c) in self.best.items() if len(c) == 1}


class CuiMapper:
    """Indexes a CUI name file once; then maps phrases to CUIs in microseconds (memoized)."""

    def __init__(self, entries: Iterable[tuple[str, str, list[str]]]):
        self.names: dict[str, str] = {}  # CUI -> its first (preferred) name
        self.exact: dict[str, str] = {}
        self.normalized, self.lenient, self.word_order, self.anatomy = KeyIndex(), KeyIndex(), KeyIndex(), KeyIndex()
        synonyms: list[tuple[str, str]] = []
        for cui, name, syns in entries:
            cui = cui.strip().upper()
            name = name.strip()
            if not cui or not name:
                continue
            if cui not in self.names:
                self.names[cui] = name
                self._index(name, cui, tier=0)
            else:
                synonyms.append((cui, name))  # further rows for one CUI act as synonyms
            synonyms.extend((cui, s.strip()) for s in syns if s.strip())
        for cui, syn in synonyms:
            self._index(syn, cui, tier=1)
        for cui, aliases in ALIASES.items():
            if cui in self.names:
                for alias in aliases:
                    self._index(alias, cui, tier=2)
        self._fuzzy_keys = self.lenient.unique_keys()
        self._fuzzy_choices = list(self._fuzzy_keys)
        self._memo: dict[str, Match | None] = {}
        comma_names = sorted((n for n in self.exact if "," in n), key=len, reverse=True)
        self.comma_names = re.compile("|".join(re.escape(n) for n in comma_names), re.IGNORECASE) \
            if comma_names else None

    def _index(self, text: str, cui: str, tier: int) -> None:
        if tier < 2:
            self.exact.setdefault(text.casefold(), cui)
        self.normalized.add(normalize(text), cui, tier)
        self.lenient.add(lenient_key(text), cui, tier)
        self.word_order.add(bag_key(text), cui, tier)
        self.anatomy.add(anatomy_key(text), cui, tier)

    @classmethod
    def from_csv(cls, path: str | Path) -> CuiMapper:
        """Read `CUI` plus a name column (Name, Canonical name, Preferred_name or STR) and optional Synonyms."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"CUI mapping file {path} does not exist")
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None) or []
            lower = [h.strip().casefold() for h in header]
            cui_col = lower.index("cui") if "cui" in lower else None
            name_col = next((lower.index(c) for c in NAME_COLUMNS if c in lower), None)
            if cui_col is None or name_col is None:
                raise ValueError(
                    f"CUI mapping file {path} needs a CUI column and a name column (one of Name, Canonical name, "
                    f"Preferred_name, STR); it has: {', '.join(header) or 'no header'}"
                )
            syn_col = next((lower.index(c) for c in SYNONYM_COLUMNS if c in lower), None)
            entries = []
            for row in reader:
                if len(row) <= max(cui_col, name_col):
                    continue
                syns = row[syn_col].split(";") if syn_col is not None and syn_col < len(row) else []
                entries.append((row[cui_col], row[name_col], syns))
        return cls(entries)

    def lookup(self, phrase: str) -> Match | None:
        """The CUI of one concept phrase, or None."""
        if phrase not in self._memo:
            self._memo[phrase] = self._lookup(phrase)
        return self._memo[phrase]

    def _direct(self, text: str) -> Match | None:
        cui = self.exact.get(text.casefold().strip())
        if cui:
            return Match(cui, self.names[cui], "exact")
        for index, make_key, method in ((self.normalized, normalize, "normalized"),
                                        (self.lenient, lenient_key, "lenient"),
                                        (self.word_order, bag_key, "word_order"),
                                        (self.anatomy, anatomy_key, "anatomy")):
            key = make_key(text)
            cui = index.get(key)
            if cui:
                tier = index.best[key][0]
                return Match(cui, self.names[cui], "alias" if tier == 2 else method)
        return None

    def _lookup(self, phrase: str) -> Match | None:
        text = phrase.strip()
        if not text or normalize(text) in NON_CONCEPTS:
            return None
        token = CUI_RE.fullmatch(text)
        if token and token.group(0).upper() in self.names:
            cui = token.group(0).upper()
            return Match(cui, self.names[cui], "cui")
        match = self._direct(text)
        if match:
            return match
        rewritten = rewrite_words(text)
        if rewritten != normalize(text):
            match = self._direct(rewritten)
            if match:
                return Match(match.cui, match.name, "rewritten")
        return self._fuzzy(lenient_key(text))

    def _fuzzy(self, key: str) -> Match | None:
        if not key or not self._fuzzy_choices:
            return None
        from rapidfuzz import fuzz, process

        for candidate, _, _ in process.extract(key, self._fuzzy_choices, scorer=fuzz.ratio,
                                               score_cutoff=FUZZY_PRESELECT, limit=10):
            if is_typo_of(key, candidate):
                cui = self._fuzzy_keys[candidate]
                return Match(cui, self.names[cui], "fuzzy")
        return None

    def split_lookup(self, phrase: str) -> list[Match]:
        """Concepts of a phrase made only of known concepts ("chest CT" -> Chest, CT); else []."""
        words = rewrite_words(phrase).split()
        found: list[Match] = []
        i = 0
        while i < len(words):
            if words[i] in FILLER_WORDS:
                i += 1
                continue
            for j in range(len(words), i, -1):  # longest known span first
                match = self._direct(" ".join(words[i:j]))
                if match:
                    found.append(Match(match.cui, match.name, "split"))
                    i = j
                    break
            else:
                return []  # a word no concept covers: do not guess
        return found if len(found) > 1 else []

    def map_phrases(self, phrases: Iterable[str], limit: int = 100) -> tuple[list[str], list[str]]:
        """(CUIs in order, without repeats, at most `limit`; phrases that matched nothing)."""
        cuis: list[str] = []
        unmapped: list[str] = []
        for phrase in phrases:
            written = [t.upper() for t in CUI_RE.findall(phrase) if t.upper() in self.names]
            if written:  # "C0040405 (X-Ray Computed Tomography)": the code the model wrote wins
                cuis.extend(c for c in written if c not in cuis)
                continue
            match = self.lookup(phrase)
            matches = [match] if match else self.split_lookup(phrase)
            if not matches:
                if normalize(phrase) not in NON_CONCEPTS:
                    unmapped.append(phrase)
                continue
            for m in matches:
                if m.cui not in cuis:
                    cuis.append(m.cui)
        return cuis[:limit], unmapped


def is_typo_of(phrase: str, name: str) -> bool:
    """True if `phrase` is `name` with one typo: one word off by one edit or one swapped letter pair."""
    from rapidfuzz.distance import Levenshtein

    a, b = phrase.split(), name.split()
    if len(a) != len(b):
        return False
    diff = [(x, y) for x, y in zip(a, b, strict=True) if x != y]
    if len(diff) != 1:
        return False
    x, y = diff[0]
    if x[0] != y[0] or min(len(x), len(y)) < FUZZY_MIN_WORD:
        return False
    if Levenshtein.distance(x, y) == 1:
        return True
    swapped = len(x) == len(y) and [i for i in range(len(x)) if x[i] != y[i]]
    return bool(swapped) and len(swapped) == 2 and swapped[1] == swapped[0] + 1 and \
        x[swapped[0]] == y[swapped[1]] and x[swapped[1]] == y[swapped[0]]


def rewrite_words(text: str) -> str:
    """Expand abbreviations and translate Spanish words, word by word, on the normalized text."""
    words = normalize(text).split()
    return " ".join(WORD_EXPANSIONS.get(w, w) for w in words)


def unmapped_report(counter: Counter, path: str | Path) -> Path:
    """Write phrase,count for every phrase that mapped to no CUI, most frequent first."""
    return write_csv_atomic(path, ["Phrase", "Count"], ([p, str(n)] for p, n in counter.most_common()))


def load_mapper(path: str) -> CuiMapper:
    """The CUI mapper for a mapping file; a file the mapper cannot use is the user's to fix."""
    if not Path(path).is_file():
        raise UserError(f"--cui_mapping_file {path} does not exist")
    try:
        mapper = CuiMapper.from_csv(path)
    except ValueError as e:
        raise UserError(str(e)) from None
    if not mapper.names:
        raise UserError(f"--cui_mapping_file {path} has no CUI rows: every image would get no concept")
    return mapper
