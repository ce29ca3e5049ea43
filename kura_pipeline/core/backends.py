"""The backends: what summarises, names clusters, builds the hierarchy and audits it.

Each job is one small interface with an offline and an LLM implementation (as BERTopic takes
its representation model, or Dagster's examples swap a client), chosen once where the
resources are built (`LLMResource.select_backend`). Asset bodies call these and hold no backend branch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import polars as pl

from kura_pipeline.core.calibration import (
    OFFLINE_REASON,
    FacetCalibration,
    assess_calibration,
    calibration_conversations,
    calibration_not_run,
    ratings_of,
)
from kura_pipeline.core.cluster import choose_top_k
from kura_pipeline.core.frames import frame_to_conversations, iter_conversation_chunks, summaries_by_chat
from kura_pipeline.core.hierarchy import (
    LevelPlan,
    build_hierarchy,
    build_offline_hierarchy,
    member_embeddings,
    plan_level_clio,
)
from kura_pipeline.core.llm import LLMClient, LLMStageFailed, combined_metadata, run_llm
from kura_pipeline.core.models import Cluster, Conversation
from kura_pipeline.core.naming import (
    TASK_PLURALS,
    ClusterLabel,
    NamingInputs,
    llm_labels,
    naming_inputs,
    offline_labels,
)
from kura_pipeline.core.privacy import AggregationThreshold, users_from_metadata
from kura_pipeline.core.privacy_audit import audit_clusters, withheld_by_audit
from kura_pipeline.core.prompts import SUMMARY_PROMPT
from kura_pipeline.core.summarise import SummaryRun, summarise_all_offline, summarise_all_with_llm, task_type

OFFLINE_LABEL = "offline (no LLM)"


@dataclass
class Corpus:
    """What naming reads of a dataset: each conversation's clustering text, task type and user,
    by chat id, with the phrase table that enforces the privacy threshold (built once)."""

    row_of: dict[str, int]
    texts: list[str]
    naming: NamingInputs
    users: list[str | None] | None = None  # a user id per row, where conversations carry one

    @classmethod
    def build(
        cls,
        chat_ids: Sequence[str],
        texts: Sequence[str],
        tasks: Sequence[str | None],
        users: Sequence[str | None] | None,
        threshold: AggregationThreshold,
    ) -> Corpus:
        return cls(
            row_of={chat: row for row, chat in enumerate(chat_ids)},
            texts=list(texts),
            naming=naming_inputs(texts, tasks, users, threshold.min_conversations, threshold.min_users),
            users=list(users) if users is not None else None,
        )

    def rows(self, chat_ids: Sequence[str]) -> list[int]:
        return [self.row_of[chat] for chat in chat_ids if chat in self.row_of]

    def user_of(self) -> dict[str, str]:
        """chat id -> user id, for the conversations that carry one."""
        if self.users is None:
            return {}
        return {chat: user for chat, row in self.row_of.items() if (user := self.users[row]) is not None}


def dataset_corpus(
    summaries: pl.DataFrame, chat_ids: Sequence[str], threshold: AggregationThreshold, user_field: str
) -> Corpus:
    """The corpus of the embedded conversations, in `chat_ids` order (the embedding rows)."""
    ok = summaries.filter(pl.col("failure_reason").is_null())
    text_of = summaries_by_chat(ok)
    # Offline names and descriptions speak of task types from a fixed vocabulary; an LLM's
    # summary has a free-text task ("The task is to ..."): its type comes from the same rule.
    task_of = {
        chat: task if task in TASK_PLURALS else task_type(text_of.get(chat) or "")
        for chat, task in zip(ok["chat_id"].to_list(), ok["task"].to_list(), strict=True)
    }
    users = users_from_metadata(ok["metadata"].to_list(), ok["chat_id"].to_list(), user_field)
    return Corpus.build(
        chat_ids,
        [text_of.get(chat, "") for chat in chat_ids],
        [task_of.get(chat) for chat in chat_ids],
        [users.get(chat) for chat in chat_ids] if users else None,
        threshold,
    )


@dataclass
class BaseGroups:
    """Base clusters to name: every group's member rows (offline names contrast every group),
    and for the LLM a sample of each against its nearest outsiders."""

    members: list[list[int]]
    inside: list[list[int]]
    outside: list[list[int]]


@dataclass
class HierarchyInputs:
    base_clusters: list[Cluster]
    embedding_of: dict[str, np.ndarray]
    corpus: Corpus
    withheld_base: set[str]  # base clusters below the privacy threshold: they lend no words
    max_top_clusters: int = 10
    branching_factor: float = 4.0
    seed: int = 0


@dataclass
class HierarchyResult:
    clusters: list[Cluster]
    plans: list[LevelPlan] = field(default_factory=list)


class Summariser(Protocol):
    def summarise(
        self, raw_conversations: pl.DataFrame, threshold: AggregationThreshold, user_field: str
    ) -> SummaryRun: ...

    def calibrate_facets(self) -> FacetCalibration:
        """The summariser run on the facet calibration set, as it summarises a dataset."""
        ...


class ClusterNamer(Protocol):
    # How much of each cluster the namer reads: (inside, outside) samples; None = every member.
    sample_limits: tuple[int, int] | None
    names_are_free: bool

    def name(self, corpus: Corpus, groups: BaseGroups, which: list[int]) -> dict[int, ClusterLabel]: ...


class HierarchyBuilder(Protocol):
    def build(self, inputs: HierarchyInputs) -> HierarchyResult: ...


class Auditor(Protocol):
    def withheld(self, clusters: list[Cluster], min_rating: int) -> set[str]: ...


def name_groups_offline(inputs: HierarchyInputs) -> Callable[[list[list[Cluster]]], list[ClusterLabel]]:
    """Names for groups of clusters from their conversations' shared phrases; withheld base
    clusters lend no words, and names already used (every base cluster's) are not reused."""
    taken = {c.name.lower() for c in inputs.base_clusters}
    hidden_chats = {chat for b in inputs.base_clusters if b.id in inputs.withheld_base for chat in b.chat_ids}

    def name(groups: list[list[Cluster]]) -> list[ClusterLabel]:
        rows = [
            inputs.corpus.rows(
                [chat for cluster in group for chat in cluster.chat_ids if chat not in hidden_chats]
            )
            for group in groups
        ]
        counts = [sum(c.count for c in group) for group in groups]
        return offline_labels(inputs.corpus.naming, rows, counts, taken)

    return name


class OfflineBackend:
    """No model: abstract summaries, names from shared phrases, the top-down hierarchy."""

    label = OFFLINE_LABEL
    sample_limits: tuple[int, int] | None = None
    names_are_free = True  # naming costs nothing: every cluster is named afresh each run

    def summarise(
        self, raw_conversations: pl.DataFrame, threshold: AggregationThreshold, user_field: str
    ) -> SummaryRun:
        # Conversations as models a chunk at a time: all of them next to the table took 4 GB at
        # 100,000 conversations.
        def conversations() -> Any:
            for chunk in iter_conversation_chunks(raw_conversations):
                yield from chunk

        return summarise_all_offline(
            conversations(), threshold.min_conversations, threshold.min_users, user_field
        )

    def calibrate_facets(self) -> FacetCalibration:
        # The same test as a model's, not an exemption: the offline summary rates nothing (no
        # keyword rule could judge intent), so it fails and its facets read "not assessed".
        run = summarise_all_offline(calibration_conversations())
        verdict = assess_calibration(self.label, "offline summary", ratings_of(run.summaries))
        return replace(verdict, reason=OFFLINE_REASON)

    def name(self, corpus: Corpus, groups: BaseGroups, which: list[int]) -> dict[int, ClusterLabel]:
        labels = offline_labels(corpus.naming, groups.members)  # contrast needs every group
        return {i: labels[i] for i in which}

    def build(self, inputs: HierarchyInputs) -> HierarchyResult:
        clusters = build_offline_hierarchy(
            inputs.base_clusters,
            inputs.embedding_of,
            name_groups_offline(inputs),
            max_top_clusters=inputs.max_top_clusters,
            branching_factor=inputs.branching_factor,
            seed=inputs.seed,
        )
        return HierarchyResult(clusters)

    def withheld(self, clusters: list[Cluster], min_rating: int) -> set[str]:
        return set()  # no auditor without a model: the scrub and the thresholds stand in

    def metadata(self) -> dict[str, Any]:
        return {}


class LLMBackend:
    """Clio with a model: facet summaries, contrastive names, the bottom-up hierarchy, the audit.
    Whatever falls back to the offline way is marked on the cluster (`fallback`)."""

    def __init__(
        self, label: str, summary_client: LLMClient, cluster_client: LLMClient, char_budget: int
    ) -> None:
        self.label = label
        self.summary_client = summary_client
        self.cluster_client = cluster_client
        self.char_budget = char_budget
        self.sample_limits: tuple[int, int] | None = (25, 10)
        self.names_are_free = False  # a kept cluster keeps its name and costs no call
        self._used: list[LLMClient] = []

    def _run(self, coroutine: Any, client: LLMClient) -> Any:
        if client not in self._used:
            self._used.append(client)
        return run_llm(coroutine, client)

    def summarise(
        self, raw_conversations: pl.DataFrame, threshold: AggregationThreshold, user_field: str
    ) -> SummaryRun:
        # One gather over every conversation: one progress line and ETA for the whole stage.
        conversations: list[Conversation] = frame_to_conversations(raw_conversations)
        return self._run(
            summarise_all_with_llm(conversations, self.summary_client, self.char_budget), self.summary_client
        )

    def calibrate_facets(self) -> FacetCalibration:
        """The summary model and prompt on the calibration set: every call goes through the
        response cache, so a model is calibrated once per prompt version. An endpoint that fails
        the calibration leaves the facets not assessed; the summaries stage then says the rest."""
        model = self.summary_client.settings.model
        try:
            run = self._run(
                summarise_all_with_llm(
                    calibration_conversations(), self.summary_client, self.char_budget, "facet calibration"
                ),
                self.summary_client,
            )
        except LLMStageFailed as error:
            return calibration_not_run(model, SUMMARY_PROMPT.key, str(error))
        return assess_calibration(model, SUMMARY_PROMPT.key, ratings_of(run.summaries))

    def name(self, corpus: Corpus, groups: BaseGroups, which: list[int]) -> dict[int, ClusterLabel]:
        if not which:
            return {}
        texts = corpus.texts

        def offline(failed: list[int]) -> list[ClusterLabel]:
            # Named against every group, as offline naming does (phrases all groups share, such
            # as "user's overall request", name none of them), then the fallen ones picked.
            every = offline_labels(corpus.naming, groups.members)
            return [every[which[i]] for i in failed]

        named = self._run(
            llm_labels(
                self.cluster_client,
                [[texts[r] for r in groups.inside[i]] for i in which],
                [[texts[r] for r in groups.outside[i]] for i in which],
                offline,
            ),
            self.cluster_client,
        )
        return dict(zip(which, named, strict=True))

    def build(self, inputs: HierarchyInputs) -> HierarchyResult:
        name_offline = name_groups_offline(inputs)

        def plan(children: list[Cluster], centroids: np.ndarray, target: int) -> LevelPlan:
            return self._run(
                plan_level_clio(self.cluster_client, children, centroids, target, inputs.seed, name_offline),
                self.cluster_client,
            )

        embeddings = member_embeddings(inputs.base_clusters, inputs.embedding_of)
        top = choose_top_k(embeddings, inputs.max_top_clusters, inputs.seed)
        clusters, plans = build_hierarchy(
            inputs.base_clusters,
            inputs.embedding_of,
            plan,
            max_top_clusters=inputs.max_top_clusters,
            branching_factor=inputs.branching_factor,
            top_clusters=top,
        )
        return HierarchyResult(clusters, plans)

    def withheld(self, clusters: list[Cluster], min_rating: int) -> set[str]:
        ratings = self._run(audit_clusters(self.cluster_client, clusters), self.cluster_client)
        return withheld_by_audit(ratings, min_rating)

    def metadata(self) -> dict[str, Any]:
        return combined_metadata(self._used) if self._used else {}


Backend = OfflineBackend | LLMBackend
