"""What a model names is about the users' requests: the guards after the model (issue 15).

Every test runs the LLM path against the loopback OpenAI-compatible server, with the model's
answers scripted (`srv.replies.push`) as a small model gave them: names that echo the prompt's
framing, a sibling's name, a parent named like its child, a description pasted together from
the children's, every child alone under its own parent. The guard asks once more with the
reason, then falls back to the offline label and says so in `fallback`."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kura_pipeline.core.backends import BaseGroups, Corpus, HierarchyInputs, LLMBackend, name_groups_offline
from kura_pipeline.core.hierarchy import build_hierarchy, hierarchy_problems, plan_level_clio
from kura_pipeline.core.llm import LLMClient, LLMSettings, run_llm
from kura_pipeline.core.models import Cluster
from kura_pipeline.core.naming import (
    ClusterLabel,
    about_one_request,
    copied_descriptions,
    generic_name,
    label_problems,
    name_key,
)
from kura_pipeline.core.privacy import AggregationThreshold
from kura_pipeline_tests.support.llm_fixtures import loopback_settings
from kura_pipeline_tests.support.loopback import LoopbackServer

RETRY_MARK = "could not be used"  # in the note appended when a name is asked for again

# Four kinds of request, five conversations each (the offline namer needs shared phrases).
TOPICS = [
    ("dragon", "write a short story about a dragon and a knight"),
    ("poem", "write a rhyming poem about the sea at night"),
    ("python", "fix a python error in a list comprehension"),
    ("sql", "debug an sql join that returns duplicate rows"),
]
CHILD_NAMES = ["Write dragon and knight stories", "Write sea poems", "Fix python errors", "Debug sql joins"]
CHILD_DESCRIPTIONS = [
    "Users asked for short stories about a dragon that fights a brave knight.",
    "Users asked for rhyming poems about the sea and its waves at night.",
    "Users asked why a list comprehension in their python script raised an error.",
    "Users asked why an sql join in their query returned duplicate rows.",
]


def client_for(server: LoopbackServer) -> LLMClient:
    return LLMClient(loopback_settings(server, max_attempts=1))


def corpus() -> tuple[list[str], Corpus]:
    chat_ids, texts = [], []
    for key, text in TOPICS:
        for j in range(5):
            chat_ids.append(f"{key}-{j}")
            texts.append(f"The user's overall request is to {text}, version {j}.")
    tasks = ["writing"] * 10 + ["coding"] * 10
    return chat_ids, Corpus.build(chat_ids, texts, tasks, None, AggregationThreshold(2, 1))


def bodies_with(server: LoopbackServer, text: str) -> list[str]:
    """The user messages of the chat calls the server got that contain `text`."""
    return [
        body["messages"][-1]["content"]
        for body in server.stats.bodies("chat")
        if text in body["messages"][-1]["content"]
    ]


def name_base_clusters(server: LoopbackServer) -> dict[int, ClusterLabel]:
    """The LLM backend names the four base clusters (each group's members are its inside sample)."""
    _, data = corpus()
    members = [list(range(5 * g, 5 * g + 5)) for g in range(4)]
    outside = [[r for r in range(20) if r not in rows][:3] for rows in members]
    groups = BaseGroups(members=members, inside=members, outside=outside)
    client = client_for(server)
    backend = LLMBackend("loopback", client, client, char_budget=2_000)
    return backend.name(data, groups, [0, 1, 2, 3])


def script_base_names(server: LoopbackServer, names: dict[int, list[dict[str, Any]]]) -> None:
    """Scripted answers per base cluster, matched on its first member's text (the retry note is
    appended to the same message, so the second reply goes to the second call)."""
    for g, replies in names.items():
        server.replies.push(*replies, match=f"<requests>\n- The user's overall request is to {TOPICS[g][1]}")


GOOD = {
    0: [{"name": "Write stories of dragons and knights", "description": "Stories were asked for."}],
    1: [{"name": "Write rhyming poems about the sea", "description": "Poems were asked for."}],
    2: [{"name": "Fix errors in python list comprehensions", "description": "Python fixes."}],
    3: [{"name": "Debug sql joins returning duplicate rows", "description": "Query fixes."}],
}


# ----- the definition of a generic name, and the checks, as plain functions -----


@pytest.mark.parametrize(
    "name",
    [
        "Conversational Summaries",
        "Conversations with AI Assistant",
        "Ask for Help",
        "Request for Assistance",
        "Help Request Group",
        "General Questions",
        "Users request help with tasks",
        "Describe the users' requests",  # Qwen 1.5B, 2026-12-06: the instruction, as a name
        "Tune a violin's pegs and fine tuners",  # the prompt's own example, copied
    ],
)
def test_the_names_small_models_gave_are_generic(name):
    assert generic_name(name) is not None


@pytest.mark.parametrize(
    "name", ["Diagnosis and Treatment", "Summarise news articles", "Plan a travel blog post about islands"]
)
def test_names_about_a_request_are_not_generic(name):
    assert generic_name(name) is None


def test_a_model_s_name_in_another_script_is_a_name_not_empty():
    # name_key kept only a-z and 0-9: a Russian model's name was "empty" and fell back offline.
    assert generic_name("Настройка обратного прокси") is None
    assert name_key("Настройка обратного прокси!") == name_key("настройка  ОБРАТНОГО прокси")
    assert name_key("Café") != name_key("Caf")


def test_a_name_equal_to_a_siblings_or_a_childs_is_a_problem_case_and_punctuation_aside():
    assert name_key("Plan trips!") == name_key("plan  TRIPS")
    labels = {0: ClusterLabel("Plan trips", "d"), 1: ClusterLabel("plan trips.", "d")}
    assert list(label_problems(labels)) == [1]  # the first keeps its name
    child = ClusterLabel(
        "Creative writing workshop", "Users asked for feedback on their short stories today."
    )
    parent = {0: ClusterLabel("Creative Writing Workshop", "Users wanted writing help of several kinds.")}
    assert label_problems(parent, children={0: [child]})[0].name is not None
    pasted = ClusterLabel("Give feedback on writing", child.description + " And poems too.")
    assert label_problems({0: pasted}, children={0: [child]})[0].description is not None
    assert copied_descriptions(pasted.description, [child.description])



# What the local 0.5B was shown for a cluster of 18 (2026-12-06), abridged: varied requests.
VARIED = [
    "The user's overall request is to learn about the negatives of farming meat for the climate.",
    "The user's overall request is to design a platform for online community leaders to hire.",
    "The user's overall request is to plan a weekly budget for a family of four.",
    "The user's overall request is to compare two phone contracts for a student.",
    "The user's overall request is to write a cover letter for a nursing job.",
]


def test_a_label_lifted_from_one_request_is_a_problem_and_an_abstract_one_is_not():
    assert about_one_request("Learn about the negatives of farming meat", VARIED)
    assert about_one_request("Design a platform for Online Community Leaders to connect talent", VARIED)
    assert not about_one_request("Everyday planning and writing help", VARIED)  # no request says it
    assert not about_one_request("Budget and phone contract", VARIED)  # words of two requests
    assert not about_one_request("Farming meat", VARIED[:3])  # too few requests to tell
    python = [
        "The user's overall request is to debug python code that raises a KeyError.",
        "The user's overall request is to fix a python list comprehension.",
        "The user's overall request is to speed up a slow python loop.",
        "The user's overall request is to read a csv file in python.",
    ]
    assert not about_one_request("Debug Python code", python)  # one request says it all, most say python
    platform = "Design a platform for online community leaders."
    lifted = {0: ClusterLabel("Learn about the negatives of farming meat", platform)}
    problem = label_problems(lifted, requests={0: VARIED})[0]
    assert problem.name == "names one request of the 5; say what most of them ask for"
    abstract = {0: ClusterLabel("Everyday plans and letters", platform)}
    described = label_problems(abstract, requests={0: VARIED})[0]
    assert described.name is None and described.description.startswith("describes one request of the 5")


# ----- base names -----


def test_a_name_that_echoes_the_prompt_is_asked_again_once_then_named_offline(server):
    framing = {
        "name": "Conversational Summaries",
        "description": "A group of conversation summaries created by an AI assistant to help product teams.",
    }
    script_base_names(server, GOOD | {0: [framing, {**framing, "name": "Conversations with AI Assistant"}]})
    labels = name_base_clusters(server)

    retries = bodies_with(server, RETRY_MARK)
    assert len(retries) == 1 and "Conversational Summaries" in retries[0]  # once, with the reason
    assert server.stats.count("chat") == 5
    assert labels[0].name not in {"Conversational Summaries", "Conversations with AI Assistant"}
    assert generic_name(labels[0].name) is None and "dragon" in labels[0].name.lower()  # offline
    assert labels[0].failed_reason is not None
    assert "Conversations with AI Assistant" in labels[0].failed_reason  # marked, with the reason
    assert "AI assistant" not in labels[0].description
    for g in (1, 2, 3):
        assert labels[g] == ClusterLabel(GOOD[g][0]["name"], GOOD[g][0]["description"])


def test_a_name_fixed_when_asked_again_is_the_models(server):
    script_base_names(
        server,
        GOOD
        | {2: [{"name": "Ask for Help", "description": "x"}, {"name": "Fix python", "description": "y"}]},
    )
    labels = name_base_clusters(server)
    assert labels[2] == ClusterLabel("Fix python", "y")  # no fallback mark
    assert len(bodies_with(server, RETRY_MARK)) == 1


def test_a_name_equal_to_a_siblings_is_asked_again(server):
    same = {"name": "Write creative texts", "description": "Creative writing was asked for."}
    again = {"name": "Write rhyming sea poems", "description": "Poems about the sea."}
    script_base_names(server, GOOD | {0: [same], 1: [{**same, "name": "write creative texts!"}, again]})
    labels = name_base_clusters(server)
    retries = bodies_with(server, RETRY_MARK)
    assert len(retries) == 1 and TOPICS[1][1] in retries[0]  # the second of the two is asked again
    assert labels[0].name == "Write creative texts" and labels[1].name == "Write rhyming sea poems"
    assert labels[0].failed_reason is None and labels[1].failed_reason is None


def test_a_sibling_duplicate_still_there_after_asking_again_is_named_offline(server):
    same = {"name": "Write creative texts", "description": "Creative writing was asked for."}
    script_base_names(server, GOOD | {0: [same], 1: [same, same]})
    labels = name_base_clusters(server)
    assert labels[0].name == "Write creative texts"
    assert name_key(labels[1].name) != name_key(labels[0].name)
    assert labels[1].failed_reason is not None and "already the name" in labels[1].failed_reason


# ----- parents -----


def base_clusters() -> tuple[list[Cluster], dict[str, np.ndarray], HierarchyInputs]:
    chat_ids, data = corpus()
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:4] + np.array(
        [[0.0] * 4 + [1.0] * 4] * 2 + [[0.0] * 8] * 2
    )  # two stories, two codes
    embedding_of: dict[str, np.ndarray] = {}
    clusters = []
    for g, (key, _) in enumerate(TOPICS):
        ids = [chat for chat in chat_ids if chat.startswith(f"{key}-")]
        for chat in ids:
            vector = centres[g] + 0.01 * rng.standard_normal(8)
            embedding_of[chat] = (vector / np.linalg.norm(vector)).astype(np.float32)
        clusters.append(
            Cluster(
                id=f"b{g}",
                name=CHILD_NAMES[g],
                description=CHILD_DESCRIPTIONS[g],
                slug=f"b{g}",
                chat_ids=ids,
            )
        )
    inputs = HierarchyInputs(clusters, embedding_of, data, withheld_base=set(), max_top_clusters=2)
    return clusters, embedding_of, inputs


