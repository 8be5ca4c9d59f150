"""W5 inputs: classification texts and the realistic mix, drawn from the demo corpus with a fixed seed.

A `Job` is one task of the mix: its kind (`classify`, `translate`, `qa`) and the request fields every system
receives (pagedq through `Client`, the naive worker as task kwargs), so both run exactly the same inputs.
On the realistic models a translation's length is set per request (`generation.max_new_tokens`, drawn from a
range): a random-weight translator never stops on its own (bench/w5_models.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from pagedq.worker.demo.corpus import ENGLISH_WORDS, synthetic_sentences

SEED = 1234
#: The mix of the issue: 60% classify, 25% translate, 15% extractive QA.
MIX = {"classify": 0.60, "translate": 0.25, "qa": 0.15}
QUESTION_WORDS = ("Who", "What", "When", "Where", "Why", "How")


@dataclass(frozen=True)
class Job:
    kind: str
    fields: dict[str, Any]


def classify_texts(count: int, seed: int = SEED) -> list[str]:
    """Review-sized texts: one to three sentences of 4..20 words each."""
    rng = random.Random(seed)
    sentences = synthetic_sentences(ENGLISH_WORDS, 3 * count, seed)
    return [" ".join(sentences[3 * i : 3 * i + rng.randint(1, 3)]) for i in range(count)]


def _qa_fields(rng: random.Random, sentences: list[str]) -> dict[str, Any]:
    """A context of 4..10 sentences and a question made of a few of its words."""
    context = " ".join(rng.sample(sentences, rng.randint(4, 10)))
    words = [w.strip(".!?,").lower() for w in context.split()]
    start = rng.randrange(max(1, len(words) - 4))
    return {"question": f"{rng.choice(QUESTION_WORDS)} {' '.join(words[start : start + 4])}?", "context": context}


def mixed_jobs(count: int, seed: int = SEED, max_new_tokens: tuple[int, int] | None = None) -> list[Job]:
    """`count` jobs in a shuffled order whose kinds follow `MIX` (rounded; classify takes the remainder).
    `max_new_tokens` (lowest, highest): each translation asks for a uniform draw from it; None: the model's own
    generation config decides (the demo translator's ends at varied lengths)."""
    rng = random.Random(seed)
    sentences = synthetic_sentences(ENGLISH_WORDS, 500, seed + 1)
    texts = classify_texts(count, seed + 2)
    translations = round(count * MIX["translate"])
    questions = round(count * MIX["qa"])
    kinds = ["translate"] * translations + ["qa"] * questions + ["classify"] * (count - translations - questions)
    rng.shuffle(kinds)
    jobs = []
    for i, kind in enumerate(kinds):
        if kind == "classify":
            jobs.append(Job(kind, {"text": texts[i]}))
        elif kind == "translate":
            fields = {"text": rng.choice(sentences), "source_lang": "en", "target_lang": "de"}
            if max_new_tokens is not None:
                fields["generation"] = {"max_new_tokens": rng.randint(*max_new_tokens)}
            jobs.append(Job(kind, fields))
        else:
            jobs.append(Job(kind, _qa_fields(rng, sentences)))
    return jobs
