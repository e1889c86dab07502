"""Text-rendering reward (OCR) and the OCR prompt sets.

Prompts carry the text to render in double quotes (`a wooden sign that says "OPEN LATE"`); records also
hold it under "text". The reader is RapidOCR (PP-OCR detection + recognition as ONNX models shipped inside
the `rapidocr` wheel, run by onnxruntime): real weights, fully offline.

Reward, per image, following Flow-GRPO's OCR reward:
- target = the record's "text", else the first double-quoted span of its prompt;
- read   = every line RapidOCR recognises, concatenated in its reading order (top to bottom, left to right),
           lines below `min_confidence` dropped (Flow-GRPO keeps every line with confidence > 0);
- both normalised by lower-casing and deleting all whitespace (so case, spacing and line breaks are free);
- distance = 0 when the target occurs inside the read text (extra text around it is not penalised), else
  the Levenshtein distance, capped at len(target);
- reward = 1 − distance / len(target), in [0, 1]: 1 = the text is there, 0 = nothing like it is.
"""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np

OCR_TAG = "ocr"
_QUOTED = re.compile(r'"([^"]+)"')


# --- scoring --------------------------------------------------------------------------------------
def normalise_text(text: str) -> str:
    """Lower case, every whitespace character removed."""
    return "".join(text.lower().split())


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def text_reward(target: str, read: str) -> float:
    """1 − capped normalised edit distance between the target and what was read (see the module doc)."""
    target, read = normalise_text(target), normalise_text(read)
    if not target:
        raise ValueError("OCR reward: empty target text")
    distance = 0 if target in read else min(levenshtein(target, read), len(target))
    return 1.0 - distance / len(target)


def target_text(meta: dict) -> str:
    """The text a prompt asks to render: meta["text"], else the first double-quoted span of meta["prompt"]."""
    if meta.get("text"):
        return str(meta["text"])
    match = _QUOTED.search(meta.get("prompt", ""))
    if match is None:
        raise ValueError(f"OCR reward: prompt {meta.get('prompt')!r} has no quoted text to render")
    return match.group(1)


class OcrReward:
    """RapidOCR reader + `text_reward`.

    threads: onnxruntime threads per session; None = $OMP_NUM_THREADS when set, else onnxruntime's default (all cores).
    """

    def __init__(self, min_confidence: float = 0.0, threads: int | None = None, use_angle_classifier: bool = False):
        from rapidocr import RapidOCR

        if threads is None:
            threads = int(os.environ.get("OMP_NUM_THREADS", "-1") or -1)
        self.min_confidence = min_confidence
        self.engine = RapidOCR(params={
            "Global.log_level": "error",
            "Global.text_score": float(min_confidence),
            "Global.use_cls": bool(use_angle_classifier),  # Flow-GRPO reads without the angle classifier
            "EngineConfig.onnxruntime.intra_op_num_threads": int(threads),
            "EngineConfig.onnxruntime.inter_op_num_threads": int(threads),
        })

    def read(self, image: np.ndarray) -> str:
        """Every recognised line of one RGB uint8 image, concatenated with spaces."""
        bgr = np.ascontiguousarray(np.asarray(image, dtype=np.uint8)[..., ::-1])  # RapidOCR takes arrays as BGR
        result = self.engine(bgr)
        texts, scores = getattr(result, "txts", None) or (), getattr(result, "scores", None) or ()
        return " ".join(t for t, s in zip(texts, scores) if s >= self.min_confidence)

    def __call__(self, images: np.ndarray, metas: list[dict]) -> np.ndarray:
        if len(images) != len(metas):
            raise ValueError(f"OCR reward: {len(images)} images but {len(metas)} prompts")
        return np.array([text_reward(target_text(m), self.read(img)) for img, m in zip(images, metas)],
                        dtype=np.float32)


def ocr_reward(**kwargs) -> OcrReward:
    return OcrReward(**kwargs)


