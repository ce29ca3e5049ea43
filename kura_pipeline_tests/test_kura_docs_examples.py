"""Every Python block of Kura's documentation (../shared/seed/kura-docs.md, issue #14) runs here
with only its import lines changed and its hub or provider specifics swapped for local ones, as a
Kura user would run them in one notebook session, against the loopback OpenAI-compatible server.

Each block below is the doc's text, verbatim (`test_the_blocks_are_the_docs_own` checks that
against the doc when it is present); `SWAPS` lists every line changed, and `adapted` refuses a
swap whose original line is not in the block, so nothing is changed silently. What is swapped:

- imports: `kura`, `kura.types`, `kura.summarisation` -> `kura_pipeline`; `from google.genai
  import Client` -> none (the Gemini client is swapped below); a block that uses
  `Conversation`/`ExtractedProperty` in its annotations without importing them (the extractor
  definitions) gets that import line.
- hub datasets -> a local folder of the same name holding `train.parquet` (`datasets` loads a
  local folder like a hub name; Parquet keeps WildChat's timestamps as datetimes).
- providers: `instructor.from_genai(Client(), use_async=True)` and `AsyncOpenAI()` -> clients of the
  loopback server's URL; `Kura()` without clients uses the project's settings, here
  KURA_LLM_BASE_URL/KURA_LLM_MODEL pointing at the loopback server (as Kura's default reads
  GOOGLE_API_KEY from the environment).

The loopback server answers every request from its schema; three things are scripted for it (its
answers, not our code): a two-letter `language_code` (it does not honour `pattern`), a privacy
rating of 5 (random ratings withhold random clusters), and an OpenAI `/v1/moderations` route,
which it lacks. `conversations.json` is a Claude export written into the working folder.
"""

# ruff: noqa: E501 - the doc's blocks are kept verbatim, long lines and all

from __future__ import annotations

import datetime as dt
import json
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from kura_pipeline_tests.conftest import ANSWERS, TOPICS
from kura_pipeline_tests.support.loopback import LoopbackServer

DOC = Path(__file__).resolve().parents[2] / "shared" / "seed" / "kura-docs.md"
LOOPBACK_KEY = "sk-loopback-not-a-real-key"
CONVERSATIONS = 20  # 4 per topic, 5 topics
AUDIT_WORDS = "You audit text that will be shown"
LANGUAGE_WORDS = "extracts the language of the following conversation"


def _block(text: str) -> str:
    return text.removeprefix("\n")


# kura-docs.md line 24
QUICKSTART = _block(r"""
from kura import Kura
from kura.types import Conversation
import asyncio

kura = Kura()
conversations = Conversation.from_hf_dataset(
    "ivanleomk/synthetic-gemini-conversations", split="train"
)
asyncio.run(kura.cluster_conversations(conversations))

kura.visualise_clusters()
""")

# kura-docs.md line 59
CLAUDE_DUMP = _block(r"""
from kura import Kura
from kura.types import Conversation
import asyncio

kura = Kura(max_clusters=10) # Set Max Cluster Size ( We will keep recursively combining until we reach this max_clusters size )

conversations = Conversation.from_claude_conversation_dump("conversations.json")

asyncio.run(kura.cluster_conversations(conversations))

kura.visualise_clusters()

""")

# kura-docs.md line 94
WILDCHAT = _block(r"""
from kura.types import Conversation
from kura import Kura
import asyncio
from datetime import timedelta


def process_messages(row: dict):
    return [
        {
            "role": message["role"],
            "content": message["content"],
            "created_at": row["timestamp"] + timedelta(minutes=5 * i),
        }
        for i, message in enumerate(row["conversation"])
    ]


conversations = Conversation.from_hf_dataset(
    "allenai/WildChat-nontoxic",
    split="train",
    max_conversations=2000,
    chat_id_fn=lambda x: x["conversation_id"],
    created_at_fn=lambda x: x["timestamp"],
    messages_fn=process_messages,
)

kura = Kura()
asyncio.run(kura.cluster_conversations(conversations))

kura.visualise_clusters()
""")

