"""Key phrases shared by many conversations: what every offline text a person reads is made of.

Clio's rule is that nothing shown may come from fewer conversations (or users) than the privacy
threshold. Class-based TF-IDF prefers exactly the rare words that break it ("torque" from one
conversation), so offline names, descriptions and summaries are built here from phrases of one
to three words that at least `min_conversations` conversations (and `min_users` users, where
known) of the group use, chosen for coverage and distinctiveness and kept apart from each other
by maximal marginal relevance (as BERTopic's representation models do).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, CountVectorizer

# Words that say nothing about what a group of requests is about: the scrub's placeholders,
# and words every request uses ("write", "help", "please").
_PLACEHOLDER_WORDS = {"url", "email", "phone", "number", "ip", "token", "name"}
_REQUEST_WORDS = {
    "write", "want", "need", "like", "help", "make", "create", "provide", "give", "use", "using",
    "used", "does", "did", "know", "please", "explain", "tell", "list", "new", "good", "just",
    "get", "let", "ll", "ve", "don", "im", "thanks", "thank", "hi", "hello", "yes", "okay", "ok",
    "following", "answer", "question", "questions", "example", "way", "act", "based", "sure",
    "user", "asked", "turns", "hey", "pls", "lets", "really", "also", "thing", "things", "said",
    "say", "says", "going", "got", "can", "could", "would", "should", "will", "one", "two", "doesn",
    "isn", "didn", "won", "wouldn", "shouldn", "couldn", "aren", "wasn", "re", "add", "start",
    "called", "long", "work", "look", "find", "change", "try", "think", "means", "mean",
    "different", "best", "great", "able", "kind", "lot", "bad", "right", "text", "words", "word",
    "below", "above", "continue", "dear", "sir", "i'd", "i'm", "i've", "it's", "don't", "dont",
    "that's", "let's", "additionally", "little",
    # An LLM summary's own template ("The user's overall request for the assistant is to..."):
    # named after, a cluster of them would be "User's overall request".
    "overall", "request", "requests", "assistant", "task", "ask", "asking", "asks",
}  # fmt: skip
_OTHER_LANGUAGE_WORDS = {
    "el", "la", "de", "que", "y", "en", "los", "por", "para", "una", "es", "con", "le", "les",
    "des", "est", "et", "une", "pour", "pas", "vous", "dans", "der", "die", "und", "ist", "nicht",
    "ich", "das", "mit", "sie", "ein", "zu", "wie", "não", "em", "um", "com", "você",
    # Russian: the commonest function words, and its "help", "please", "write", "hello".
    "и", "в", "во", "не", "что", "он", "на", "я", "с", "со", "как", "а", "то", "все", "всё", "она",
    "так", "его", "но", "да", "ты", "к", "у", "же", "вы", "за", "бы", "по", "только", "ее", "её",
    "мне", "было", "вот", "от", "меня", "еще", "ещё", "нет", "о", "об", "из", "ему", "когда", "ли",
    "если", "уже", "или", "ни", "быть", "был", "до", "вас", "там", "может", "они", "тут", "где",
    "есть", "надо", "для", "мы", "тебя", "их", "чем", "без", "чтобы", "кто", "этот", "это", "эта",
    "эти", "этого", "этой", "этом", "при", "про", "мой", "моя", "мою", "мои", "можно", "нужно",
    "хочу", "помоги", "помогите", "пожалуйста", "напиши", "напишите", "подскажи", "подскажите",
    "привет", "здравствуйте", "спасибо", "сделать", "какой", "какая", "какие",
}  # fmt: skip
STOP_WORDS = frozenset(ENGLISH_STOP_WORDS | _PLACEHOLDER_WORDS | _REQUEST_WORDS | _OTHER_LANGUAGE_WORDS)

_SEGMENT = re.compile(r"[.,;:!?()\[\]{}<>\"\n\r\t|/\\=*`]+")
MAX_PHRASE_WORDS = 3
MAX_WORD_CHARS = 30  # longer "words" are identifiers, hashes or noise, never a topic


def _characters(wanted: Callable[[str], bool]) -> str:
    """The characters of the Basic Multilingual Plane that `wanted` accepts, as the body of a
    regular-expression character class (ranges, escaped)."""
    ranges: list[tuple[int, int]] = []
    for code in range(0x80, 0x10000):
        if 0xD800 <= code <= 0xDFFF or not wanted(chr(code)):
            continue
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1] = (ranges[-1][0], code)
        else:
            ranges.append((code, code))
    return "".join(f"\\u{a:04x}" if a == b else f"\\u{a:04x}-\\u{b:04x}" for a, b in ranges)


# A word is a letter of any alphabetic script (Latin with or without accents, Cyrillic, Greek,
# Arabic, Hebrew, Hangul...) and then letters, digits, combining marks (Devanagari's vowel signs,
# Arabic's and Hebrew's points: not word characters to `re`, yet inside words), "+" and "#"
# ("c++", "c#"), with an optional "'s"-like ending. A digit, an underscore, a mark or a number
# such as "²" never starts one, and a word never starts right after a letter, digit or "_"
# ("my_var" is "my"). Scripts written without spaces (Chinese, Japanese, Thai) get one "word" per
# run of characters, which is usually longer than MAX_WORD_CHARS and so dropped: splitting them
# needs a segmenter, not a rule, and a wrong split would show fragments no one wrote.
_MARKS = _characters(lambda c: unicodedata.category(c).startswith("M"))
_NOT_DIGIT_NUMBERS = _characters(
    lambda c: unicodedata.category(c)[0] == "N" and c.isalnum() and not c.isdecimal()
)
_TOKEN = re.compile(
    rf"(?<![\w{_MARKS}])[^\W\d_{_NOT_DIGIT_NUMBERS}](?:[^\W_]++|[+#{_MARKS}]++)*+(?:'[^\W\d_]+)?"
)


def _lower(text: str) -> str:
    """Lower case, with accents composed ("e" and a combining acute are "é"): the same word
    typed two ways is one word."""
    return unicodedata.normalize("NFC", text.lower())


def _is_stop(token: str) -> bool:
    """A stop word, or a contraction of one ("didn't", "can't", "user's", "you're"): every
    negation ("n't") says nothing about a subject, whatever its verb."""
    if token in STOP_WORDS:
        return True
    if "'" not in token:
        return False
    return token.endswith("n't") or token.split("'", 1)[0] in STOP_WORDS


def words(text: str) -> list[str]:
    """Lower-case words, as every offline text is built from (and as the privacy tests count them)."""
    return _TOKEN.findall(_lower(text))


def candidate_phrases(text: str, allowed: frozenset[str] | None = None) -> list[str]:
    """Phrases of 1-3 consecutive words within a clause, none of them a stop word (and, with
    `allowed`, only of those words: a phrase is never more common than its rarest word)."""
    phrases: set[str] = set()
    for segment in _SEGMENT.split(_lower(text)):
        tokens = [t for t in _TOKEN.findall(segment) if len(t) <= MAX_WORD_CHARS]
        if allowed is not None:  # a dropped word ends the run: no phrase spans it
            tokens = [t if t in allowed else "" for t in tokens]
        for i, first in enumerate(tokens):
            if _is_stop(first) or len(first) < 2:
                continue
            for n in range(1, MAX_PHRASE_WORDS + 1):
                if i + n > len(tokens) or not tokens[i + n - 1]:
                    break
                last = tokens[i + n - 1]
                if _is_stop(last) or len(last) < 2 or (n == 1 and len(first) < 3):
                    continue
                if any(_is_stop(t) for t in tokens[i + 1 : i + n - 1]):  # no "fix my pandas"
                    break
                phrases.add(" ".join(tokens[i : i + n]))
    return sorted(phrases)


def _words_of(text: str) -> list[str]:
    return [t for t in set(_TOKEN.findall(_lower(text))) if len(t) <= MAX_WORD_CHARS and not _is_stop(t)]


@dataclass
class PhraseTable:
    """Which phrases each document uses (documents x phrases, 0/1), for phrases that at least
    `min_df` documents of the whole set use: a phrase rarer than that can never be shown."""

    phrases: list[str]
    uses: sparse.csr_matrix
    users: np.ndarray | None = None  # a user code per document (-1: unknown); None: no user ids
    _df: np.ndarray | None = None

    @property
    def documents(self) -> int:
        return self.uses.shape[0]


def phrase_table(
    documents: Sequence[str], min_df: int, users: Sequence[str | None] | None = None
) -> PhraseTable:
    """The table for a set of documents (one per conversation)."""
    codes = None
    if users is not None and any(u is not None for u in users):
        index: dict[str, int] = {}
        codes = np.array(
            [-1 if u is None else index.setdefault(u, len(index)) for u in users], dtype=np.int64
        )
    if len(documents) < max(min_df, 1):
        return PhraseTable([], sparse.csr_matrix((len(documents), 0), dtype=np.int8), codes)
    # First the words at least min_df documents use, then only phrases made of them: counting
    # every 1-3 word phrase of 100,000 conversations first would hold millions of rare ones.
    common = CountVectorizer(analyzer=_words_of, binary=True, min_df=max(min_df, 1), dtype=np.int8)
    try:
        allowed = frozenset(common.fit(documents).get_feature_names_out().tolist())
    except ValueError:
        allowed = frozenset()
    vectorizer = CountVectorizer(
        analyzer=partial(candidate_phrases, allowed=allowed),
        binary=True,
        min_df=max(min_df, 1),
        dtype=np.int8,
    )
    try:
        uses = vectorizer.fit_transform(documents).tocsr()
    except ValueError:  # no phrase anywhere (empty texts, or none kept by min_df)
        return PhraseTable([], sparse.csr_matrix((len(documents), 0), dtype=np.int8), codes)
    return PhraseTable([str(p) for p in vectorizer.get_feature_names_out()], uses, codes)


@dataclass(frozen=True)
class SharedPhrase:
    phrase: str
    conversations: int  # how many of the group's conversations use it
    share: float  # of the group's conversations


def _token_overlap(a: str, b: str) -> float:
    x, y = set(a.split()), set(b.split())
    return len(x & y) / len(x | y)


def group_phrases(
    table: PhraseTable,
    groups: Sequence[Sequence[int]],
    min_conversations: int,
    min_users: int = 1,
    top_n: int = 4,
    diversity: float = 0.5,
) -> list[list[SharedPhrase]]:
    """For each group of documents (row indices), its best phrases: used by at least
    `min_conversations` of its documents (and `min_users` distinct users where users are known),
    scored by coverage x distinctiveness (lift against all groups), then picked by maximal
    marginal relevance so that two picks do not say the same thing (shared words, or the same
    conversations)."""
    if not groups:
        return []
    if not table.phrases:
        return [[] for _ in groups]
    n_docs = table.documents
    rows = (
        np.concatenate([np.asarray(g, dtype=np.int64) for g in groups]) if groups else np.zeros(0, np.int64)
    )
    owner = np.concatenate([np.full(len(g), i, dtype=np.int64) for i, g in enumerate(groups)])
    membership = sparse.csr_matrix(
        (np.ones(len(rows), dtype=np.int32), (owner, rows)), shape=(len(groups), n_docs)
    )
    in_group = (membership @ table.uses.astype(np.int32)).tocsr()  # groups x phrases: conversations
    covered = np.zeros(n_docs, dtype=np.int32)
    covered[rows] = 1
    covered_docs = max(int(covered.sum()), 1)
    overall = np.asarray(table.uses.T.astype(np.int32) @ covered).ravel()  # in any of the groups
    lengths = np.array([len(p.split()) for p in table.phrases])
    result: list[list[SharedPhrase]] = []
    for g, members in enumerate(groups):
        size = len(members)
        row = slice(in_group.indptr[g], in_group.indptr[g + 1])
        columns, counts = in_group.indices[row], in_group.data[row]
        keep = counts >= min_conversations
        columns, counts = columns[keep], counts[keep]
        if size == 0 or len(columns) == 0:
            result.append([])
            continue
        if table.users is not None and min_users > 1:
            member_rows = np.asarray(members, dtype=np.int64)
            sub = table.uses[member_rows][:, columns].tocsc()
            member_users = table.users[member_rows]
            enough = np.array(
                [len({int(u) for u in member_users[sub.indices[sub.indptr[j] : sub.indptr[j + 1]]] if u >= 0})
                 >= min_users for j in range(len(columns))],
                dtype=bool,
            )  # fmt: skip
            columns, counts = columns[enough], counts[enough]
            if len(columns) == 0:
                result.append([])
                continue
        coverage = counts / size
        lift = coverage / np.maximum(overall[columns] / covered_docs, 1e-9)
        # Longer phrases read better than their parts when they cover nearly as much.
        score = coverage * np.log1p(lift) * (1 + 0.25 * (lengths[columns] - 1))
        order = np.lexsort((columns, -score))[:30]  # the best candidates, ties by phrase order
        columns, counts, score = columns[order], counts[order], score[order]
        docs = (table.uses[np.asarray(members, dtype=np.int64)][:, columns]).toarray().astype(bool)
        picked: list[int] = []
        relevance = score / score.max()
        while len(picked) < min(top_n, len(columns)):
            best, best_value = -1, -np.inf
            for j in range(len(columns)):
                phrase = table.phrases[columns[j]]
                # Two picks never share a word: no "python code, python".
                if j in picked or any(_token_overlap(phrase, table.phrases[columns[p]]) for p in picked):
                    continue
                redundancy = max(
                    (
                        (docs[:, j] & docs[:, p]).sum() / max((docs[:, j] | docs[:, p]).sum(), 1)
                        for p in picked
                    ),
                    default=0.0,
                )
                value = (1 - diversity) * relevance[j] - diversity * redundancy
                if value > best_value:
                    best, best_value = j, value
            if best < 0:
                break
            picked.append(best)
        result.append(
            [SharedPhrase(table.phrases[columns[j]], int(counts[j]), float(counts[j] / size)) for j in picked]
        )
    return result


def document_phrases(
    table: PhraseTable, row: int, top_n: int = 3, text: str = "", request: str = ""
) -> list[str]:
    """One document's phrases that say most about it, among the shared ones (at least `min_df`
    documents use each), never two that share a word.

    A phrase counts for more the more often this document uses it (`text`: the words the table
    was built from), the rarer it is across the documents, the longer it is, and when the
    opening `request` (what the user asked for) holds it: "java" used five times beats "face"
    used once. Without `text`, rarity and length alone rank them."""
    start, end = table.uses.indptr[row], table.uses.indptr[row + 1]
    columns = table.uses.indices[start:end]
    if len(columns) == 0:
        return []
    phrases = [table.phrases[c] for c in columns]
    idf = np.log((1 + table.documents) / (1 + _document_frequency(table)[columns])) + 1
    lengths = np.array([len(p.split()) for p in phrases])
    in_text, asked = _word_runs(text), _word_runs(request)
    uses = np.array([max(in_text.get(p, 0), 1) for p in phrases])
    in_request = np.array([p in asked for p in phrases])
    score = (1 + np.log(uses)) * idf * (1 + 0.25 * (lengths - 1)) * np.where(in_request, 2.0, 1.0)
    order = np.lexsort((columns, -score))  # ties by phrase order: the same input, the same pick
    picked: list[str] = []
    taken: set[str] = set()
    for index in order:
        stems = {_singular(word) for word in phrases[index].split()}
        if stems & taken:  # no "python code, python", no "player, players"
            continue
        picked.append(phrases[index])
        taken |= stems
        if len(picked) == top_n:
            break
    return picked


def _singular(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def _word_runs(text: str) -> Counter[str]:
    """How often each run of 1-3 consecutive words occurs in the text."""
    tokens = words(text)
    runs = range(1, MAX_PHRASE_WORDS + 1)
    return Counter(" ".join(tokens[i : i + n]) for n in runs for i in range(len(tokens) - n + 1))


def _document_frequency(table: PhraseTable) -> np.ndarray:
    if table._df is None:
        table._df = np.asarray(table.uses.sum(axis=0)).ravel()
    return table._df
