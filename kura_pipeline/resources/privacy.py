"""The privacy policy: how big a cluster must be before a person may see it."""

from __future__ import annotations

from dagster import ConfigurableResource

from kura_pipeline.core.privacy import AggregationThreshold


class PrivacyPolicy(ConfigurableResource):
    """Clusters with fewer conversations, or fewer distinct users (read from the metadata field
    `user_id_field` where conversations carry it), are withheld from the tree, the UI metadata
    and the explorer, and counted as withheld. With an LLM, an auditor rates every shown cluster's
    name and description (Clio's scale 1-5) and withholds those rated below `min_audit_rating`."""

    min_cluster_conversations: int = 5
    min_cluster_users: int = 2
    user_id_field: str = "user_id"
    # With an LLM: clusters whose name and description the auditor rates below this (1-5) are
    # withheld. Offline, the rule-based scrub of every summary and name stands in.
    min_audit_rating: int = 3

    @property
    def threshold(self) -> AggregationThreshold:
        return AggregationThreshold(self.min_cluster_conversations, self.min_cluster_users)
