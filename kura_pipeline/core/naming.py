"""Naming clusters: the LLM's contrastive names, and offline names from phrases many of a
cluster's conversations share."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from kura_pipeline.core.llm import LLMClient, LLMFailure
from kura_pipeline.core.phrases import (
    STOP_WORDS,
    PhraseTable,
    SharedPhrase,
    group_phrases,
    phrase_table,
    words,
)
from kura_pipeline.core.privacy import scrub_pii
from kura_pipeline.core.prompts import (
    CLUSTER_NAME_PROMPT,
    EXAMPLE_NAMES,
    ClusterNameResponse,
    retry_note,
    with_retry_note,
)


@dataclass(frozen=True)
class ClusterLabel:
    name: str
    description: str
    failed_reason: str | None = None  # set when the LLM's answer could not be used: the label is offline


@dataclass
class NamingInputs:
    """What offline naming reads: each conversation's clustering text (one row of `table`) and,
    where known, its task type; the phrase table enforces Clio's threshold."""

    table: PhraseTable
    tasks: list[str | None]
    min_conversations: int = 5
    min_users: int = 1


def naming_inputs(
    texts: Sequence[str],
    tasks: Sequence[str | None] | None = None,
    users: Sequence[str | None] | None = None,
    min_conversations: int = 5,
    min_users: int = 1,
) -> NamingInputs:
    return NamingInputs(
        table=phrase_table(texts, min_conversations, users if min_users > 1 else None),
        tasks=list(tasks) if tasks is not None else [None] * len(texts),
        min_conversations=min_conversations,
        min_users=min_users,
    )


# The offline task types (a fixed vocabulary, never a user's word) as a reader says them.
TASK_PLURALS = {
    "coding": "coding requests",
    "question": "questions",
    "writing": "writing requests",
    "role play": "role-play requests",
    "advice": "requests for advice or plans",
    "maths": "maths requests",
    "translation": "translation requests",
    "summarising": "requests to summarise a text",
    "other": "other requests",
}


def _task_plural(task: str) -> str:
    return TASK_PLURALS.get(task, f"{task} requests")


def _tasks_name(tasks: list[str | None]) -> str:
    """A name from the task types alone, for a cluster whose conversations share no phrase."""
    known = Counter(t for t in tasks if t)
    if not known:
        return "Requests with no phrase in common"
    (first, n), *rest = known.most_common(2)
    if n >= 0.6 * len(tasks) or not rest:
        return _task_plural(first).capitalize()
    return f"Mixed {_task_plural(first)} and {_task_plural(rest[0][0])}"


def _label_name(phrases: list[SharedPhrase], taken: set[str], tasks: list[str | None]) -> str:
    """A short label from the best phrases ("Python code and pandas dataframe"), not used by
    another cluster: a reader must be able to tell two clusters apart by name."""
    texts = [p.phrase for p in phrases]
    options = [texts[:2], [texts[0], *texts[2:3]], texts[1:3], texts[:3]] if texts else [[_tasks_name(tasks)]]
    for option in options:
        if not option:
            continue
        name = option[0].capitalize() + (" and " + ", ".join(option[1:]) if len(option) > 1 else "")
        if len(option) > 2:
            name = option[0].capitalize() + ", " + ", ".join(option[1:-1]) + " and " + option[-1]
        if name.lower() not in taken:
            return name
    base = texts[0].capitalize() if texts else _tasks_name(tasks)
    known = Counter(t for t in tasks if t)
    # No parentheses: every view prints the size in parentheses right after the name.
    if texts and known:  # say what kind of requests tell this one apart
        with_task = f"{base} · {_task_plural(known.most_common(1)[0][0])}"
        if with_task.lower() not in taken:
            return with_task
    n = 2
    while f"{base} #{n}".lower() in taken:
        n += 1
    return f"{base} #{n}" if base.lower() in taken else base


