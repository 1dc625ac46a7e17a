"""Settings come from the environment, in one place."""

from __future__ import annotations

import pydantic
import pytest

from chatsrv._settings import DEFAULT_DATABASE_URL, DEMO_MODEL, Settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "CHATSRV_LLM_API_KEY", "CHATSRV_LLM_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def test_defaults_serve_offline() -> None:
    settings = Settings()
    assert settings.database_url == DEFAULT_DATABASE_URL
    assert (settings.provider, settings.model) == ("demo", DEMO_MODEL)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgres://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("sqlite:///x.db", "sqlite+aiosqlite:///x.db"),
    ],
)
def test_database_urls_get_their_async_driver(
    monkeypatch: pytest.MonkeyPatch, url: str, expected: str
) -> None:
    monkeypatch.setenv("CHATSRV_DATABASE_URL", url)
    assert Settings().database_url == expected


def test_other_databases_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATSRV_DATABASE_URL", "mysql://u@h/db")
    with pytest.raises(pydantic.ValidationError, match="postgresql:// or sqlite://"):
        Settings()


def test_openai_api_key_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-openai-variable")
    settings = Settings()
    assert settings.provider == "openai"
    assert settings.llm_api_key is not None
    assert settings.llm_api_key.get_secret_value() == "sk-from-openai-variable"
    monkeypatch.setenv("CHATSRV_LLM_API_KEY", "sk-chatsrv")
    assert Settings().llm_api_key.get_secret_value() == "sk-chatsrv"  # type: ignore[union-attr]


def test_a_base_url_selects_the_openai_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATSRV_LLM_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("CHATSRV_LLM_MODEL", "local-model")
    settings = Settings()
    assert (settings.provider, settings.model) == ("openai", "local-model")


def test_numbers_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATSRV_TURN_DEADLINE_S", "0")
    with pytest.raises(pydantic.ValidationError):
        Settings()