# kura-docs.md line 144
LANGUAGE_EXTRACTOR = _block(r"""
import asyncio
import instructor
from pydantic import BaseModel, Field


class Language(BaseModel):
    language_code: str = Field(
        description="The language code of the conversation. (Eg. en, fr, es)",
        pattern=r"^[a-z]{2}$",
    )

async def language_extractor(
    conversation: Conversation,
    sems: dict[str, asyncio.Semaphore],
    clients: dict[str, instructor.AsyncInstructor],
) -> ExtractedProperty:
    # Get the default semaphore and client limits
    sem = sems.get("default")
    client = clients.get("default")

    async with sem:
        resp = await client.chat.completions.create(
            model="gemini-2.0-flash",
            messages=[
                {
                    "role": "system",
                    "content": "You are a helpful assistant that extracts the language of the following conversation.",
                },
                {
                    "role": "user",
                    "content": "\n".join(
                        [f"{msg.role}: {msg.content}" for msg in conversation.messages]
                    ),
                },
            ],
            response_model=Language,
        )
        return ExtractedProperty(
            name="language_code",
            value=resp.language_code,
        )
""")

# kura-docs.md line 192
LANGUAGE_USE = _block(r"""
from kura import Kura
from kura.types import Conversation, ExtractedProperty
from kura.summarisation import SummaryModel

summary_model = SummaryModel(extractors=[language_extractor])
kura = Kura(max_clusters=10, summarisation_model=summary_model)
conversations = Conversation.from_claude_conversation_dump("conversations.json")
asyncio.run(kura.cluster_conversations(conversations))
kura.visualise_clusters()
""")

# kura-docs.md line 206
LANGUAGE_FULL = _block(r"""
import asyncio
import instructor
from pydantic import BaseModel, Field
from kura import Kura
from kura.types import Conversation, ExtractedProperty
from kura.summarisation import SummaryModel


class Language(BaseModel):
    language_code: str = Field(
        description="The language code of the conversation. (Eg. en, fr, es)",
        pattern=r"^[a-z]{2}$",
    )


async def language_extractor(
    conversation: Conversation,
    sems: dict[str, asyncio.Semaphore],
    clients: dict[str, instructor.AsyncInstructor],
) -> ExtractedProperty:
    # Get the default semaphore and client limits
    sem = sems.get("default")
    client = clients.get("default")

    async with sem:
        resp = await client.chat.completions.create(
            model="gemini-2.0-flash",
            messages=[
                {
                    "role": "system",
                    "content": "You are a helpful assistant that extracts the language of the following conversation.",
                },
                {
                    "role": "user",
                    "content": "\n".join(
                        [f"{msg.role}: {msg.content}" for msg in conversation.messages]
                    ),
                },
            ],
            response_model=Language,
        )
        return ExtractedProperty(
            name="language_code",
            value=resp.language_code,
        )


summary_model = SummaryModel(extractors=[language_extractor])
kura = Kura(
    max_clusters=10, summarisation_model=summary_model, override_checkpoint_dir=True
)
conversations = Conversation.from_claude_conversation_dump("conversations.json")[:100]
asyncio.run(kura.cluster_conversations(conversations))
kura.visualise_clusters()
""")

# kura-docs.md line 271
MODERATION_HOOK = _block(r"""
import asyncio
import instructor
from pydantic import BaseModel, Field
from kura import Kura
from kura.types import Conversation, ExtractedProperty
from kura.summarisation import SummaryModel
from openai import AsyncOpenAI
from google.genai import Client


async def moderation_hook(
    conversation: Conversation,
    sems: dict[str, asyncio.Semaphore],
    clients: dict[str, instructor.AsyncInstructor],
) -> ExtractedProperty:
    # Get the default semaphore and client limits
    sem = sems.get("openai")
    client = clients.get("openai")

    async with sem:
        assert isinstance(client, AsyncOpenAI)
        resp = await client.moderations.create(
            model="omni-moderation-latest",
            input="\n".join([message.content for message in conversation.messages]),
        )
        return [
            ExtractedProperty(
                name="moderation_hate",
                value=resp.results[0].categories.hate,
            ),
            ExtractedProperty(
                name="moderation_hate_score",
                value=resp.results[0].category_scores.hate,
            ),
        ] # You can return a list or just a normal ExtractedProperty object here
""")