def describe_offline(
    count: int, phrases: list[SharedPhrase], tasks: list[str | None], min_conversations: int
) -> str:
    """What the cluster's conversations ask for, in words its conversations share (each phrase
    used by at least `min_conversations` of them) and the task types of a fixed vocabulary."""
    known = Counter(t for t in tasks if t)
    parts = [f"{count} conversations."]
    if len(tasks) < count:  # the shares below are of the conversations a reader is shown
        parts.append(f"Of the {len(tasks)} in clusters shown:")
    if known:
        shown = [f"{_task_plural(task)} ({100 * n / len(tasks):.0f}%)" for task, n in known.most_common(2)]
        parts.append("Mostly " + " and ".join(shown) + ".")
    if phrases:
        parts.append(
            "Phrases its conversations share: "
            + ", ".join(f"{p.phrase} ({100 * p.share:.0f}%)" for p in phrases)
            + "."
        )
    else:
        parts.append("No phrase is shared by enough of its conversations to name it.")
    parts.append(f"Named offline, from phrases at least {min_conversations} of its conversations use.")
    return " ".join(parts)


def offline_labels(
    inputs: NamingInputs,
    groups: Sequence[Sequence[int]],
    counts: Sequence[int] | None = None,
    taken: set[str] | None = None,
) -> list[ClusterLabel]:
    """Names and descriptions for groups of conversations (rows of the inputs' table), made only
    of phrases that at least `min_conversations` conversations (and `min_users` users) of the
    group share; `counts` are the clusters' true sizes where the groups leave some out (the
    conversations of withheld children); `taken` holds names already used (lower-case)."""
    taken = set() if taken is None else taken
    phrase_lists = group_phrases(inputs.table, groups, inputs.min_conversations, inputs.min_users)
    labels = []
    for g, (members, phrases) in enumerate(zip(groups, phrase_lists, strict=True)):
        tasks = [inputs.tasks[row] for row in members]
        name = _label_name(phrases, taken, tasks)
        taken.add(name.lower())
        count = counts[g] if counts is not None else len(members)
        labels.append(ClusterLabel(name, describe_offline(count, phrases, tasks, inputs.min_conversations)))
    return labels


# ----- guards: what a model's name or description may not be -----

# The naming prompts' own framing, which small models echo as a name ("Conversational
# Summaries", "Conversations with AI Assistant", "Ask for Help", "Request for Assistance"): one
# definition, for base names, proposed parents and renamed parents alike (and the benchmark's
# count of generic names). It covers benchmarks/bench_local_llm_quality.GENERIC_PATTERN.
GENERIC_NAME = re.compile(
    r"\bsummar(?:y|ies)\b|\bconversations?\b|\bconversational\b|\bassistants?\b|\b(?:the|this) group\b"
    r"|\busers? (?:request|ask|seek|want|need)s? (?:for )?(?:help|assistance|support)\b"
    r"|\brequests? for (?:help|assistance|support)\b|\bask(?:s|ed|ing)? for (?:help|assistance)\b",
    re.IGNORECASE,
)
# Words that say nothing about what was asked: a name made only of these ("Help Request Group",
# "General Questions", "Ask for Help") fits any cluster.
_FILLER_TEXT = """
    a an the and or of for with to on about in from by into at as their them its my your our
    some any all various general misc miscellaneous other others assorted mixed different
    help helping helpful assist assisting assistance support supporting request requests
    requested requesting ask asks asked asking seek seeking need needs want wants get
    getting give giving provide providing offer offering answer answers answering respond
    response responses question questions query queries inquiry inquiries task tasks topic
    topics category categories group groups kind kinds type types user users people person
    information info stuff things thing issue issues interaction interactions discussion
    discussions describe describes describing description name names naming label labels
    sentence"""  # the instruction's own verbs: 1.5B named a cluster "Describe the users' requests"
