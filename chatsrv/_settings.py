"""chatsrv's settings: read from the environment once, in one place, then passed explicitly.

Every variable is ``CHATSRV_`` + the field name in upper case (``CHATSRV_TURN_DEADLINE_S``);
``OPENAI_API_KEY`` is honoured when ``CHATSRV_LLM_API_KEY`` is unset.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///chatsrv.db"
DEMO_MODEL = "chatsrv-demo"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CHATSRV_", frozen=True, extra="ignore", populate_by_name=True
    )

    # Where to listen, for `chatsrv serve` (hypercorn's own config applies under `hypercorn`).
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # Processes serving the port: more than 1 runs hypercorn's master and that many workers.
    workers: int = Field(default=1, ge=1)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # "json": one JSON object a line (chatsrv's records and hypercorn's), for log shippers.
    log_format: Literal["text", "json"] = "text"
    # GET /metrics (Prometheus): "public" to anyone who can reach it, "keys" only with an API key
    # (CHATSRV_AUTH=keys; with auth off it is the local user's, as every route), "off" not at all.
    metrics: Literal["public", "keys", "off"] = "public"

    # Who may call the API. "keys": every request but the health checks and the API's
    # description carries `Authorization: Bearer <key>` (`chatsrv keys create --user NAME`), and
    # sees only its user's conversations. "off": every request is the one user 'local', and
    # chatsrv refuses to serve on an address other than loopback.
    auth: Literal["keys", "off"] = "off"

    # The database: PostgreSQL (postgresql://, postgresql+asyncpg://) or SQLite (sqlite:///path).
    database_url: str = DEFAULT_DATABASE_URL
    db_pool_size: int = Field(default=10, ge=1)
    db_timeout_s: float = Field(default=10.0, gt=0)
    # Apply the migrations a database lacks when chatsrv starts (else it refuses to start and
    # says to run `chatsrv db upgrade`). Unset: yes on SQLite, no on PostgreSQL.
    db_auto_upgrade: bool | None = None

    # The upstream. "auto" picks "openai" when a base URL or an API key is set, else "demo".
    llm_provider: Literal["auto", "openai", "demo"] = "auto"
    llm_base_url: str | None = None
    llm_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("CHATSRV_LLM_API_KEY", "OPENAI_API_KEY")
    )
    llm_model: str | None = None
    llm_timeout_s: float = Field(default=60.0, gt=0)
    llm_max_retries: int = Field(default=2, ge=0)
    # How the SDK talks HTTP: "lean" is chatsrv's HTTP/1.1 transport (less CPU per token),
    # "httpx" the SDK's own (HTTP/2-capable, honours HTTP(S)_PROXY). "auto": lean, unless a
    # proxy is set in the environment.
    llm_transport: Literal["auto", "lean", "httpx"] = "auto"
    # The upstream's frame: after a read that carried reply text, the next read waits until this
    # many milliseconds have passed since it, so that what the upstream sends meanwhile comes in
    # one read, one hand-over to the persister and one write to each client. The first text of a
    # reply, and any that follows a quiet frame, is read at once; 0 reads every token alone.
    frame_ms: float = Field(default=40.0, ge=0, le=1000)
    demo_token_interval_s: float = Field(default=0.05, ge=0)

    # Turns.
    turn_deadline_s: float = Field(default=600.0, gt=0)
    heartbeat_s: float = Field(default=15.0, gt=0)
    shutdown_grace_s: float = Field(default=5.0, ge=0)
    max_message_chars: int = Field(default=100_000, ge=1)
    # Turns running at once in one process (a worker); one more is refused with 503.
    max_active_turns: int = Field(default=500, ge=1)
    # Replies of one user streaming at once, on every process; one more is refused with 429.
    max_streams_per_user: int = Field(default=20, ge=1)
    # When a reply's last client leaves: "cancel" stops it, "finish" lets it run to its end, a
    # number of seconds waits that long for a client to resume it, then stops it. A request's
    # "on_disconnect" overrides it.
    on_disconnect: Literal["cancel", "finish"] | Annotated[float, Field(ge=0)] = "cancel"

    # Durability.
    checkpoint_interval_s: float = Field(default=1.0, gt=0)
    # How long a final commit retries while the server runs normally, then during shutdown,
    # before the reply goes to the local journal instead.
    persist_retry_s: float = Field(default=30.0, gt=0)
    persist_grace_s: float = Field(default=3.0, gt=0)
    journal_dir: Path = Path("chatsrv-journal")
    # A streaming row's lease: renewed every third of it while its process lives; the sweeper
    # marks rows whose lease expired 'interrupted'/'server_crash'.
    lease_s: float = Field(default=30.0, gt=0)
    sweep_interval_s: float = Field(default=15.0, gt=0)

    # Browser origins allowed to call the API from other origins (CORS): comma-separated, e.g.
    # "https://chat.example.com,http://localhost:5173", or "*"; none by default.
    cors_origins: Annotated[list[str], NoDecode] = []

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], or *)")
        return origins

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, url: str) -> str:
        """Accept plain URLs and name the async driver chatsrv runs them with."""
        for plain, driver in (
            ("postgresql://", "postgresql+asyncpg://"),
            ("postgres://", "postgresql+asyncpg://"),
            ("sqlite://", "sqlite+aiosqlite://"),
        ):
            if url.startswith(plain):
                return driver + url[len(plain) :]
        if url.startswith(("postgresql+asyncpg://", "sqlite+aiosqlite://")):
            return url
        raise ValueError("CHATSRV_DATABASE_URL must be a postgresql:// or sqlite:// URL")

    @property
    def upgrades_schema(self) -> bool:
        """Whether chatsrv applies missing migrations when it starts."""
        if self.db_auto_upgrade is not None:
            return self.db_auto_upgrade
        return self.database_url.startswith("sqlite")

    @property
    def provider(self) -> Literal["openai", "demo"]:
        if self.llm_provider != "auto":
            return self.llm_provider
        return "openai" if self.llm_base_url or self.llm_api_key else "demo"

    @property
    def model(self) -> str:
        """The model a turn uses when neither the request nor the conversation names one."""
        if self.llm_model:
            return self.llm_model
        return DEMO_MODEL if self.provider == "demo" else "gpt-4o-mini"