def build_with_model(server: LoopbackServer, max_top_clusters: int = 2) -> tuple[list[Cluster], list[Any]]:
    """Clio's bottom-up hierarchy over the four base clusters (one level: two parents at the top
    by default), every answer of the model going through the loopback server."""
    clusters, embedding_of, inputs = base_clusters()
    client = client_for(server)
    name_offline = name_groups_offline(inputs)

    def plan(children: list[Cluster], centroids: np.ndarray, target: int) -> Any:
        return run_llm(plan_level_clio(client, children, centroids, target, 0, name_offline), client)

    return build_hierarchy(clusters, embedding_of, plan, max_top_clusters=max_top_clusters)


def script_level(server: LoopbackServer, parents: list[str], assignment: list[int]) -> None:
    """The proposed (and merged) parents, and which one each child is put under."""
    server.replies.push({"names": parents}, match="Propose about")
    server.replies.push({"names": parents}, match="Merge the ones")
    for child, parent in enumerate(assignment):
        server.replies.push({"parent": parents[parent]}, match=f"<kind>\n{CHILD_NAMES[child]}:")


def rename_reply(server: LoopbackServer, first_child: int, *replies: dict[str, Any]) -> None:
    server.replies.push(*replies, match=f"<kinds>\n- {CHILD_NAMES[first_child]}:")