_FILLER_WORDS = frozenset(_FILLER_TEXT.split())
_FRAMING_WORDS = frozenset(
    {
        "summary",
        "summaries",
        "conversation",
        "conversations",
        "conversational",
        "chat",
        "chats",
        "chatbot",
        "assistant",
        "assistants",
        "ai",
    }
)
# Descriptions that describe the prompt ("A group of conversation summaries created by an AI
# assistant to help product teams ...") rather than the requests.
FRAMING_DESCRIPTION = re.compile(
    r"\bsummar(?:y|ies) of (?:the |these |those |several |many )?(?:\w+ )?conversations?\b"
    r"|\bconversation(?:al)? summar(?:y|ies)\b|\b(?:this|the) group\b"
    r"|\ba group of (?:conversation|summar|request|user)|\bproduct teams?\b",
    re.IGNORECASE,
)


def name_key(name: str) -> str:
    """A name as compared with another: case, punctuation and spacing ignored."""
    return " ".join(re.findall(r"[^\W_]+", name.lower()))


_EXAMPLE_KEYS = frozenset(name_key(example) for example in EXAMPLE_NAMES)


def generic_name(name: str) -> str | None:
    """Why `name` says nothing about what its users asked for (None when it does): the prompt's
    framing words, only filler words, or the prompt's own example copied."""
    key = name_key(name)
    if not key:
        return "is empty"
    if key in _EXAMPLE_KEYS:
        return "copies the example in the instructions"
    if found := GENERIC_NAME.search(name):
        return f"uses {found.group(0)!r}, words of the instructions, not of the requests"
    if all(word in _FILLER_WORDS or word in _FRAMING_WORDS for word in key.split()):
        return "is generic: it would fit any requests, it names no subject"
    return None


def _sentences(text: str) -> list[str]:
    return [name_key(s) for s in re.split(r"(?<=[.!?;])\s+", text) if len(name_key(s).split()) >= 6]


def copied_descriptions(description: str, children: Iterable[str]) -> bool:
    """Whether `description` copies a child's description (a sentence of six words or more of
    one of them, word for word): a parent is described in its own words, never pasted together."""
    text = name_key(description)
    return any(sentence in text for child in children for sentence in _sentences(child))


# A label is "about one request" when one of the requests it was shown holds most of its words
# and no other holds more than one of them: the local 0.5B named a cluster of 18 "Learn about the
# negatives of farming meat" and described it "Design a platform for Online Community Leaders
# ...", lifted from the first two of the summaries it was shown. An abstract name ("Creative
# writing") that no request spells out is fine: only a label lifted from one request is asked
# again.
MIN_REQUESTS_FOR_ONE_REQUEST_CHECK = 4


def _content_words(text: str) -> set[str]:
    return {word for word in words(text) if len(word) >= 3 and word not in STOP_WORDS}


def about_one_request(text: str, requests: Sequence[str]) -> bool:
    """Whether `text` (a name or description) is lifted from one of `requests`: one holds at
    least 60 % of its content words (two at least), and hardly any other request (one, or a
    tenth of them) holds a fifth of them. "Debug Python code" over a cluster of Python
    questions is not: most of them say "python"; a description that shares "design" with a
    second request still is."""
    mine = _content_words(text)
    if len(mine) < 2 or len(requests) < MIN_REQUESTS_FOR_ONE_REQUEST_CHECK:
        return False
    overlaps = sorted((len(mine & _content_words(request)) for request in requests), reverse=True)
    others_sharing = sum(1 for n in overlaps[1:] if n and n >= 0.2 * len(mine))
    return overlaps[0] >= max(2, 0.6 * len(mine)) and others_sharing <= max(1, 0.1 * (len(requests) - 1))


@dataclass(frozen=True)
class LabelProblem:
    """Why a model's label cannot be used as it is: its name, or only its description."""

    name: str | None = None
    description: str | None = None

    def note(self, label: ClusterLabel) -> str:
        """The reason as the model is told it when asked again."""
        if self.name:
            return retry_note(f'the name "{label.name}"', self.name)
        return retry_note("the description", self.description or "")


