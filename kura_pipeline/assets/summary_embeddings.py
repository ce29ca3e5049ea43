import polars as pl
from dagster import AssetExecutionContext, Output, asset

from kura_pipeline.core.frames import embeddings_to_frame, frame_to_summaries
from kura_pipeline.partitions import datasets_partitions
from kura_pipeline.resources.embedder import EmbedderResource


@asset(partitions_def=datasets_partitions, group_name="kura", kinds={"polars", "parquet"})
def summary_embeddings(
    context: AssetExecutionContext, conversation_summaries: pl.DataFrame, embedder: EmbedderResource
) -> Output:
    """One unit vector per successful summary. Only the summary text is embedded: never the
    metadata or the chat id (Kura embeds those too, which pulls unrelated chats together)."""
    summaries = frame_to_summaries(conversation_summaries)
    embeddings, computed = embedder.embed([s.summary for s in summaries])
    return Output(
        embeddings_to_frame([s.chat_id for s in summaries], embeddings),
        metadata={
            "embedder": embedder.description,
            "computed": computed,
            "from_cache": len(summaries) - computed,
            "dimensions": int(embeddings.shape[1]) if embeddings.ndim == 2 else 0,
        },
    )
