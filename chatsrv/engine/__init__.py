"""The turn engine: running a turn, and the durability that keeps every reply it started.

It owns the turn task and its generation scope (``_engine.py``, the heart of chatsrv), the turn's
state as its relays read it (``_turn.py``), the persister that saves each reply whatever happens
(``_persister.py``), the local journal it falls back on when the database is down
(``_journal.py``), recovery: leases, the sweep of dead processes' rows, the journal's replay
(``_recovery.py``), and the dealings with the other processes on the same database: following a
reply another process writes, publishing this process's to them, cancel requests
(``_peers.py``, ``_follow.py``, ``_publisher.py``, ``_wire.py``).

May import: ``chatsrv.store``, ``chatsrv.upstream``, ``chatsrv._settings``, ``chatsrv._errors``.
Never the HTTP layer: the engine does not know how a turn is shown to a client.
"""

from ._engine import TurnEngine, TurnRequest
from ._follow import Follower, Piece
from ._journal import FinalRecord, Journal
from ._peers import Peers
from ._persister import Persister
from ._recovery import keep_leases, new_instance_id, recover_forever, replay
from ._turn import Outcome, Status, StopReason, Turn

__all__ = [
    "FinalRecord",
    "Follower",
    "Journal",
    "Outcome",
    "Peers",
    "Persister",
    "Piece",
    "Status",
    "StopReason",
    "Turn",
    "TurnEngine",
    "TurnRequest",
    "keep_leases",
    "new_instance_id",
    "recover_forever",
    "replay",
]
