"""Shared fixtures. Each group lives in the module named for what it provides."""

from tests.db import database_url, postgresql_url, store  # noqa: F401
from tests.fake_upstream import upstream  # noqa: F401
from tests.faultproxy import pg_proxy  # noqa: F401
from tests.server import chatsrv, start_chatsrv  # noqa: F401