def test_a_parent_of_a_single_child_is_not_made_nor_named(server):
    script_level(server, ["Write fiction and verse", "Fix python", "Debug queries"], [0, 0, 1, 2])
    rename_reply(
        server, 0, {"name": "Write stories and poems", "description": "Creative writing of two kinds."}
    )
    clusters, _ = build_with_model(server, max_top_clusters=3)

    assert len(bodies_with(server, "A broader kind of user request holds")) == 1  # no name for a lone child
    parents = [c for c in clusters if c.level == 1]
    assert [p.name for p in parents] == ["Write stories and poems"]
    assert hierarchy_problems(clusters, [c for b in clusters if b.level == 0 for c in b.chat_ids], 3) == []
    lone = [c for c in clusters if c.level == 0 and c.parent_id is None]
    assert sorted(c.name for c in lone) == ["Debug sql joins", "Fix python errors"]  # went up as they are


def test_a_level_where_every_child_is_alone_is_grouped_without_the_model(server):
    script_level(
        server, ["Write dragon tales", "Write sea verse", "Fix python", "Debug queries"], [0, 1, 2, 3]
    )
    clusters, plans = build_with_model(server)

    parents = [c for c in clusters if c.level > 0]
    assert parents, "the level was not made: four top-level clusters, more than two"
    assert sum(1 for c in clusters if c.parent_id is None) <= 2
    children: dict[str, int] = {}
    for c in clusters:
        if c.parent_id:
            children[c.parent_id] = children.get(c.parent_id, 0) + 1
    assert min(children.values()) >= 2
    assert all("single child" in (p.fallback or "") for p in parents)
    assert len(bodies_with(server, "A broader kind of user request holds")) == 0