def label_problems(
    labels: Mapping[int, ClusterLabel],
    fixed: Iterable[str] = (),
    children: Mapping[int, Sequence[ClusterLabel]] | None = None,
    order: Sequence[int] | None = None,
    requests: Mapping[int, Sequence[str]] | None = None,
) -> dict[int, LabelProblem]:
    """The labels that cannot be used, and why: a generic name, a name equal (case and
    punctuation aside) to one in `fixed` (names that stay: kept or promoted siblings), to an
    earlier label's in `order` (the first keeps it) or to one of its own `children`'s; a
    description in the prompt's framing or copied from a child's; a name or description lifted
    from one of the `requests` the model was shown (`about_one_request`). Pure: tests call it
    directly."""
    children = children or {}
    requests = requests or {}
    taken = {name_key(name) for name in fixed}
    problems: dict[int, LabelProblem] = {}
    for i in order if order is not None else sorted(labels):
        label = labels[i]
        kids = children.get(i, ())
        key = name_key(label.name)
        name_problem = generic_name(label.name)
        if name_problem is None and key in {name_key(kid.name) for kid in kids}:
            name_problem = "is the name of one of the clusters it holds; it must be broader than each"
        if name_problem is None and key in taken:
            name_problem = "is already the name of another cluster; say what sets these requests apart"
        shown = requests.get(i, ())
        if name_problem is None and about_one_request(label.name, shown):
            name_problem = f"names one request of the {len(shown)}; say what most of them ask for"
        description_problem = None
        if found := FRAMING_DESCRIPTION.search(label.description):
            description_problem = f"uses {found.group(0)!r}, words of the instructions, not of the requests"
        elif copied_descriptions(label.description, (kid.description for kid in kids)):
            description_problem = (
                "copies the descriptions of the clusters it holds; write it in your own words"
            )
        elif about_one_request(label.description, shown):
            description_problem = (
                f"describes one request of the {len(shown)}; describe what most of them ask for"
            )
        if name_problem is None:
            taken.add(key)
        if name_problem or description_problem:
            problems[i] = LabelProblem(name_problem, description_problem)
    return problems


Ask = Callable[[int, str | None], Awaitable[ClusterNameResponse | LLMFailure]]


@dataclass(frozen=True)
class Reviewed:
    """A model's label after the guard: `label` is usable as it is when `problem` is None; with a
    name problem (or a failed call) nothing of it is used, with a description problem only its name."""

    label: ClusterLabel | None
    problem: str | None = None  # why the label falls back (the cluster's `fallback`)
    name_ok: bool = False


def _as_label(reply: ClusterNameResponse) -> ClusterLabel:
    return ClusterLabel(scrub_pii(reply.name)[0], scrub_pii(reply.description)[0])


