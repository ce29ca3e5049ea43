"""Summarising conversations: the offline summary from the user's own words, and the LLM one."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from kura_pipeline.core.llm import LLMClient, LLMFailure
from kura_pipeline.core.models import Conversation, ConversationSummary
from kura_pipeline.core.privacy import scrub_pii
from kura_pipeline.core.prompts import SUMMARY_PROMPT, SummaryResponse, format_conversation

OFFLINE_SUMMARY_CHARS = 300

_CODE_FENCE = re.compile(r"```([A-Za-z0-9_+#.-]+)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# A few common words per language: enough to tell the big languages apart honestly; anything
# else is reported as not detected rather than guessed.
COMMON_WORDS = {
    "english": {"the", "and", "is", "to", "of", "what", "how", "you", "for", "with", "this", "can"},
    "spanish": {"el", "la", "de", "que", "y", "en", "los", "por", "para", "una", "es", "con"},
    "french": {"le", "la", "les", "des", "est", "et", "une", "pour", "que", "pas", "vous", "dans"},
    "german": {"der", "die", "und", "ist", "nicht", "ich", "das", "mit", "sie", "ein", "zu", "wie"},
    "portuguese": {"o", "a", "de", "que", "não", "em", "um", "uma", "para", "com", "é", "você"},
}
_SCRIPTS = [
    ("chinese", re.compile(r"[\u4e00-\u9fff]")),
    ("japanese", re.compile(r"[\u3040-\u30ff]")),
    ("korean", re.compile(r"[\uac00-\ud7af]")),
    ("russian", re.compile(r"[\u0400-\u04ff]")),
    ("arabic", re.compile(r"[\u0600-\u06ff]")),
]


@dataclass
class SummaryRun:
    """The outcome of summarising a batch: summaries, failures with reasons, and scrub counts."""

    summaries: list[ConversationSummary]
    failures: dict[str, str] = field(default_factory=dict)
    pii_scrubbed: Counter[str] = field(default_factory=Counter)


def first_user_text(conversation: Conversation) -> str:
    for message in conversation.messages:
        if message.role == "user" and message.content.strip():
            return message.content
    return ""


def detect_languages(conversation: Conversation) -> list[str]:
    """Human language by script or common words; programming languages by code-fence tags."""
    text = " ".join(m.content for m in conversation.messages if m.role == "user")[:5000]
    languages: list[str] = []
    for name, pattern in _SCRIPTS:
        if len(pattern.findall(text)) >= 5:
            languages.append(name)
    if not languages:
        words = Counter(re.findall(r"[a-zà-ÿ]+", text.lower()))
        scores = {lang: sum(words[w] for w in stop) for lang, stop in COMMON_WORDS.items()}
        best = max(scores, key=lambda lang: scores[lang])
        if scores[best] >= 2:
            languages.append(best)
    all_text = "\n".join(m.content for m in conversation.messages)
    for tag in _CODE_FENCE.findall(all_text):
        tag = tag.lower()
        if tag not in languages and tag not in {"text", "plaintext", "output", "bash-session"}:
            languages.append(tag)
    return languages


def shorten(text: str, limit: int) -> str:
    """Whole sentences up to the limit; a cut word-boundary with an ellipsis past it."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    kept = ""
    for sentence in _SENTENCE_END.split(text):
        if len(kept) + len(sentence) + 1 > limit:
            break
        kept = f"{kept} {sentence}".strip()
    if kept:
        return kept
    return text[:limit].rsplit(" ", 1)[0] + " …"


def summarise_offline(conversation: Conversation) -> tuple[ConversationSummary, Counter[str]]:
    """An honest summary with no model: the user's own opening request, PII scrubbed.

    Facets that need judgement (concerning score, frustration, errors, task) are left empty
    rather than guessed; the run's metadata says the offline backend produced them.
    """
    request, counts = scrub_pii(shorten(first_user_text(conversation), OFFLINE_SUMMARY_CHARS))
    turns = sum(1 for m in conversation.messages if m.role == "user")
    summary = f"The user asked: {request}" + (f" ({turns} user turns)" if turns > 1 else "")
    return (
        ConversationSummary(
            chat_id=conversation.chat_id,
            summary=summary,
            request=request,
            languages=detect_languages(conversation),
            metadata=conversation.metadata,
        ),
        counts,
    )


def summarise_all_offline(conversations: list[Conversation]) -> SummaryRun:
    run = SummaryRun(summaries=[])
    for conversation in conversations:
        summary, counts = summarise_offline(conversation)
        run.summaries.append(summary)
        run.pii_scrubbed.update(counts)
    return run


def summary_from_response(
    conversation: Conversation, response: SummaryResponse
) -> tuple[ConversationSummary, Counter[str]]:
    """Scrub the model's text too: the prompt asks for no PII, the scrub makes sure of the obvious."""
    counts: Counter[str] = Counter()

    def clean(text: str) -> str:
        scrubbed, found = scrub_pii(text)
        counts.update(found)
        return scrubbed

    return (
        ConversationSummary(
            chat_id=conversation.chat_id,
            summary=clean(response.summary),
            request=clean(response.request),
            task=clean(response.task),
            languages=list(dict.fromkeys(language.lower().strip() for language in response.languages)),
            concerning_score=response.concerning_score,
            user_frustration=response.user_frustration,
            assistant_errors=[clean(error) for error in response.assistant_errors],
            metadata=conversation.metadata,
        ),
        counts,
    )


async def summarise_all_with_llm(
    conversations: list[Conversation], client: LLMClient, char_budget: int
) -> SummaryRun:
    """One call per conversation, all in flight up to the client's limits; failures are kept."""

    async def one(conversation: Conversation) -> SummaryResponse | LLMFailure:
        messages = SUMMARY_PROMPT.messages(transcript=format_conversation(conversation, char_budget))
        return await client.complete(SUMMARY_PROMPT, messages, SummaryResponse)

    results = await client.gather([one(c) for c in conversations], label="summaries")
    run = SummaryRun(summaries=[])
    for conversation, result in zip(conversations, results, strict=True):
        if isinstance(result, LLMFailure):
            run.failures[conversation.chat_id] = result.reason
            continue
        summary, counts = summary_from_response(conversation, result)
        run.summaries.append(summary)
        run.pii_scrubbed.update(counts)
    return run