# --- prompt sets ----------------------------------------------------------------------------------
OCR_TEMPLATES = (
    'a wooden sign that says "{}"',
    'a storefront with the name "{}" above the door',
    'a neon sign that reads "{}"',
    'a t-shirt printed with the words "{}"',
    'a chalkboard with "{}" written on it',
    'a book cover titled "{}"',
    'a coffee mug with "{}" on it',
    'a street sign that reads "{}"',
    'a poster with the headline "{}"',
    'a birthday cake with "{}" written in icing',
    'a license plate that reads "{}"',
    'a banner that says "{}"',
)
OCR_WORDS = (
    "open", "closed", "late", "fresh", "coffee", "bakery", "hello", "world", "welcome", "home", "sale", "today",
    "free", "wifi", "exit", "stop", "slow", "school", "zone", "good", "morning", "night", "happy", "birthday",
    "best", "friends", "forever", "love", "music", "books", "pizza", "tacos", "burger", "juice", "bar", "cafe",
    "market", "garden", "river", "ocean", "mountain", "city", "park", "station", "north", "south", "east", "west",
    "summer", "winter", "spring", "autumn", "dream", "big", "small", "red", "blue", "green", "gold", "silver",
    "star", "moon", "sun", "cloud", "rain", "snow", "fire", "ice", "cat", "dog", "bird", "fox", "bear", "wolf",
    "tiger", "lion", "apple", "lemon", "cherry", "mango", "bread", "cheese", "tea", "milk", "honey", "sugar",
    "salt", "pepper", "keep", "calm", "carry", "on", "think", "different", "just", "do", "it", "never", "give",
    "up", "stay", "wild", "be", "kind", "yes", "no", "maybe", "new", "old", "town", "road", "main", "street",
    "avenue", "hotel", "motel", "diner", "pharmacy", "library", "museum", "cinema", "theater", "gym", "studio",
    "lab", "robot", "pixel", "rocket", "planet", "galaxy", "magic", "secret", "lucky", "zero", "one", "two",
)
OCR_TEST_FRACTION = 10  # texts whose sha256 falls in 1 of 10 buckets are test-only
OCR_TEST_SIZE = 100
OCR_TEST_SEED = 0


def is_test_text(text: str) -> bool:
    """The held-out split is by text (not by prompt): a test text never appears in a training prompt."""
    digest = hashlib.sha256(normalise_text(text).encode()).digest()
    return digest[0] % OCR_TEST_FRACTION == 0


def _random_text(rng: np.random.Generator) -> str:
    words = [OCR_WORDS[i] for i in rng.integers(len(OCR_WORDS), size=int(rng.integers(1, 4)))]
    style = int(rng.integers(3))
    text = " ".join(words)
    return text.upper() if style == 0 else text.title() if style == 1 else text.capitalize()


def ocr_prompts(n: int, seed: int, split: str = "train") -> list[dict]:
    """`n` distinct text-rendering prompts (deterministic in `seed`) from the train or the held-out test split.

    Records follow the GenEval-style prompt format ({"tag", "prompt", "include", "exclude"}) with the target
    under "text": `{"tag": "ocr", "prompt": 'a banner that says "Happy Birthday"', "text": "Happy Birthday",
    "include": [], "exclude": []}`.
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown OCR split {split!r}; expected 'train' or 'test'")
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    records, seen, attempts = [], set(), 0
    while len(records) < n:
        attempts += 1
        if attempts > 1000 * max(n, 1):
            raise ValueError(f"could not draw {n} distinct OCR prompts from the {split} split")
        text = _random_text(rng)
        template = OCR_TEMPLATES[int(rng.integers(len(OCR_TEMPLATES)))]
        if is_test_text(text) != (split == "test"):
            continue
        prompt = template.format(text)
        if prompt in seen:
            continue
        seen.add(prompt)
        records.append({"tag": OCR_TAG, "prompt": prompt, "text": text, "include": [], "exclude": []})
    return records


def ocr_test_set(n: int = OCR_TEST_SIZE) -> list[dict]:
    """The fixed held-out OCR test set."""
    return ocr_prompts(n, OCR_TEST_SEED, "test")