# kura-docs.md line 313
MODERATION_USE = _block(r"""
summary_model = SummaryModel(
    extractors=[moderation_hook],
    clients={
        "default": instructor.from_genai(Client(), use_async=True),
        "openai": AsyncOpenAI(),
    },
    concurrent_requests={
        "openai": 100,
        "default": 50,
    },
)
kura = Kura(
    max_clusters=10, summarisation_model=summary_model, override_checkpoint_dir=True
)
conversations = Conversation.from_claude_conversation_dump("conversations.json")
asyncio.run(kura.cluster_conversations(conversations))
kura.visualise_clusters()
""")

# kura-docs.md line 335
MODERATION_FULL = _block(r"""
import asyncio
import instructor
from pydantic import BaseModel, Field
from kura import Kura
from kura.types import Conversation, ExtractedProperty
from kura.summarisation import SummaryModel
from openai import AsyncOpenAI
from google.genai import Client


async def moderation_hook(
    conversation: Conversation,
    sems: dict[str, asyncio.Semaphore],
    clients: dict[str, instructor.AsyncInstructor],
) -> ExtractedProperty:
    # Get the default semaphore and client limits
    sem = sems.get("openai")
    client = clients.get("openai")

    async with sem:
        assert isinstance(client, AsyncOpenAI)
        resp = await client.moderations.create(
            model="omni-moderation-latest",
            input="\n".join([message.content for message in conversation.messages]),
        )
        return [
            ExtractedProperty(
                name="moderation_hate",
                value=resp.results[0].categories.hate,
            ),
            ExtractedProperty(
                name="moderation_hate_score",
                value=resp.results[0].category_scores.hate,
            ),
        ]


summary_model = SummaryModel(
    extractors=[moderation_hook],
    clients={
        "default": instructor.from_genai(Client(), use_async=True),
        "openai": AsyncOpenAI(),
    },
    concurrent_requests={
        "openai": 100,
        "default": 50,
    },
)
kura = Kura(
    max_clusters=10, summarisation_model=summary_model, override_checkpoint_dir=True
)
conversations = Conversation.from_claude_conversation_dump("conversations.json")[:2]
asyncio.run(kura.cluster_conversations(conversations))
kura.visualise_clusters()
""")

# kura-docs.md line 398
METADATA = _block(r"""
from kura.types import Conversation
from kura import Kura
import asyncio
from datetime import timedelta


def process_messages(row: dict):
    return [
        {
            "role": message["role"],
            "content": message["content"],
            "created_at": row["timestamp"] + timedelta(minutes=5 * i),
        }
        for i, message in enumerate(row["conversation"])
    ]


conversations = Conversation.from_hf_dataset(
    "allenai/WildChat-nontoxic",
    split="train",
    max_conversations=10,
    chat_id_fn=lambda x: x["conversation_id"],
    created_at_fn=lambda x: x["timestamp"],
    messages_fn=process_messages,
    metadata_fn=lambda x: {
        "model": x["model"],
        "toxic": x["toxic"],
        "redacted": x["redacted"], # Using the metadata fn here
    },
)

kura = Kura(override_checkpoint_dir=True)
asyncio.run(kura.cluster_conversations(conversations))

kura.visualise_clusters()
""")

# kura-docs.md line 508
PYTHON_API = _block(r"""
from kura import Kura
from asyncio import run
from kura.types import Conversation


kura = Kura()
conversations: list[Conversation] = Conversation.from_claude_conversation_dump(
    "conversations.json"
)
run(kura.cluster_conversations(conversations))

""")

# kura-docs.md line 530
CUSTOM_MESSAGES = _block(r"""
conversations = [
    {
        "role": "user",
        "content": "Hello, how are you?"
    },
    {
        "role": "assistant",
        "content": "I'm fine, thank you!"
    }
]
""")

