"""One module per stage, named after the asset it defines, in the order the data walks."""

from kura_pipeline.assets.base_clusters import base_clusters
from kura_pipeline.assets.conversation_summaries import conversation_summaries
from kura_pipeline.assets.evaluation import evaluation
from kura_pipeline.assets.explorer import explorer
from kura_pipeline.assets.extracted_properties import extracted_properties
from kura_pipeline.assets.meta_clusters import meta_clusters
from kura_pipeline.assets.projections import projections
from kura_pipeline.assets.raw_conversations import raw_conversations
from kura_pipeline.assets.summary_embeddings import summary_embeddings

ALL_ASSETS = [
    raw_conversations,
    conversation_summaries,
    extracted_properties,
    summary_embeddings,
    base_clusters,
    meta_clusters,
    projections,
    explorer,
    evaluation,
]
