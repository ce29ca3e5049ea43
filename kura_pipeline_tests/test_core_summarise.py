from kura_pipeline.core.models import Conversation, Message
from kura_pipeline.core.phrases import document_phrases, phrase_table
from kura_pipeline.core.privacy import scrub_pii
from kura_pipeline.core.prompts import SUMMARY_PROMPT, format_conversation, truncate_middle
from kura_pipeline.core.summarise import detect_languages, shares_run_of_words, summarise_all_offline


def _conversation(*turns: tuple[str, str]) -> Conversation:
    return Conversation(
        chat_id="c1",
        created_at="2026-01-01T00:00:00Z",
        messages=[Message(role=role, content=text) for role, text in turns],  # type: ignore[arg-type]
        metadata={"model": "m"},
    )


def test_offline_summary_is_an_abstraction_and_judges_nothing():
    conversation = _conversation(
        ("user", "How do I reverse a list in Python? I tried reversed() but got an iterator."),
        ("assistant", "Use list(reversed(x)) or x[::-1]."),
        ("user", "Thanks, and for a string?"),
    )
    summary = summarise_all_offline([conversation], min_conversations=1).summaries[0]
    # A task type and shared phrases, never the user's sentence; the request is only embedded.
    assert "reverse a list in Python" not in summary.summary
    assert summary.summary.startswith("A coding request about") and "2 user turns" in summary.summary
    assert summary.clustering_text is not None and summary.clustering_text.startswith(
        "How do I reverse a list"
    )
    assert summary.request is None and summary.task == "coding"
    # Facets that need judgement are left empty, not invented.
    assert summary.concerning_score is None and summary.user_frustration is None
    assert summary.metadata == {"model": "m"}


def test_offline_summary_phrases_come_from_enough_conversations():
    shared = [_conversation(("user", f"Fix my pandas dataframe merge, attempt {i}")) for i in range(5)]
    rare = _conversation(("user", "Fix my pandas dataframe merge about the zanzibar ledger"))
    run = summarise_all_offline([*shared, rare], min_conversations=5)
    texts = [s.summary for s in run.summaries]
    assert all("pandas dataframe" in text for text in texts)
    assert not any("zanzibar" in text or "ledger" in text for text in texts)  # one conversation's words


def test_offline_summary_scrubs_pii_and_counts_it():
    conversation = _conversation(
        ("user", "Email jane.doe@example.com or call +1 415 555 0199 about https://example.com/u/jane"),
    )
    run = summarise_all_offline([conversation], min_conversations=1)
    text = run.summaries[0].summary + str(run.summaries[0].clustering_text)
    assert "jane.doe@example.com" not in text and "555 0199" not in text and "example.com/u" not in text
    assert run.pii_scrubbed["email"] == 1 and run.pii_scrubbed["phone"] == 1 and run.pii_scrubbed["url"] == 1


def test_scrub_leaves_ordinary_numbers_and_text_alone():
    text, counts = scrub_pii("I have 3 cats and 2024 was a good year; version 1.2 works.")
    assert text == "I have 3 cats and 2024 was a good year; version 1.2 works."
    assert not counts


def test_scrub_finds_cards_and_ip_addresses():
    text, counts = scrub_pii("card 4111 1111 1111 1111 from host 192.168.10.24")
    assert "4111" not in text and "192.168" not in text
    assert counts["card_number"] == 1 and counts["ip_address"] == 1


def test_languages_from_words_and_code_fences():
    english = _conversation(
        ("user", "What is the best way to sort this and how can you help?\n```python\nx=1\n```")
    )
    spanish = _conversation(("user", "¿Cómo puedo hacer que la función devuelva una lista para los datos?"))
    chinese = _conversation(("user", "请帮我写一个排序算法的例子，谢谢你的帮助"))
    assert detect_languages(english) == ["english", "python"]
    assert detect_languages(spanish) == ["spanish"]
    assert detect_languages(chinese) == ["chinese"]


def test_long_conversations_keep_start_and_end_within_budget():
    text = "START " + "x" * 50_000 + " END"
    cut = truncate_middle(text, 1200)
    assert cut.startswith("START") and cut.endswith("END")
    assert "characters omitted" in cut
    assert len(cut) < 1300
    conversation = _conversation(("user", "START " + "y" * 30_000), ("assistant", "the final answer END"))
    transcript = format_conversation(conversation, char_budget=2000)
    assert len(transcript) < 2100 and "START" in transcript and "final answer END" in transcript


def test_summary_prompt_has_a_version_and_embeds_the_transcript():
    messages = SUMMARY_PROMPT.messages(transcript="<user>hi</user>")
    assert SUMMARY_PROMPT.key == f"conversation_summary@{SUMMARY_PROMPT.version}"
    assert messages[0]["role"] == "system" and "<user>hi</user>" in messages[1]["content"]