# kura-docs.md line 545
CUSTOM_CONVERSATION = _block(r"""
from kura.types import Conversation
from uuid import uuid4

conversation = [
    Conversation(
        messages=[
            Message(
                created_at=str(datetime.now()),
                role=message["role"],
                content=message["content"],
            )
            for message in conversation
        ],
        id=str(uuid4()),
        created_at=datetime.now(),
    )
]

""")

# kura-docs.md line 562, inside the same HTML comment (its fence is opened with four backticks and
# closed with three, so no Markdown reader shows it as code); `run` and `kura` are the previous
# commented block's.
LAST_RUN = _block(r"""
from kura.types import Conversation

conversations: list[Conversation] = Conversation.from_claude_conversation_dump(
    "conversations.json"
)
run(kura.cluster_conversations(conversations))
""")

KURA_IMPORTS = [
    ("from kura import Kura", "from kura_pipeline import Kura"),
    (
        "from kura.types import Conversation, ExtractedProperty",
        "from kura_pipeline import Conversation, ExtractedProperty",
    ),
    ("from kura.types import Conversation", "from kura_pipeline import Conversation"),
    ("from kura.summarisation import SummaryModel", "from kura_pipeline import SummaryModel"),
]
# The extractor definitions annotate with Conversation/ExtractedProperty but import neither.
ANNOTATION_IMPORT = (
    "import instructor\n",
    "import instructor\nfrom kura_pipeline import Conversation, ExtractedProperty\n",
)
NO_GENAI = ("from google.genai import Client\n", "")
GENAI_CLIENT = (
    '"default": instructor.from_genai(Client(), use_async=True),',
    '"default": instructor.from_openai(AsyncOpenAI(base_url=LOOPBACK_URL, api_key=LOOPBACK_KEY)),',
)
OPENAI_CLIENT = (
    '"openai": AsyncOpenAI(),',
    '"openai": AsyncOpenAI(base_url=LOOPBACK_URL, api_key=LOOPBACK_KEY),',
)
SYNTHETIC_HUB = (
    '"ivanleomk/synthetic-gemini-conversations"',
    "LOCAL_HUB + '/synthetic-gemini-conversations'",
)
WILDCHAT_HUB = ('"allenai/WildChat-nontoxic"', "LOCAL_HUB + '/WildChat-nontoxic'")


def adapted(block: str, *swaps: tuple[str, str]) -> str:
    """The block with its import lines for this package and the given swaps; each swap's
    original must be in the block (a swap never silently does nothing)."""
    for old, new in swaps:
        assert old in block, f"swap not applicable: {old!r}"
        block = block.replace(old, new)
    for old, new in KURA_IMPORTS:
        block = re.sub(rf"^{re.escape(old)}$", new, block, flags=re.M)
    assert "kura." not in block.replace("kura.cluster", "").replace("kura.visualise", ""), block
    return block


# ----- the local stand-ins: a Claude export, hub datasets, the loopback server -----

START = dt.datetime(2026, 1, 5, 9, 0, tzinfo=dt.UTC)


def _chats() -> Iterator[tuple[str, str, str, dt.datetime]]:
    """(id, user text, assistant text, time) for 4 conversations on each of the 5 topics."""
    for t, (topic, requests) in enumerate(TOPICS.items()):
        for i, request in enumerate(requests[:4]):
            yield f"{topic}-{i}", request, ANSWERS[topic], START + dt.timedelta(days=t, hours=i)


def _write_claude_export(path: Path) -> None:
    """`conversations.json` as the Claude app exports it (uuid, created_at, chat_messages)."""
    records = [
        {
            "uuid": f"00000000-0000-4000-8000-{n:012d}",
            "name": "",
            "created_at": when.isoformat(),
            "updated_at": when.isoformat(),
            "chat_messages": [
                {
                    "uuid": f"m-{n}-{k}",
                    "sender": sender,
                    "created_at": (when + dt.timedelta(minutes=k)).isoformat(),
                    "text": text,
                    "content": [{"type": "text", "text": text}],
                }
                for k, (sender, text) in enumerate((("human", request), ("assistant", answer)))
            ],
        }
        for n, (_, request, answer, when) in enumerate(_chats())
    ]
    path.write_text(json.dumps(records), encoding="utf-8")