def test_a_parent_named_like_its_child_is_asked_again_then_named_offline(server):
    script_level(server, ["Write fiction and verse", "Fix code"], [0, 0, 1, 1])
    copy = {"name": "Write Dragon and Knight Stories", "description": "Stories and poems were asked for."}
    rename_reply(server, 0, copy, copy)
    rename_reply(server, 2, {"name": "Fix python and sql code", "description": "Code fixes of two kinds."})
    clusters, _ = build_with_model(server)

    retries = bodies_with(server, RETRY_MARK)
    assert len(retries) == 1 and "Write Dragon and Knight Stories" in retries[0]
    by_id = {c.id: c for c in clusters}
    writing = by_id[str(by_id["b0"].parent_id)]
    assert name_key(writing.name) not in {name_key(n) for n in CHILD_NAMES}
    assert writing.fallback is not None and "one of the clusters it holds" in writing.fallback
    code = next(c for c in clusters if c.level == 1 and c.id != writing.id)
    assert code.name == "Fix python and sql code" and code.fallback is None


def test_a_description_pasted_from_the_childrens_never_appears(server):
    script_level(server, ["Write fiction and verse", "Fix code"], [0, 0, 1, 1])
    pasted = {
        "name": "Write stories and poems",
        "description": f"{CHILD_DESCRIPTIONS[0]} {CHILD_DESCRIPTIONS[1]}",
    }
    rename_reply(server, 0, pasted, pasted)
    rename_reply(server, 2, {"name": "Fix python and sql code", "description": "Code fixes of two kinds."})
    clusters, _ = build_with_model(server)

    assert len(bodies_with(server, RETRY_MARK)) == 1
    writing = next(c for c in clusters if c.name == "Write stories and poems")  # the model's name stays
    for child in CHILD_DESCRIPTIONS:
        assert child not in writing.description and child.rstrip(".") not in writing.description
    assert writing.description.startswith("10 conversations.")  # the offline, honest description
    assert writing.fallback is not None and "described without the LLM" in writing.fallback


