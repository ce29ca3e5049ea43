"""Summarising conversations: the offline summary (a task type and shared phrases, never the
user's sentences), and the LLM one (Clio's facets)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from kura_pipeline.core.llm import LLMClient, LLMFailure
from kura_pipeline.core.models import Conversation, ConversationSummary
from kura_pipeline.core.phrases import document_phrases, phrase_table, words
from kura_pipeline.core.privacy import scrub_pii
from kura_pipeline.core.prompts import NO_REPLY_MARKER, SUMMARY_PROMPT, SummaryResponse, format_conversation

OFFLINE_SUMMARY_CHARS = 300  # of the opening request: what is embedded for clustering
PHRASE_SOURCE_CHARS = 1_500  # of all the user's messages: where a summary's phrases may come from

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


def all_user_text(conversation: Conversation) -> str:
    return "\n".join(m.content for m in conversation.messages if m.role == "user")


def detect_languages(conversation: Conversation) -> list[str]:
    """Human language by script or common words; programming languages by known code-fence tags."""
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
        if tag not in languages and tag in PROGRAMMING_LANGUAGES:
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


# Task types the offline backend can tell from the words of a request: a fixed vocabulary (never
# the user's words), checked in this order; the first that matches wins.
TASK_RULES: list[tuple[str, frozenset[str]]] = [
    ("translation", frozenset({"translate", "translation", "translating", "traduce", "traduire"})),
    ("summarising", frozenset({"summarize", "summarise", "summary", "summarization", "tldr"})),
    ("role play", frozenset({"roleplay", "pretend", "persona", "character"})),
    (
        "coding",
        frozenset(
            {
                "code",
                "function",
                "python",
                "javascript",
                "typescript",
                "java",
                "sql",
                "bug",
                "error",
                "script",
                "api",
                "compile",
                "debug",
                "program",
                "react",
                "css",
                "html",
                "regex",
                "class",
                "json",
                "database",
                "query",
                "git",
                "docker",
                "linux",
                "bash",
                "c++",
                "c#",
                "rust",
                "golang",
                "dataframe",
                "pandas",
                "numpy",
                "algorithm",
                "server",
                "flask",
                "django",
                "node",
                "excel",
            }
        ),
    ),  # fmt: skip
    (
        "maths",
        frozenset(
            {"calculate", "equation", "solve", "math", "maths", "probability", "integral", "derivative"}
        ),
    ),
    (
        "writing",
        frozenset(
            {
                "write",
                "draft",
                "compose",
                "essay",
                "email",
                "letter",
                "story",
                "poem",
                "article",
                "blog",
                "tweet",
                "caption",
                "slogan",
                "lyrics",
                "outline",
                "rewrite",
                "paraphrase",
                "proofread",
            }
        ),
    ),  # fmt: skip
    ("advice", frozenset({"plan", "advice", "recommend", "suggest", "ideas", "strategy", "tips"})),
    ("question", frozenset({"what", "why", "how", "who", "when", "where", "which", "explain"})),
]
OTHER_TASK = "other"
# Programming languages named by code-fence tags: only known names are kept, never a tag a user
# typed (it could be anything).
PROGRAMMING_LANGUAGES = frozenset({
    "python", "py", "javascript", "js", "typescript", "ts", "java", "c", "cpp", "c++", "csharp", "cs",
    "go", "rust", "ruby", "php", "swift", "kotlin", "scala", "r", "sql", "bash", "sh", "shell",
    "powershell", "html", "css", "json", "yaml", "xml", "markdown", "latex", "matlab", "perl", "lua",
    "dart", "haskell", "julia", "vb", "vba", "jsx", "tsx", "scss", "dockerfile", "makefile", "graphql",
})  # fmt: skip


def task_type(text: str, has_code: bool = False) -> str:
    """The kind of task a request is, from a fixed list: a rule, not a judgement."""
    found = set(words(text))
    if "act" in found and "as" in found:
        found.add("roleplay")
    for name, cues in TASK_RULES:
        if name == "coding" and has_code:
            return name
        if found & cues:
            return name
    return OTHER_TASK


@dataclass(frozen=True)
class OfflineRequest:
    """What the offline backend reads of a conversation: never shown as it is."""

    chat_id: str
    request: str  # the opening request, shortened and scrubbed of PII: embedded, never shown
    user_text: str  # the user's messages, cut and scrubbed: where key phrases are looked for
    languages: list[str]
    task: str
    user_turns: int
    metadata: dict


def read_request(conversation: Conversation) -> tuple[OfflineRequest, Counter[str]]:
    request, counts = scrub_pii(shorten(first_user_text(conversation), OFFLINE_SUMMARY_CHARS))
    languages = detect_languages(conversation)
    has_code = any(language not in COMMON_WORDS and language not in dict(_SCRIPTS) for language in languages)
    return (
        OfflineRequest(
            chat_id=conversation.chat_id,
            request=request,
            user_text=scrub_pii(" ".join(all_user_text(conversation).split())[:PHRASE_SOURCE_CHARS])[0],
            languages=languages,
            task=task_type(request, has_code),
            user_turns=sum(1 for m in conversation.messages if m.role == "user"),
            metadata=conversation.metadata,
        ),
        counts,
    )


TASK_WORDING = {
    "translation": "A translation request",
    "summarising": "A request to summarise a text",
    "role play": "A role-play request",
    "coding": "A coding request",
    "maths": "A maths request",
    "writing": "A writing request",
    "advice": "A request for advice or a plan",
    "question": "A question",
    OTHER_TASK: "A request",
}


def abstract_summary(task: str, phrases: list[str], languages: list[str], user_turns: int) -> str:
    """A summary made of a task type, shared key phrases and facets: never the user's sentences."""
    about = (
        f" about {', '.join(phrases)}"
        if phrases
        else " (no phrase it shares with enough other conversations)"
    )
    parts = [f"{TASK_WORDING.get(task, TASK_WORDING[OTHER_TASK])}{about}"]
    if languages:
        parts.append(", ".join(languages))
    if user_turns > 1:
        parts.append(f"{user_turns} user turns")
    return " · ".join(parts)