def _write_hub_datasets(hub: Path) -> None:
    """Local folders named like the hub datasets, each with a `train` split in Parquet."""
    from datasets import Dataset

    synthetic = [
        {
            "chat_id": chat_id,
            "created_at": when,
            "messages": [
                {"role": "user", "content": request, "created_at": when},
                {"role": "assistant", "content": answer, "created_at": when + dt.timedelta(minutes=1)},
            ],
        }
        for chat_id, request, answer, when in _chats()
    ]
    wildchat = [
        {
            "conversation_id": f"wc-{n}",
            "timestamp": when,
            "conversation": [
                {"role": "user", "content": request},
                {"role": "assistant", "content": answer},
            ],
            "model": "gpt-4-0314" if n % 2 else "gpt-3.5-turbo-0301",
            "toxic": False,
            "redacted": n % 3 == 0,
        }
        for n, (_, request, answer, when) in enumerate(_chats())
    ]
    for name, rows in (("synthetic-gemini-conversations", synthetic), ("WildChat-nontoxic", wildchat)):
        (hub / name).mkdir(parents=True)
        Dataset.from_list(rows).to_parquet(str(hub / name / "train.parquet"))


def _moderations(calls: list[Any]) -> Route:
    """OpenAI's moderations endpoint, which the loopback server lacks: nothing flagged."""

    async def moderate(request: Request) -> JSONResponse:
        body = await request.json()
        calls.append(body)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        result = {
            "flagged": False,
            "categories": {"hate": False, "harassment": False, "violence": False},
            "category_scores": {"hate": 0.0012, "harassment": 0.0008, "violence": 0.0003},
        }
        return JSONResponse(
            {"id": "modr-loopback", "model": body.get("model"), "results": [result] * len(inputs)}
        )

    return Route("/v1/moderations", moderate, methods=["POST"])


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The working folder of a notebook session (checkpoints land in ./checkpoints, as Kura's
    do) and the loopback server as the LLM endpoint."""
    folder = tmp_path_factory.mktemp("kura_notebook")
    _write_claude_export(folder / "conversations.json")
    _write_hub_datasets(folder / "hub")
    moderation_calls: list[Any] = []
    server = LoopbackServer()
    server.app.router.routes.append(_moderations(moderation_calls))
    with server, pytest.MonkeyPatch.context() as env:
        env.chdir(folder)
        env.setenv("KURA_LLM_BASE_URL", server.base_url)
        env.setenv("KURA_LLM_MODEL", "loopback")
        env.setenv("HF_DATASETS_OFFLINE", "1")
        env.setenv("HF_HUB_OFFLINE", "1")
        server.replies.push(*[{"rating": 5, "reason": "Fully general."}] * 2000, match=AUDIT_WORDS)
        server.replies.push(*[{"language_code": "en"}] * 2000, match=LANGUAGE_WORDS)
        yield {"server": server, "folder": folder, "moderations": moderation_calls}


def run_blocks(session: dict[str, Any], *blocks: tuple[str, str]) -> dict[str, Any]:
    """Run (name, code) blocks one after another in one namespace, as notebook cells."""
    namespace: dict[str, Any] = {
        "__name__": "kura_notebook",
        "LOOPBACK_URL": session["server"].base_url,
        "LOOPBACK_KEY": LOOPBACK_KEY,
        "LOCAL_HUB": str(session["folder"] / "hub"),
    }
    for name, code in blocks:
        exec(compile(code, f"<kura-docs.md {name}>", "exec"), namespace)  # noqa: S102 - the doc's code
    return namespace


def shown_clusters(printed: str, conversations: int) -> list[str]:
    """The tree `visualise_clusters` printed: its heading, and the clusters shown in it."""
    lines = printed.strip().splitlines()
    assert lines[0] == f"Clusters ({conversations} conversations)", printed
    shown = [line for line in lines[1:] if re.match(r"^[║ ]*[╠╚]══ [^(]", line)]
    assert shown, printed
    return shown


def chat_calls(session: dict[str, Any]) -> int:
    return session["server"].stats.count("chat")


# ----- the blocks -----


@pytest.mark.slow
def test_quickstart_hub_dataset(session: dict[str, Any], capsys: pytest.CaptureFixture[str]):
    before = chat_calls(session)
    namespace = run_blocks(session, ("QUICKSTART", adapted(QUICKSTART, SYNTHETIC_HUB)))
    assert len(namespace["conversations"]) == CONVERSATIONS
    shown_clusters(capsys.readouterr().out, CONVERSATIONS)
    assert chat_calls(session) > before  # summaries and names came from the endpoint, not offline


@pytest.mark.slow
def test_claude_conversation_dump(session: dict[str, Any], capsys: pytest.CaptureFixture[str]):
    namespace = run_blocks(session, ("CLAUDE_DUMP", adapted(CLAUDE_DUMP)))
    assert namespace["kura"].max_clusters == 10
    assert {c.metadata["source"] for c in namespace["conversations"]} == {"claude"}
    shown_clusters(capsys.readouterr().out, CONVERSATIONS)


@pytest.mark.slow
def test_wildchat_with_mapping_functions(session: dict[str, Any], capsys: pytest.CaptureFixture[str]):
    namespace = run_blocks(session, ("WILDCHAT", adapted(WILDCHAT, WILDCHAT_HUB)))
    conversations = namespace["conversations"]
    assert len(conversations) == CONVERSATIONS
    # process_messages' times: 5 minutes apart, from the row's timestamp.
    first = conversations[0]
    assert first.messages[1].created_at - first.messages[0].created_at == dt.timedelta(minutes=5)
    shown_clusters(capsys.readouterr().out, CONVERSATIONS)


def _language_codes(namespace: dict[str, Any]) -> dict[str, Any]:
    return {s.chat_id: s.metadata.get("language_code") for s in namespace["kura"].summaries}


@pytest.mark.slow
def test_language_extractor_with_our_summary_model(
    session: dict[str, Any], capsys: pytest.CaptureFixture[str]
):
    namespace = run_blocks(
        session,
        ("LANGUAGE_EXTRACTOR", adapted(LANGUAGE_EXTRACTOR, ANNOTATION_IMPORT)),
        ("LANGUAGE_USE", adapted(LANGUAGE_USE)),
    )
    # The extractor's property, in Kura's place (the summary's metadata) and in the stage's table.
    assert set(_language_codes(namespace).values()) == {"en"}
    assert len(_language_codes(namespace)) == CONVERSATIONS
    properties = namespace["kura"].extracted_properties
    assert properties.filter(properties["name"] == "language_code").height == CONVERSATIONS
    shown_clusters(capsys.readouterr().out, CONVERSATIONS)


@pytest.mark.slow
def test_language_extractor_full_code(session: dict[str, Any], capsys: pytest.CaptureFixture[str]):
    namespace = run_blocks(session, ("LANGUAGE_FULL", adapted(LANGUAGE_FULL)))
    assert set(_language_codes(namespace).values()) == {"en"}
    assert len(_language_codes(namespace)) == CONVERSATIONS  # [:100] of 20
    shown_clusters(capsys.readouterr().out, CONVERSATIONS)


def _moderation(namespace: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {
        s.chat_id: (s.metadata.get("moderation_hate"), s.metadata.get("moderation_hate_score"))
        for s in namespace["kura"].summaries
    }


@pytest.mark.slow
def test_moderation_hook_with_two_clients(session: dict[str, Any], capsys: pytest.CaptureFixture[str]):
    before = len(session["moderations"])
    namespace = run_blocks(
        session,
        ("MODERATION_HOOK", adapted(MODERATION_HOOK, ANNOTATION_IMPORT, NO_GENAI)),
        ("MODERATION_USE", adapted(MODERATION_USE, GENAI_CLIENT, OPENAI_CLIENT)),
    )
    # Both properties, from the "openai" client's endpoint, for every conversation.
    assert set(_moderation(namespace).values()) == {(False, 0.0012)}
    assert len(_moderation(namespace)) == CONVERSATIONS
    assert len(session["moderations"]) - before == CONVERSATIONS
    assert {call["model"] for call in session["moderations"]} == {"omni-moderation-latest"}
    shown_clusters(capsys.readouterr().out, CONVERSATIONS)


@pytest.mark.slow
def test_moderation_hook_full_code_on_two_conversations(
    session: dict[str, Any], capsys: pytest.CaptureFixture[str]
):
    namespace = run_blocks(
        session,
        (
            "MODERATION_FULL",
            adapted(MODERATION_FULL, ANNOTATION_IMPORT, NO_GENAI, GENAI_CLIENT, OPENAI_CLIENT),
        ),
    )
    assert set(_moderation(namespace).values()) == {(False, 0.0012)} and len(_moderation(namespace)) == 2
    printed = capsys.readouterr().out
    # Two conversations make no cluster a person may see (privacy threshold: 5): the tree says so.
    assert printed.startswith("Clusters (2 conversations)\n") and "2 conversations in clusters" in printed


@pytest.mark.slow
def test_conversation_metadata(session: dict[str, Any], capsys: pytest.CaptureFixture[str]):
    namespace = run_blocks(session, ("METADATA", adapted(METADATA, WILDCHAT_HUB)))
    assert len(namespace["conversations"]) == 10  # max_conversations=10
    summaries = namespace["kura"].summaries
    assert {s.metadata["model"] for s in summaries} == {"gpt-4-0314", "gpt-3.5-turbo-0301"}
    assert {s.metadata["redacted"] for s in summaries} == {True, False}
    properties = namespace["kura"].extracted_properties
    assert {"metadata.model", "metadata.toxic", "metadata.redacted"} <= set(properties["name"])
    assert namespace["kura"].clusters
    # Ten conversations over five topics make clusters under the privacy threshold (5): the tree
    # is printed, and says they are withheld.
    printed = capsys.readouterr().out
    assert printed.startswith("Clusters (10 conversations)\n") and " withheld: below the privacy" in printed


@pytest.mark.slow
def test_commented_out_python_api_blocks(session: dict[str, Any], capsys: pytest.CaptureFixture[str]):
    namespace = run_blocks(
        session,
        ("PYTHON_API", adapted(PYTHON_API)),
        ("CUSTOM_MESSAGES", adapted(CUSTOM_MESSAGES)),
        ("LAST_RUN", adapted(LAST_RUN)),
    )
    assert len(namespace["kura"].clusters) > 0
    namespace["kura"].visualise_clusters()
    shown_clusters(capsys.readouterr().out, CONVERSATIONS)


def test_the_custom_conversation_block_is_broken_in_the_doc_itself():
    """The commented-out `Conversation(messages=[Message(...)], id=..., created_at=...)` block
    cannot run in Kura either: it reads `conversation` before assigning it (the list above is
    `conversations`), and Kura's Conversation takes `chat_id`, not `id`, and needs `metadata`."""
    code = adapted(CUSTOM_CONVERSATION)
    with pytest.raises(NameError, match="'conversation'"):
        exec(
            compile(
                "from datetime import datetime\nfrom kura_pipeline import Message\n" + code, "<doc>", "exec"
            ),
            {},
        )


def test_the_blocks_are_the_docs_own():
    """Every fenced Python block of the doc is one of the blocks above, verbatim; none is missed."""
    if not DOC.exists():
        pytest.skip(f"{DOC} is not here (the blocks above are its copy)")
    text = DOC.read_text(encoding="utf-8")
    # A block ends at three backticks (the last one's line goes on with the comment's "-->").
    fence = re.compile(r"^( *)(`{3,4})(?:py|python)\n(.*?)^\1`{3}[^\n]*$", re.S | re.M)
    found = [textwrap.dedent(match.group(3)) for match in fence.finditer(text)]
    ours = [
        QUICKSTART, CLAUDE_DUMP, WILDCHAT, LANGUAGE_EXTRACTOR, LANGUAGE_USE, LANGUAGE_FULL,
        MODERATION_HOOK, MODERATION_USE, MODERATION_FULL, METADATA, PYTHON_API, CUSTOM_MESSAGES,
        CUSTOM_CONVERSATION, LAST_RUN,
    ]  # fmt: skip
    assert found == ours
