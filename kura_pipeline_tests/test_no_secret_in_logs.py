"""No secret in any log (issue #13): an endpoint that echoes the Authorization header in its
401, 500 and 200 replies never gets the key into a log record, stderr or stdout. Against the real
loopback server on 127.0.0.1, every library logging at DEBUG, nothing patched."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator

import pytest
from dagster import DagsterInstance, asset, materialize

from kura_pipeline.core.llm import LLMStageFailed, run_llm
from kura_pipeline.core.models import Conversation
from kura_pipeline.core.redact import REDACTED, install_redaction, redact, uninstall_redaction
from kura_pipeline.core.summarise import summarise_all_with_llm
from kura_pipeline.resources.llm import LLMResource, NamedLLMClient
from kura_pipeline_tests.support.llm_fixtures import loopback_resource, question_and_answer
from kura_pipeline_tests.support.loopback import LoopbackServer

KEY = "sk-test-0123456789abcdefSECRET"
NAMED_KEY = "sk-named-9876543210fedcbaSECRET"
CHAR_BUDGET = 4000


def conversations(count: int) -> list[Conversation]:
    questions = [f"How do I sort list {index} in Python?" for index in range(count)]
    return question_and_answer(questions, answer="Use sorted(numbers).", tag="s")


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    """Not conftest's: this endpoint echoes the Authorization header in its replies."""
    with LoopbackServer(echo_authorization=True) as srv:
        yield srv


@pytest.fixture
def loud_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every library at DEBUG, and a plain stderr handler on the root logger (as a terminal or
    Dagster's compute log would see it)."""
    uninstall_redaction()
    caplog.set_level(logging.DEBUG)
    for name in ("instructor", "openai", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    yield
    logging.getLogger().removeHandler(handler)
    uninstall_redaction()


def resource(server: LoopbackServer, **overrides: object) -> LLMResource:
    values: dict[str, object] = {
        "api_key": KEY,
        "max_concurrency": 2,
        "max_attempts": 3,
        "read_timeout_seconds": 5.0,
    }
    return loopback_resource(server, **(values | overrides))


def everything_logged(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> str:
    captured = capfd.readouterr()
    records = "\n".join(caplog.handler.format(record) for record in caplog.records)
    return "\n".join([records, caplog.text, captured.err, captured.out])


def test_the_endpoint_really_echoes_the_key(server: LoopbackServer) -> None:
    import httpx

    server.faults.push("401")
    reply = httpx.post(
        f"{server.base_url}/chat/completions",
        json={"messages": []},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert (
        reply.status_code == 401
        and KEY in reply.text
        and reply.headers["x-echo-authorization"] == f"Bearer {KEY}"
    )


def test_the_key_echoed_in_401_500_and_200_replies_reaches_no_log(
    server: LoopbackServer,
    loud_logs: None,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    # 200 replies (and 500s retried in between): the stage succeeds.
    server.faults.push("500", "500", "ok", "500")
    client = resource(server).client()
    run = run_llm(summarise_all_with_llm(conversations(4), client, CHAR_BUDGET), client)
    assert len(run.summaries) == 4
    # 500 on every call, so each is retried and logged again and again: the stage fails.
    server.faults.set(error_500_every=1)
    client = resource(server).client()
    with pytest.raises(LLMStageFailed):
        run_llm(summarise_all_with_llm(conversations(3), client, CHAR_BUDGET), client)
    assert server.stats.count("chat", "ok") >= 4 and server.stats.count("chat", "500") >= 6
    # 401: the key is refused (and the client stops at once).
    server.reset(faults=True)
    server.faults.push("401")
    client = resource(server, max_concurrency=1).client()
    with pytest.raises(LLMStageFailed, match="refused the key"):
        run_llm(summarise_all_with_llm(conversations(1), client, CHAR_BUDGET), client)
    assert server.stats.count("chat", "401") == 1

    logged = everything_logged(caplog, capfd)
    assert KEY not in logged
    assert REDACTED in logged  # the echoed key was there, and was replaced
    assert "HTTP Request: POST" in logged  # the libraries did log at DEBUG/INFO


def test_a_named_clients_key_from_the_environment_is_redacted_too(
    server: LoopbackServer,
    loud_logs: None,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KURA_TEST_NAMED_KEY", NAMED_KEY)
    named = NamedLLMClient(
        model="loopback", base_url=server.base_url, api_key_env="KURA_TEST_NAMED_KEY", max_attempts=2
    )
    server.faults.set(error_500_every=1)
    client = resource(server, clients={"cheap": named}).client("cheap")
    with pytest.raises(LLMStageFailed, match="HTTP 500"):
        run_llm(summarise_all_with_llm(conversations(1), client, CHAR_BUDGET), client)
    logged = everything_logged(caplog, capfd)
    assert NAMED_KEY not in logged and REDACTED in logged


def test_short_keys_are_not_redacted_and_long_ones_are_everywhere_in_a_record(
    caplog: pytest.LogCaptureFixture,
) -> None:
    uninstall_redaction()
    try:
        install_redaction(["short", None, KEY])
        assert redact("short and sweet") == "short and sweet"
        caplog.set_level(logging.DEBUG)
        logger = logging.getLogger("kura_pipeline_tests.redact")
        try:
            raise ValueError(f"refused {KEY}")
        except ValueError:
            logger.exception("header %s in %r", f"Bearer {KEY}", {"key": KEY})
        record = caplog.records[-1]
        assert KEY not in record.getMessage() and KEY not in caplog.text
        assert caplog.text.count(REDACTED) == 3  # message, its dict argument and the traceback
    finally:
        uninstall_redaction()


def test_dagsters_event_log_and_stderr_never_hold_the_key(capfd: pytest.CaptureFixture[str]) -> None:
    @asset
    def leaky(context) -> int:  # type: ignore[no-untyped-def]  # a postponed annotation fails in Dagster
        context.log.warning(f"the endpoint said: you sent Authorization: Bearer {KEY}")
        logging.getLogger("instructor").error("API call failed: %s", {"message": f"Bearer {KEY}"})
        return 1

    uninstall_redaction()
    try:
        install_redaction([KEY])
        with DagsterInstance.ephemeral() as instance:
            result = materialize([leaky], instance=instance)
            messages = [entry.message or "" for entry in instance.all_logs(result.run_id)]
            events = [str(entry.dagster_event) for entry in instance.all_logs(result.run_id)]
        captured = capfd.readouterr()
        assert not any(KEY in text for text in [*messages, *events, captured.err, captured.out])
        assert any(REDACTED in message for message in messages)
    finally:
        uninstall_redaction()