NO_USER_MESSAGE = "no user message: nothing was asked, so nothing to summarise offline"


def summarise_all_offline(
    conversations: Iterable[Conversation],
    min_conversations: int = 5,
    min_users: int = 1,
    user_field: str = "user_id",
) -> SummaryRun:
    """Summaries with no model, in two passes: read every request, then describe each one with the
    phrases that at least `min_conversations` conversations of the dataset share (Clio's
    threshold: a phrase fewer people used is never shown). Facets that need judgement
    (concerning score, frustration, errors) are left empty rather than guessed; the task type is
    a keyword rule, said as such in the README."""
    run = SummaryRun(summaries=[])
    requests: list[OfflineRequest] = []
    for conversation in conversations:
        read, counts = read_request(conversation)
        requests.append(read)
        run.pii_scrubbed.update(counts)
    users = [_user_of(r.metadata, user_field) for r in requests]
    table = phrase_table([r.user_text for r in requests], min_conversations, users if min_users > 1 else None)
    for row, read in enumerate(requests):
        if not read.user_text.strip():
            # Nothing was asked (only assistant or system turns): summarised as "A request" and
            # clustered with real requests, it would be counted as usage. A failed row says why.
            run.failures[read.chat_id] = NO_USER_MESSAGE
            continue
        phrases = document_phrases(table, row, text=read.user_text, request=read.request)
        summary = abstract_summary(read.task, phrases, read.languages, read.user_turns)
        # Phrases are short, but three of them could sit side by side in the user's text: a
        # summary never repeats RUN_OF_WORDS consecutive words of it.
        while phrases and shares_run_of_words(summary, read.user_text):
            phrases = phrases[:-1]
            summary = abstract_summary(read.task, phrases, read.languages, read.user_turns)
        run.summaries.append(
            ConversationSummary(
                chat_id=read.chat_id,
                summary=summary,
                request=None,
                topic=offline_topic(read.task, phrases),
                task=read.task,
                languages=read.languages,
                metadata=read.metadata,
                clustering_text=read.request,
            )
        )
    return run


