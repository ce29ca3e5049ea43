"""Naming clusters: the LLM's contrastive names, and offline names from phrases many of a
cluster's conversations share."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kura_pipeline.core.llm import LLMClient, LLMFailure
from kura_pipeline.core.phrases import PhraseTable, SharedPhrase, group_phrases, phrase_table
from kura_pipeline.core.privacy import scrub_pii
from kura_pipeline.core.prompts import CLUSTER_NAME_PROMPT, ClusterNameResponse


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


def _bullets(texts: list[str], char_limit: int = 400) -> str:
    return "\n".join(f"- {text[:char_limit]}" for text in texts)


async def llm_labels(
    client: LLMClient,
    inside_per_group: list[list[str]],
    outside_per_group: list[list[str]],
    name_offline: Callable[[list[int]], list[ClusterLabel]],
) -> list[ClusterLabel]:
    """Clio's contrastive naming: the group's summaries against its nearest outsiders. A group
    whose call failed is named by `name_offline` (given the failed groups' indices) and keeps
    the reason, so the cluster is marked as named without the LLM."""

    async def one(inside: list[str], outside: list[str]) -> ClusterNameResponse | LLMFailure:
        messages = CLUSTER_NAME_PROMPT.messages(
            inside=_bullets(inside), outside=_bullets(outside) or "- (none)"
        )
        return await client.complete(CLUSTER_NAME_PROMPT, messages, ClusterNameResponse)

    results = await client.gather(
        [one(i, o) for i, o in zip(inside_per_group, outside_per_group, strict=True)],
        label="cluster names",
    )
    failed = [i for i, result in enumerate(results) if isinstance(result, LLMFailure)]
    offline = dict(zip(failed, name_offline(failed) if failed else [], strict=True))
    labels = []
    for i, result in enumerate(results):
        if isinstance(result, LLMFailure):
            label = offline[i]
            labels.append(
                ClusterLabel(label.name, label.description, f"named without the LLM: {result.reason}")
            )
        else:
            labels.append(ClusterLabel(scrub_pii(result.name)[0], scrub_pii(result.description)[0]))
    return labels