def test_generic_proposed_parents_are_dropped(server):
    script_level(server, ["Conversation Summaries", "Ask for Help"], [0, 0, 1, 1])
    clusters, _ = build_with_model(server)

    parents = [c for c in clusters if c.level == 1]
    assert parents and not {"Conversation Summaries", "Ask for Help"} & {p.name for p in parents}
    assert all("every proposed parent name was generic" in (p.fallback or "") for p in parents)
    assert len(bodies_with(server, "<kind>\n")) == 0  # nothing assigned to a generic parent


# ----- the loopback server's scripted replies, which every test above relies on -----


@pytest.mark.parametrize("mode", ["json_schema", "tools", "md_json"])
def test_scripted_replies_answer_the_next_calls_in_the_shape_the_mode_expects(server, mode):
    from kura_pipeline.core.prompts import CLUSTER_NAME_PROMPT, ClusterNameResponse

    client = LLMClient(LLMSettings(model="loopback", base_url=server.base_url, mode=mode, max_attempts=1))
    server.replies.push({"name": "Conversational Summaries"})  # a part: the rest is generated
    server.replies.push({"name": "Kept for its words", "description": "d"}, match="- zebra")

    async def ask(text: str) -> Any:
        messages = CLUSTER_NAME_PROMPT.messages(inside=text, outside="- none")
        return await client.complete(CLUSTER_NAME_PROMPT, messages, ClusterNameResponse)

    async def three() -> list[Any]:
        return [await ask("- a"), await ask("- zebra"), await ask("- b")]

    first, matched, generated = run_llm(three(), client)
    assert first.name == "Conversational Summaries" and first.description  # generated description
    assert (matched.name, matched.description) == ("Kept for its words", "d")
    assert generated.name not in {"Conversational Summaries", "Kept for its words"}  # script empty
    assert server.replies.pending == [] and len(server.replies.used) == 2


def test_the_tree_says_whether_a_name_or_only_a_description_was_written_without_the_llm():
    from kura_pipeline.core.render.tree import render_tree

    def cluster(name: str, fallback: str | None) -> Cluster:
        ids = [f"{name}-{i}" for i in range(5)]
        return Cluster(id=name, name=name, description="d", slug=name, chat_ids=ids, fallback=fallback)

    text = render_tree(
        [
            cluster("Violin practice", "described without the LLM: the model's description copied a child's"),
            cluster("Tax forms", "named without the LLM: the model's name was generic (asked twice)"),
            cluster("Sourdough", None),
        ]
    )
    lines = {line.split(" (")[0].split()[-1]: line for line in text.splitlines() if "(" in line}
    assert lines["practice"].endswith("[described without the LLM]")
    assert lines["forms"].endswith("[named without the LLM]")
    assert "without the LLM" not in lines["Sourdough"]


def test_an_offline_fallback_over_llm_summaries_names_no_template_words_and_no_free_text_task():
    # Measured with Qwen 0.5B: a fallback named "User's overall request and short" (the summary's
    # own template) and "Mixed Building strong, supportive relationships requests and ..." (the
    # model's free-text task read as a task type).
    from kura_pipeline.core.backends import dataset_corpus
    from kura_pipeline.core.frames import summaries_to_frame
    from kura_pipeline.core.models import ConversationSummary
    from kura_pipeline.core.naming import TASK_PLURALS, offline_labels
    from kura_pipeline.core.privacy import AggregationThreshold

    subjects = ["a sourdough loaf recipe", "a python script for csv files", "a birthday poem"]
    summaries = [
        ConversationSummary(
            chat_id=f"c{i}",
            summary=f"The user's overall request for the assistant is to help with {subjects[i % 3]}.",
            task=f"The task is to build strong, supportive relationships {i}",
        )
        for i in range(30)
    ]
    chat_ids = [s.chat_id for s in summaries]
    corpus = dataset_corpus(summaries_to_frame(summaries), chat_ids, AggregationThreshold(5, 1), "user_id")
    assert all(task in TASK_PLURALS for task in corpus.naming.tasks)
    labels = offline_labels(corpus.naming, [list(range(i, 30, 3)) for i in range(3)])
    text = " ".join(f"{label.name} {label.description}" for label in labels).lower()
    assert "overall request" not in text and "assistant" not in text
    assert "relationships" not in text
    assert any("sourdough" in label.name.lower() for label in labels)
