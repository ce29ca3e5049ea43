"""Naming clusters: the LLM's contrastive names, and the offline names from distinctive terms."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, CountVectorizer

from kura_pipeline.core.llm import LLMClient, LLMFailure
from kura_pipeline.core.privacy import scrub_pii
from kura_pipeline.core.prompts import CLUSTER_NAME_PROMPT, ClusterNameResponse
from kura_pipeline.core.summarise import COMMON_WORDS

# Words of the offline summary template and the scrub placeholders say nothing about a cluster;
# words every request uses ("write", "want", "help") would name every cluster alike.
_TEMPLATE_WORDS = {"user", "asked", "turns", "url", "email", "phone", "number", "ip"}
_REQUEST_WORDS = {
    "write", "want", "need", "like", "help", "make", "create", "provide", "give", "use", "using",
    "used", "does", "did", "know", "please", "explain", "tell", "list", "new", "good", "just",
    "get", "let", "ll", "ve", "don", "im", "thanks", "thank", "hi", "hello", "yes", "okay", "ok",
    "following", "answer", "question", "questions", "example", "way", "act", "based", "sure",
}
STOP_WORDS = sorted(
    ENGLISH_STOP_WORDS
    | _TEMPLATE_WORDS
    | _REQUEST_WORDS
    | {word for words in COMMON_WORDS.values() for word in words}
)


@dataclass(frozen=True)
class ClusterLabel:
    name: str
    description: str
    failed_reason: str | None = None


def distinctive_terms(documents_per_group: list[list[str]], top_n: int = 6) -> list[list[str]]:
    """Class-based TF-IDF (as BERTopic's c-TF-IDF): terms frequent in a group, rare in others.

    Computed on the sparse counts, each group's best terms taken from its own non-zeros: a dense
    (groups x vocabulary) matrix is 12 GB at 10,000 groups. Ties in score go to the term that
    sorts first, so the names are reproducible."""
    joined = [" ".join(docs) for docs in documents_per_group]
    if not any(text.strip() for text in joined):
        return [[] for _ in joined]
    vectorizer = CountVectorizer(
        stop_words=STOP_WORDS, token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z0-9+#]{2,}\b", ngram_range=(1, 2)
    )
    try:
        counts = vectorizer.fit_transform(joined).astype(np.float64).tocsr()
    except ValueError:  # only stop words everywhere
        return [[] for _ in joined]
    counts.sort_indices()  # columns in vocabulary (alphabetical) order within each row
    terms = vectorizer.get_feature_names_out()
    group_words = np.asarray(counts.sum(axis=1)).ravel()
    average_words = counts.sum() / len(joined)
    idf = np.log(1 + average_words / np.maximum(np.asarray(counts.sum(axis=0)).ravel(), 1))
    result: list[list[str]] = []
    for g in range(counts.shape[0]):
        row = slice(counts.indptr[g], counts.indptr[g + 1])
        columns = counts.indices[row]
        scores = counts.data[row] / max(group_words[g], 1) * idf[columns]
        picked: list[str] = []
        for index in columns[np.lexsort((columns, -scores))]:  # score descending, then term
            if len(picked) == top_n:
                break
            term = str(terms[index])
            # Skip a unigram already inside a picked bigram and vice versa: no "python, python code".
            if any(term in other or other in term for other in picked):
                continue
            picked.append(term)
        result.append(picked)
    return result


def offline_labels(documents_per_group: list[list[str]]) -> list[ClusterLabel]:
    """Names made of the terms that set each group apart; honest about how they were made."""
    labels = []
    for docs, terms in zip(documents_per_group, distinctive_terms(documents_per_group), strict=True):
        if terms:
            name = ", ".join(terms[:3]).capitalize()
            description = (
                f"{len(docs)} conversations whose summaries most distinctively mention "
                f"{', '.join(terms)}. Named offline from distinctive terms, without an LLM."
            )
        else:
            name = "Conversations without distinctive terms"
            description = f"{len(docs)} conversations. Named offline, without an LLM."
        labels.append(ClusterLabel(name=name, description=description))
    return labels


def _bullets(texts: list[str], char_limit: int = 400) -> str:
    return "\n".join(f"- {text[:char_limit]}" for text in texts)


async def llm_labels(
    client: LLMClient,
    inside_per_group: list[list[str]],
    outside_per_group: list[list[str]],
) -> list[ClusterLabel]:
    """Clio's contrastive naming: the group's summaries against its nearest outsiders."""

    async def one(inside: list[str], outside: list[str]) -> ClusterNameResponse | LLMFailure:
        messages = CLUSTER_NAME_PROMPT.messages(
            inside=_bullets(inside), outside=_bullets(outside) or "- (none)"
        )
        return await client.complete(CLUSTER_NAME_PROMPT, messages, ClusterNameResponse)

    results = await client.gather(
        [one(i, o) for i, o in zip(inside_per_group, outside_per_group, strict=True)],
        label="cluster names",
    )
    fallback = offline_labels(inside_per_group)
    labels = []
    for result, offline in zip(results, fallback, strict=True):
        if isinstance(result, LLMFailure):
            # A failed naming call keeps the cluster, named offline, with the reason recorded.
            labels.append(ClusterLabel(offline.name, offline.description, result.reason))
        else:
            labels.append(ClusterLabel(scrub_pii(result.name)[0], scrub_pii(result.description)[0]))
    return labels
