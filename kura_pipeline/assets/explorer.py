"""The explorer asset: one self-contained HTML page per dataset, stored next to the Parquet tables.

The page is the asset's value, so an IO manager stores it, like every other stage: the asset
stays a plain function of its inputs, and where pages go (a local folder or an fsspec URL, the
same base path as the Parquet tables) is configured once, with the other resources.
"""

import polars as pl
from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetRecordsFilter,
    Config,
    MetadataValue,
    Output,
    asset,
)

from kura_pipeline.core.render.explorer import (
    build_explorer_data,
    map_png,
    png_markdown,
    render_html,
    top_clusters_markdown,
)
from kura_pipeline.partitions import datasets_partitions
from kura_pipeline.resources.io_manager import HtmlIOManager, HtmlUPathIOManager
from kura_pipeline.resources.privacy import PrivacyPolicy

# Where the page is stored is the IO manager's (resources/io_manager.py); kept importable here.
__all__ = ["HtmlIOManager", "HtmlUPathIOManager"]


def summaries_backend(context: AssetExecutionContext) -> str | None:
    """The `backend` the latest summaries of this dataset were made with (None when unknown):
    the page blames the offline backend for empty facets only when it really was offline."""
    records = context.instance.fetch_materializations(
        AssetRecordsFilter(
            asset_key=AssetKey("conversation_summaries"), asset_partitions=[context.partition_key]
        ),
        limit=1,
    ).records
    if not records or records[0].asset_materialization is None:
        return None
    value = records[0].asset_materialization.metadata.get("backend")
    return value.value if value is not None and isinstance(value.value, str) else None


class ExplorerConfig(Config):
    # Off by default: the page then holds summaries (scrubbed of PII), never what users wrote.
    show_conversations: bool = False


@asset(
    partitions_def=datasets_partitions,
    group_name="kura",
    kinds={"html", "plotly"},
    io_manager_key="html_io_manager",
)
def explorer(
    context: AssetExecutionContext,
    config: ExplorerConfig,
    conversation_summaries: pl.DataFrame,
    extracted_properties: pl.DataFrame,
    meta_clusters: pl.DataFrame,
    projections: pl.DataFrame,
    raw_conversations: pl.DataFrame,
    privacy: PrivacyPolicy,
) -> Output[str]:
    """A page to browse the dataset: the cluster tree, the 2-D map, breakdowns by every facet
    and property, filters, and cluster sizes over time. It opens from disk, with no network."""
    data = build_explorer_data(
        dataset=context.partition_key,
        conversation_summaries=conversation_summaries,
        extracted_properties=extracted_properties,
        meta_clusters=meta_clusters,
        projections=projections,
        raw_conversations=raw_conversations,
        show_conversations=config.show_conversations,
        backend=summaries_backend(context),
        user_id_field=privacy.user_id_field,
    )
    page = render_html(data)
    if config.show_conversations:
        context.log.warning("the explorer page includes the conversations' text (show_conversations)")
    return Output(
        page,
        metadata={
            "map": MetadataValue.md(
                png_markdown(map_png(data), f"map of {data.conversations} conversations")
            ),
            "top_clusters": MetadataValue.md(top_clusters_markdown(data)),
            "dagster/row_count": data.conversations,
            "conversations": data.conversations,
            "clusters": len(data.cluster_ids),
            "fallback_clusters": sum(1 for f in data.cluster_fallbacks if f),
            "withheld_clusters": data.withheld_clusters,
            "withheld_conversations": data.withheld_conversations,
            "facets": MetadataValue.json([f.name for f in data.facets]),
            "size_bytes": len(page.encode("utf-8")),
            "show_conversations": config.show_conversations,
        },
    )