async def reviewed_labels(
    client: LLMClient,
    ask: Ask,
    indices: Sequence[int],
    label: str,
    fixed: Iterable[str] = (),
    children: Mapping[int, Sequence[ClusterLabel]] | None = None,
    requests: Mapping[int, Sequence[str]] | None = None,
) -> dict[int, Reviewed]:
    """Ask the model for each index's label (`ask(i, None)`), then ask once more, with the reason
    appended (`ask(i, note)`: a distinct message, so a distinct cache key), for each label
    `label_problems` rejects; what is still rejected after that comes back with its reason, for
    the caller to replace by the offline label."""
    fixed = list(fixed)
    first = await client.gather([ask(i, None) for i in indices], label=label)
    replies = dict(zip(indices, first, strict=True))
    labels = {i: _as_label(r) for i, r in replies.items() if isinstance(r, ClusterNameResponse)}
    order = [i for i in indices if i in labels]
    problems = label_problems(labels, fixed, children, order=order, requests=requests)
    again = list(problems)
    # Not `client.gather`: its check would fail the stage for one failed retry; `run_llm` checks
    # the stage's share of failed calls over all of them.
    second = await asyncio.gather(*(ask(i, problems[i].note(labels[i])) for i in again))
    out: dict[int, Reviewed] = {}
    for i, reply in replies.items():
        if not isinstance(reply, ClusterNameResponse):
            why = reply.reason if isinstance(reply, LLMFailure) else "no answer"
            out[i] = Reviewed(None, f"named without the LLM: {why}")
        elif i not in problems:
            out[i] = Reviewed(labels[i], name_ok=True)
    retried: dict[int, ClusterLabel] = {}
    for i, reply in zip(again, second, strict=True):
        if isinstance(reply, ClusterNameResponse):
            retried[i] = _as_label(reply)
            continue
        problem, failure = problems[i], reply.reason if isinstance(reply, LLMFailure) else "no answer"
        if problem.name:
            out[i] = Reviewed(
                None,
                f"named without the LLM: the model's name {labels[i].name!r} {problem.name}; "
                f"asked again, the call failed: {failure}",
            )
        else:
            out[i] = Reviewed(
                labels[i],
                f"described without the LLM: the model's description {problem.description}; "
                f"asked again, the call failed: {failure}",
                name_ok=True,
            )
    # The labels that passed first keep their names; the answers asked again come after them.
    settled = {i: labels[i] for i in indices if i in labels and i not in problems}
    still = label_problems(settled | retried, fixed, children, order=[*settled, *retried], requests=requests)
    for i, new in retried.items():
        problem = still.get(i)
        if problem is None:
            out[i] = Reviewed(new, name_ok=True)
        elif problem.name and problems[i].name is None:  # asked again for its description only
            out[i] = Reviewed(
                labels[i],
                f"described without the LLM: the model's description {problems[i].description}; "
                f"asked again, its new name {new.name!r} {problem.name}",
                name_ok=True,
            )
        elif problem.name:
            out[i] = Reviewed(
                None,
                f"named without the LLM: the model's name {new.name!r} {problem.name} "
                f"(asked twice; first {labels[i].name!r})",
            )
        else:
            out[i] = Reviewed(
                new,
                f"described without the LLM: the model's description {problem.description} (asked twice)",
                name_ok=True,
            )
    return out


def resolve_labels(
    reviewed: Sequence[Reviewed], name_offline: Callable[[list[int]], list[ClusterLabel]]
) -> list[ClusterLabel]:
    """The usable labels: a reviewed label that fell back gets the offline label of its group
    (`name_offline`, given the positions of those), or the offline description under the model's
    name when only its description was rejected; either way it keeps the reason."""
    fallen = [i for i, r in enumerate(reviewed) if r.problem is not None]
    offline = dict(zip(fallen, name_offline(fallen) if fallen else [], strict=True))
    labels = []
    for i, r in enumerate(reviewed):
        if r.problem is None and r.label is not None:
            labels.append(r.label)
        elif r.name_ok and r.label is not None:
            labels.append(ClusterLabel(r.label.name, offline[i].description, r.problem))
        else:
            labels.append(ClusterLabel(offline[i].name, offline[i].description, r.problem))
    return labels


def _bullets(texts: list[str], char_limit: int = 400) -> str:
    return "\n".join(f"- {text[:char_limit]}" for text in texts)


async def llm_labels(
    client: LLMClient,
    inside_per_group: list[list[str]],
    outside_per_group: list[list[str]],
    name_offline: Callable[[list[int]], list[ClusterLabel]],
) -> list[ClusterLabel]:
    """Clio's contrastive naming: the group's summaries against its nearest outsiders. A name the
    guard rejects (generic, or a sibling's) is asked for once more with the reason; a group whose
    call failed, or whose name is still rejected, is named by `name_offline` (given those groups'
    indices) and keeps the reason, so the cluster is marked as named without the LLM."""

    async def ask(i: int, note: str | None) -> ClusterNameResponse | LLMFailure:
        messages = CLUSTER_NAME_PROMPT.messages(
            inside=_bullets(inside_per_group[i]), outside=_bullets(outside_per_group[i]) or "- (none)"
        )
        if note is not None:
            messages = with_retry_note(messages, note)
        return await client.complete(CLUSTER_NAME_PROMPT, messages, ClusterNameResponse)

    indices = list(range(len(inside_per_group)))
    reviewed = await reviewed_labels(
        client, ask, indices, label="cluster names", requests=dict(enumerate(inside_per_group))
    )
    return resolve_labels([reviewed[i] for i in indices], name_offline)
