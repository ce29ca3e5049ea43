"""Clio's privacy auditor: an LLM rates each cluster's name and description for how identifying
it is; clusters rated below the threshold are withheld from everything a person reads."""

from __future__ import annotations

from kura_pipeline.core.llm import LLMClient, LLMFailure
from kura_pipeline.core.models import Cluster
from kura_pipeline.core.prompts import PRIVACY_AUDIT_PROMPT, PrivacyRatingResponse


async def audit_clusters(client: LLMClient, clusters: list[Cluster]) -> dict[str, int | None]:
    """cluster id -> rating 1-5 (None when the audit call failed: such a cluster is withheld,
    since an unaudited text must not be shown)."""

    async def one(cluster: Cluster) -> PrivacyRatingResponse | LLMFailure:
        messages = PRIVACY_AUDIT_PROMPT.messages(text=f"{cluster.name}\n\n{cluster.description}")
        return await client.complete(PRIVACY_AUDIT_PROMPT, messages, PrivacyRatingResponse)

    replies = await client.gather([one(c) for c in clusters], label="privacy audit")
    return {
        cluster.id: None if isinstance(reply, LLMFailure) else reply.rating
        for cluster, reply in zip(clusters, replies, strict=True)
    }


def withheld_by_audit(ratings: dict[str, int | None], min_rating: int) -> set[str]:
    return {cid for cid, rating in ratings.items() if rating is None or rating < min_rating}