def test_scrub_removes_tokens_and_keys_but_not_words():
    text, counts = scrub_pii(
        "use key sk-proj-tddqlekcpmhfjpxz8svmp34beawxkint62odnj with internationalization"
    )
    assert "tddqlek" not in text and "internationalization" in text
    assert counts["token"] == 1


def test_offline_summary_never_repeats_eight_words_of_the_user():
    # Nine words without a stop word: three phrases side by side would repeat them.
    text = "alpha bravo charlie delta echo foxtrot golf hotel india"
    conversations = [_conversation(("user", text)) for _ in range(5)]
    for summary in summarise_all_offline(conversations, min_conversations=5).summaries:
        assert not shares_run_of_words(summary.summary, text)
        assert "about" in summary.summary  # still described by its phrases, fewer of them
    assert shares_run_of_words("a b c d e f g h", "x a b c d e f g h y")
    assert not shares_run_of_words("a b c d e f g", "a b c d e f g")


def test_offline_topic_is_what_the_conversation_is_about_not_a_longer_phrase_said_in_passing():
    # Six conversations share both phrases; each asks about kotlin coroutines (and says so twice)
    # and mentions a "sleepy tired face" once, in a later turn. Ranked by length and rarity alone,
    # the three-word aside won; ranked by use and by the request, the subject does.
    conversations = [
        Conversation(
            chat_id=f"c{i}",
            messages=[
                Message(role="user", content="Debug my kotlin coroutine. My kotlin coroutine is so slow"),
                Message(role="assistant", content="Use a supervisor job."),
                Message(role="user", content="Thanks. Long night, sleepy tired face here."),
            ],
        )
        for i in range(6)
    ]
    summaries = summarise_all_offline(conversations, min_conversations=5).summaries
    assert [s.topic for s in summaries] == ["kotlin coroutine"] * 6
    assert all(s.summary.startswith("A coding request about kotlin coroutine") for s in summaries)


def test_contractions_and_plurals_never_make_a_summary_s_phrases():
    texts = [
        f"I didn't see why it can't load the user's players; the player list doesn't sort ({i})"
        for i in range(5)
    ]
    table = phrase_table(texts, 5)
    assert not {"didn't", "can't", "user's", "doesn't"} & set(table.phrases)
    picked = document_phrases(table, 0, text=texts[0], request=texts[0])
    assert "player" in " ".join(picked)
    assert not {"player", "players"} <= {word for phrase in picked for word in phrase.split()}


def test_a_shared_russian_sentence_makes_cyrillic_phrases_and_a_name_not_other_requests():
    # Words of any alphabet count: six conversations that share a Russian sentence are described
    # and named by its phrases, not as "Other requests" with "no phrase shared" (ASCII-only words).
    import re

    from kura_pipeline.core.naming import naming_inputs, offline_labels
    from kura_pipeline.core.phrases import words

    russian = [
        f"Помоги настроить обратный прокси nginx на сервере Ubuntu. Попытка номер {i}" for i in range(6)
    ]
    others = [f"How do I sort a list of numbers in Python, case {i}?" for i in range(6)] + [
        "Переведи стихотворение Пушкина на английский",
        "Какая погода будет завтра в Москве?",
        "Расскажи историю про кота и собаку",
    ]
    conversations = [
        Conversation(chat_id=f"c{i}", messages=[Message(role="user", content=text)])
        for i, text in enumerate(russian + others)
    ]
    summaries = summarise_all_offline(conversations, min_conversations=5).summaries
    cyrillic = re.compile("[а-яё]")
    for summary in summaries[:6]:
        assert summary.topic is not None and cyrillic.search(summary.topic), summary
        assert " about " in summary.summary and cyrillic.search(summary.summary), summary
    # Only phrases all six use: no one's rare word ("Пушкина") and no stop word ("на").
    shown = " ".join(s.summary for s in summaries)
    assert "пушкина" not in shown.lower() and " на " not in shown
    texts = [s.clustering_text or "" for s in summaries]
    inputs = naming_inputs(texts, [s.task for s in summaries], min_conversations=5)
    [label, _] = offline_labels(inputs, [list(range(6)), list(range(6, 12))])
    assert not label.name.lower().startswith("other requests"), label
    assert cyrillic.search(label.name.lower()) and "No phrase is shared" not in label.description, label
    assert words("Сервер NGINX, café и Ελλάδα; c++ 2nd") == ["сервер", "nginx", "café", "и", "ελλάδα", "c++"]


def test_a_conversation_with_no_user_message_is_a_failed_row_not_a_request():
    from kura_pipeline.core.summarise import NO_USER_MESSAGE

    asked = _conversation(("user", "How do I reverse a list in Python?"), ("assistant", "x[::-1]"))
    unasked = Conversation(
        chat_id="c2", messages=[Message(role="assistant", content="Hello! How can I help you today?")]
    )
    run = summarise_all_offline([asked, unasked], min_conversations=1)
    assert [s.chat_id for s in run.summaries] == ["c1"]
    assert run.failures == {"c2": NO_USER_MESSAGE}
