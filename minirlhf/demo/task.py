"""The bundled demo task: short reviews of everyday things, judged by a sentiment lexicon.

A prompt names one topic ("Write a short review of the kettle."); a good answer is one or two short
sentences about that topic ("The kettle was really great. I loved it."). The language is a small
grammar (`sample_sentence`) over a fixed lexicon, so a ~1-3M-parameter decoder with a ~512-piece
SentencePiece vocabulary learns it on a CPU in minutes, and the quality of any answer can be computed
exactly by `judge`, the programmatic gold judge that stands in for human preference:

    sentence polarity  p_s = sign( sum over sentiment words w in s of  (-1)^[w is negated] * pol(w) )
    sentiment          S   = sum_s p_s / max(2, number of sentences)                    in [-1, 1]
    penalty            P   = sum of the penalties below                                 >= 0
    gold reward        r   = clip( (S if P == 0 else min(S, 0)) - P, -1, 1 )

`pol(w)` is +1 for a positive word, -1 for a negative one, 0 otherwise; "not" negates the next
sentiment word of its sentence. Counting sentences (not words) and taking the sign per sentence means
stuffing a sentence with praise ("great excellent lovely") earns nothing over one word of praise; the
maximum, 1.0, needs two positive sentences. Praise only counts in a clean answer (P == 0): any defect
makes the reward negative, so no hack of the lexicon scores above an honest neutral answer (0). The
penalties (constants below, table in docs/demo.md) cover the ways a policy can go wrong or hack the
lexicon: not naming the topic, naming another topic, more than two sentences or `MAX_WORDS` words,
repeated content words, sentence fragments, a missing final full stop, and words outside the task's
vocabulary (echoing the prompt, broken tokens). An empty answer scores -1.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

TOPICS: tuple[str, ...] = (
    "coffee", "pizza", "hotel", "movie", "novel", "phone", "laptop", "camera", "bicycle", "car",
    "flight", "concert", "museum", "park", "beach", "restaurant", "cafe", "bakery", "burger", "soup",
    "salad", "tea", "chair", "desk", "lamp", "jacket", "scarf", "backpack", "clock", "album",
    "podcast", "gym", "garden", "bus", "tent", "kettle", "sofa", "blender", "printer", "umbrella",
)  # fmt: skip

PROMPT_TEMPLATES: tuple[str, ...] = (
    "Write a short review of the {topic}.",
    "Review the {topic}.",
    "What did you think of the {topic}?",
    "Give your opinion of the {topic}.",
    "How was the {topic}?",
    "Describe the {topic} in a sentence or two.",
    "Tell me about the {topic}.",
    "Share a quick review of the {topic}.",
    "Say something about the {topic}.",
    "Rate the {topic} in words.",
)

POSITIVE_ADJECTIVES: tuple[str, ...] = (
    "great", "good", "excellent", "wonderful", "lovely", "superb", "fantastic", "pleasant",
    "brilliant", "delightful",
)  # fmt: skip
NEGATIVE_ADJECTIVES: tuple[str, ...] = (
    "bad", "awful", "terrible", "poor", "horrible", "dreadful", "disappointing", "boring", "nasty",
    "unpleasant",
)  # fmt: skip
NEUTRAL_ADJECTIVES: tuple[str, ...] = (
    "okay", "average", "ordinary", "standard", "plain", "typical", "normal",
)  # fmt: skip
POSITIVE_VERBS: tuple[str, ...] = ("loved", "enjoyed", "liked")
NEGATIVE_VERBS: tuple[str, ...] = ("hated", "disliked", "regretted")
NEUTRAL_VERBS: tuple[str, ...] = ("used", "tried", "bought")
ADVERBS: tuple[str, ...] = ("very", "really", "quite", "rather", "fairly", "truly")
ASPECTS: tuple[str, ...] = ("price", "quality", "design", "value", "size")
NEGATION = "not"
# "recommend" only occurs as "I would (not) recommend it." and carries positive polarity.
RECOMMEND = "recommend"
# Closed-class words that a well-formed answer may repeat ("The coffee was good. It was cheap.").
FUNCTION_WORDS: frozenset[str] = frozenset({"the", "this", "it", "was", "is", "i", "would", "not", "and"})
# Verbs of the fixed sentence frames ("I found the ...", "I thought the ... was ...").
FRAME_WORDS: frozenset[str] = frozenset({"found", "thought"})

POSITIVE_WORDS: frozenset[str] = frozenset(POSITIVE_ADJECTIVES + POSITIVE_VERBS + (RECOMMEND,))
NEGATIVE_WORDS: frozenset[str] = frozenset(NEGATIVE_ADJECTIVES + NEGATIVE_VERBS)
# Every word a well-formed answer can contain; anything else counts as an unknown (malformed) word.
VOCABULARY: frozenset[str] = (
    POSITIVE_WORDS
    | NEGATIVE_WORDS
    | frozenset(TOPICS + NEUTRAL_ADJECTIVES + NEUTRAL_VERBS + ADVERBS + ASPECTS)
    | FUNCTION_WORDS
    | FRAME_WORDS
)

MAX_SENTENCES = 2  # more is "rambling"
MAX_WORDS = 16  # the longest answer the grammar makes has 11 words
MIN_SENTENCE_WORDS = 3  # shorter sentences ("Great.") are fragments
OFF_TOPIC_PENALTY = 0.5  # the prompt's topic is never named
OTHER_TOPIC_PENALTY = 0.25  # some other topic is named
EXTRA_SENTENCE_PENALTY = 0.5  # per sentence beyond MAX_SENTENCES
EXTRA_WORD_PENALTY = 0.1  # per word beyond MAX_WORDS
REPEAT_PENALTY = 0.25  # per repeated occurrence of a content (non-function) word
FRAGMENT_PENALTY = 0.25  # per sentence shorter than MIN_SENTENCE_WORDS
UNTERMINATED_PENALTY = 0.25  # the answer does not end with ".", "!" or "?"
UNKNOWN_PENALTY = 1.0  # times the fraction of tokens outside VOCABULARY

STANCES: tuple[str, ...] = ("positive", "negative", "neutral", "mixed")
CORRUPTIONS: tuple[str, ...] = ("repeat", "stuffed", "ramble", "off_topic", "truncated", "echo")

# words, sentence ends, and runs of anything else (digits, stray symbols: malformed tokens)
_TOKEN_RE = re.compile(r"[a-z]+|[.!?]|[^\sa-z.!?]+")


# ----------------------------------------------------------------------------------------------
# The gold judge


@dataclass(frozen=True)
class Judgement:
    """How `judge` scored one answer: the sentiment term, each penalty (>= 0), and the reward."""

    topic: str
    sentences: int
    words: int
    sentiment: float  # S above, in [-1, 1]
    on_topic: bool
    off_topic_penalty: float
    other_topic_penalty: float
    length_penalty: float  # extra sentences and extra words
    repeat_penalty: float
    fragment_penalty: float
    unterminated_penalty: float
    unknown_penalty: float
    reward: float  # in [-1, 1]


def prompt_topic(prompt: str) -> str:
    """The one topic (from TOPICS) a prompt names; ValueError when it names none or several."""
    found = sorted({w for w in re.findall(r"[a-z]+", prompt.lower()) if w in TOPICS})
    if len(found) != 1:
        raise ValueError(
            f"demo prompt must name exactly one topic from minirlhf.demo.task.TOPICS, "
            f"found {found} in {prompt!r}"
        )
    return found[0]


def word_polarity(word: str) -> int:
    """pol(w): +1 for a positive lexicon word, -1 for a negative one, 0 otherwise."""
    if word in POSITIVE_WORDS:
        return 1
    if word in NEGATIVE_WORDS:
        return -1
    return 0


def sentence_polarity(words: Sequence[str]) -> int:
    """p_s = sign(sum of pol(w), each negated by a preceding "not" of the same sentence) in {-1, 0, 1}."""
    total, negate = 0, False
    for w in words:
        if w == NEGATION:
            negate = True
        elif (p := word_polarity(w)) != 0:
            total += -p if negate else p
            negate = False
    return (total > 0) - (total < 0)


def split_sentences(response: str) -> tuple[list[list[str]], int, bool]:
    """Lower-cased words of each sentence, the number of malformed (non-word) tokens, and whether
    the text ends with a sentence end. A trailing unterminated run of words is its own sentence."""
    sentences: list[list[str]] = []
    current: list[str] = []
    junk = 0
    terminated = False
    for tok in _TOKEN_RE.findall(response.lower()):
        if tok in ".!?":
            if current:
                sentences.append(current)
                current = []
            terminated = True
        elif tok[0].isalpha():
            current.append(tok)
            terminated = False
        else:
            junk += 1
            terminated = False
    if current:
        sentences.append(current)
    return sentences, junk, terminated


def judge(prompt: str, response: str) -> Judgement:
    """Score `response` to `prompt` with the gold judge described in the module docstring.

    prompt: the user's request (plain text, or any text naming exactly one topic, e.g. after a chat
    template); response: the model's answer, decoded without special tokens.
    """
    topic = prompt_topic(prompt)
    sentences, junk, terminated = split_sentences(response)
    words = [w for s in sentences for w in s]
    if not words:
        return Judgement(topic, 0, 0, 0.0, False, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)

    n_sent, n_words = len(sentences), len(words)
    sentiment = sum(sentence_polarity(s) for s in sentences) / max(MAX_SENTENCES, n_sent)
    on_topic = topic in words
    others = {w for w in words if w in TOPICS and w != topic}
    counts = Counter(w for w in words if w not in FUNCTION_WORDS)

    off_topic = 0.0 if on_topic else OFF_TOPIC_PENALTY
    other_topic = OTHER_TOPIC_PENALTY if others else 0.0
    length = EXTRA_SENTENCE_PENALTY * max(0, n_sent - MAX_SENTENCES) + EXTRA_WORD_PENALTY * max(
        0, n_words - MAX_WORDS
    )
    repeat = REPEAT_PENALTY * sum(c - 1 for c in counts.values())
    fragment = FRAGMENT_PENALTY * sum(len(s) < MIN_SENTENCE_WORDS for s in sentences)
    unterminated = 0.0 if terminated else UNTERMINATED_PENALTY
    unknown = UNKNOWN_PENALTY * (sum(w not in VOCABULARY for w in words) + junk) / (n_words + junk)

    penalty = off_topic + other_topic + length + repeat + fragment + unterminated + unknown
    base = sentiment if penalty == 0 else min(sentiment, 0.0)
    reward = max(-1.0, min(1.0, base - penalty))
    return Judgement(
        topic, n_sent, n_words, sentiment, on_topic, off_topic, other_topic, length, repeat,
        fragment, unterminated, unknown, reward,
    )  # fmt: skip


def gold_reward(prompt: str, response: str) -> float:
    """The gold reward r in [-1, 1] of one answer (see `judge`)."""
    return judge(prompt, response).reward


def gold_score(prompts: Sequence[str], responses: Sequence[str]) -> float:
    """Mean gold reward over paired prompts and responses: the number every demo stage reports."""
    if len(prompts) != len(responses):
        raise ValueError(f"gold_score: {len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise ValueError("gold_score: no prompts to score")
    return sum(gold_reward(p, r) for p, r in zip(prompts, responses)) / len(prompts)


# ----------------------------------------------------------------------------------------------
# The grammar that writes prompts, answers and documents


def make_prompt(topic: str, template: int) -> str:
    """The user request for `topic` in the words of PROMPT_TEMPLATES[template]."""
    return PROMPT_TEMPLATES[template].format(topic=topic)


def _adjective(rng: random.Random, polarity: int) -> str:
    pool = {1: POSITIVE_ADJECTIVES, -1: NEGATIVE_ADJECTIVES, 0: NEUTRAL_ADJECTIVES}[polarity]
    return rng.choice(pool)


def _verb(rng: random.Random, polarity: int) -> str:
    return rng.choice({1: POSITIVE_VERBS, -1: NEGATIVE_VERBS, 0: NEUTRAL_VERBS}[polarity])


def _adjective_phrase(rng: random.Random, polarity: int) -> str:
    """An adjective of `polarity`, sometimes intensified ("really great"), or, for a non-neutral
    polarity, sometimes the negation of the opposite ("not awful" for +1)."""
    if polarity != 0 and rng.random() < 0.15:
        return f"not {_adjective(rng, -polarity)}"
    adj = _adjective(rng, polarity)
    return f"{rng.choice(ADVERBS)} {adj}" if rng.random() < 0.5 else adj


def sample_sentence(rng: random.Random, polarity: int, topic: str | None = None) -> str:
    """One grammatical sentence of polarity p_s = `polarity` (-1, 0 or 1).

    With a topic it is an opening sentence that names it ("I found the kettle rather dull."), without
    one a follow-up about the same thing ("The price was good.", "I would recommend it.").
    """
    if topic is not None:
        form = rng.randrange(6)
        if form == 5:
            return f"I {_verb(rng, polarity)} the {topic}."
        phrase = _adjective_phrase(rng, polarity)
        return (
            f"The {topic} was {phrase}.",
            f"The {topic} is {phrase}.",
            f"This {topic} was {phrase}.",
            f"I found the {topic} {phrase}.",
            f"I thought the {topic} was {phrase}.",
        )[form]
    form = rng.randrange(4)
    if form == 3 and polarity != 0:
        return "I would recommend it." if polarity > 0 else "I would not recommend it."
    if form == 2:
        return f"I {_verb(rng, polarity)} it."
    phrase = _adjective_phrase(rng, polarity)
    return f"It was {phrase}." if form == 1 else f"The {rng.choice(ASPECTS)} was {phrase}."


def _has_repeats(sentences: Sequence[str], topic: str | None) -> bool:
    words = [w for s in sentences for w in re.findall(r"[a-z]+", s.lower()) if w not in FUNCTION_WORDS]
    words = [w for w in words if w != topic]
    return len(words) != len(set(words))


def sample_text(rng: random.Random, topic: str, polarities: Sequence[int], topic_rate: float = 0.0) -> str:
    """Sentences with the given polarities, the first naming `topic`, each later one naming it again
    with probability `topic_rate` (only then is the topic word repeated); no other content word repeats.
    """
    while True:
        names = [i == 0 or rng.random() < topic_rate for i in range(len(polarities))]
        sentences = [sample_sentence(rng, p, topic if n else None) for p, n in zip(polarities, names)]
        if not _has_repeats(sentences, topic if topic_rate > 0 else None):
            return " ".join(sentences)


def stance_polarities(rng: random.Random, stance: str) -> list[int]:
    """Sentence polarities of a one- or two-sentence answer with the given overall stance.

    positive: (+1), (+1, +1), (+1, 0) or (0, +1); negative mirrors it; neutral: all 0; mixed: (+1, -1)
    or (-1, +1). Positive and negative are exact mirrors, so a balanced mix has mean gold 0.
    """
    if stance == "mixed":
        return rng.choice(([1, -1], [-1, 1]))
    n = rng.choice((1, 2))
    if stance == "neutral":
        return [0] * n
    sign = {"positive": 1, "negative": -1}.get(stance)
    if sign is None:
        raise ValueError(f"unknown stance {stance!r}; expected one of {STANCES}")
    if n == 1:
        return [sign]
    return rng.choice(([sign, sign], [sign, 0], [0, sign]))


def sample_response(rng: random.Random, topic: str, stance: str) -> str:
    """A well-formed answer (no penalties) about `topic` with the given stance (see STANCES)."""
    return sample_text(rng, topic, stance_polarities(rng, stance))


def sample_corruption(rng: random.Random, prompt: str, kind: str | None = None) -> str:
    """A bad answer of one of the CORRUPTIONS kinds, mostly built from praise, so that a reward model
    learns that these hacks lose to an honest answer:

    repeat: the praise word said again and again ("The tea was great great great.");
    stuffed: the same positive sentence three times; ramble: four to six sentences;
    off_topic: a positive answer about another topic; truncated: an answer cut mid-sentence;
    echo: the prompt repeated back.
    """
    topic = prompt_topic(prompt)
    kind = kind if kind is not None else rng.choice(CORRUPTIONS)
    if kind == "repeat":
        adj = rng.choice(POSITIVE_ADJECTIVES)
        return f"The {topic} was " + " ".join([adj] * rng.randint(3, 6)) + "."
    if kind == "stuffed":
        return " ".join([sample_sentence(rng, 1, topic)] * 3)
    if kind == "ramble":
        return sample_text(rng, topic, [1] + [rng.choice((1, 1, 0, -1)) for _ in range(rng.randint(3, 5))])
    if kind == "off_topic":
        other = rng.choice([t for t in TOPICS if t != topic])
        return sample_response(rng, other, "positive")
    if kind == "truncated":
        words = sample_response(rng, topic, rng.choice(STANCES)).split()
        return " ".join(words[: rng.randint(1, max(1, len(words) - 1))]).rstrip(".")
    if kind == "echo":
        return prompt
    raise ValueError(f"unknown corruption {kind!r}; expected one of {CORRUPTIONS}")


def sample_document(
    rng: random.Random, topic: str, min_sentences: int = 3, max_sentences: int = 6, topic_rate: float = 0.4
) -> str:
    """A pretraining document: a longer review of `topic` with sentences of random polarity.

    Longer than any good answer on purpose, so a pretrained model rambles and sft visibly teaches it
    to stop after one or two sentences. Later sentences name the topic again with probability
    `topic_rate`, so pretraining already teaches the model to copy the topic from its context, the
    skill an answer needs to name the topic of the prompt.
    """
    n = rng.randint(min_sentences, max_sentences)
    return sample_text(rng, topic, [rng.choice((-1, 0, 1)) for _ in range(n)], topic_rate)
