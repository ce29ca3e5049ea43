import polars as pl
from dagster import AssetExecutionContext, Output, asset

from kura_pipeline.core.frames import clustering_texts, embeddings_to_frame
from kura_pipeline.partitions import datasets_partitions
from kura_pipeline.resources.embedder import EmbedderResource


@asset(partitions_def=datasets_partitions, group_name="kura", kinds={"polars", "parquet"})
def summary_embeddings(
    context: AssetExecutionContext, conversation_summaries: pl.DataFrame, embedder: EmbedderResource
) -> Output:
    """One unit vector per successful summary. Only the summary's clustering text is embedded (the
    LLM's summary, or the offline backend's scrubbed request): never the metadata or the chat id
    (Kura embeds those too, which pulls unrelated chats together)."""
    ok = conversation_summaries.filter(pl.col("failure_reason").is_null())
    embeddings, computed = embedder.embed(clustering_texts(ok))
    return Output(
        embeddings_to_frame(ok["chat_id"].to_list(), embeddings),
        metadata={
            "embedder": embedder.description,
            "computed": computed,
            "from_cache": ok.height - computed,
            "dimensions": int(embeddings.shape[1]) if embeddings.ndim == 2 else 0,
        },
    )