def offline_topic(task: str, phrases: list[str]) -> str | None:
    """Kura's `topic`, offline: the summary's first phrase, the shared one (at least
    `min_conversations` conversations use it, so no rare word of a user's) that the conversation
    uses most and asks about (`document_phrases`), else the task type
    where it names a subject (coding, maths, translation); None otherwise, not a guess."""
    if phrases:
        return phrases[0]
    return task if task in SUBJECT_TASKS else None


# Task types that also say what a conversation is about ("writing" or "question" do not).
SUBJECT_TASKS = frozenset({"coding", "maths", "translation"})


RUN_OF_WORDS = 8


def shares_run_of_words(shown: str, source: str, n: int = RUN_OF_WORDS) -> bool:
    """Whether `shown` repeats n consecutive words of `source` (punctuation and case ignored)."""
    shown_words = words(shown)
    if len(shown_words) < n:
        return False
    runs = {tuple(shown_words[i : i + n]) for i in range(len(shown_words) - n + 1)}
    source_words = words(source)
    return any(tuple(source_words[i : i + n]) in runs for i in range(len(source_words) - n + 1))


def _user_of(metadata: dict, field: str) -> str | None:
    value = metadata.get(field)
    return None if value is None else str(value)


def summary_from_response(
    conversation: Conversation, response: SummaryResponse
) -> tuple[ConversationSummary, Counter[str]]:
    """Scrub the model's text too: the prompt asks for no PII, the scrub makes sure of the obvious."""
    counts: Counter[str] = Counter()
    replied = has_assistant_reply(conversation)

    def clean(text: str) -> str:
        scrubbed, found = scrub_pii(text)
        counts.update(found)
        return scrubbed

    return (
        ConversationSummary(
            chat_id=conversation.chat_id,
            summary=clean(response.summary),
            request=clean(response.request),
            topic=clean(" ".join(response.topic.split()).lower()) or None,
            task=clean(response.task),
            languages=list(dict.fromkeys(language.lower().strip() for language in response.languages)),
            concerning_score=response.concerning_score,
            user_frustration=response.user_frustration,
            # No reply, no error of the assistant's: whatever a model lists there is invented.
            assistant_errors=[clean(error) for error in response.assistant_errors] if replied else [],
            metadata=conversation.metadata,
        ),
        counts,
    )


def has_assistant_reply(conversation: Conversation) -> bool:
    return any(m.role == "assistant" and m.content.strip() for m in conversation.messages)


def summary_transcript(conversation: Conversation, char_budget: int) -> str:
    """The transcript the summary prompt reads, marked when the assistant never answered (the
    prompt then asks the model to say nothing about an answer)."""
    transcript = format_conversation(conversation, char_budget)
    if has_assistant_reply(conversation):
        return transcript
    return f"{transcript}\n\n{NO_REPLY_MARKER}"


async def summarise_all_with_llm(
    conversations: list[Conversation], client: LLMClient, char_budget: int, label: str = "summaries"
) -> SummaryRun:
    """One call per conversation, all in flight up to the client's limits; failures are kept."""

    async def one(conversation: Conversation) -> SummaryResponse | LLMFailure:
        messages = SUMMARY_PROMPT.messages(transcript=summary_transcript(conversation, char_budget))
        return await client.complete(SUMMARY_PROMPT, messages, SummaryResponse)

    results = await client.gather([one(c) for c in conversations], label=label)
    run = SummaryRun(summaries=[])
    for conversation, result in zip(conversations, results, strict=True):
        if isinstance(result, LLMFailure):
            run.failures[conversation.chat_id] = result.reason
            continue
        summary, counts = summary_from_response(conversation, result)
        run.summaries.append(summary)
        run.pii_scrubbed.update(counts)
    return run
