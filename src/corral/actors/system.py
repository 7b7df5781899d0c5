"""The actor system: mailboxes by path, the kernel's settings, and lifecycle events.

One per runtime. Paths are like registered names in Erlang: the same path always gets
the same mailbox, so references survive restarts. Lifecycle events go to structlog and
to listeners (metrics); the system never starts or stops an actor itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, final

from corral.actors.mailbox import Mailbox, MailboxState
from corral.actors.ref import ActorRef
from corral.logging import get_logger
from corral.protocol.lifecycle import LifecycleEvent

_log = get_logger("corral.actors")


_EVENT_NAMES: dict[str, str] = {
    "started": "actor.started", "exited": "actor.exited", "restarting": "actor.restarting",
    "restarted": "actor.restarted", "stopped": "actor.stopped",
    "intensity_exceeded": "supervisor.intensity_exceeded",
    "start_failed": "actor.start_failed",
}
_ALARMING = frozenset({"exited", "intensity_exceeded", "start_failed"})
_ROUTINE = frozenset({"started", "stopped"})  # every start and shutdown: debug level


class Listener(Protocol):
    """Hears every lifecycle event; must not block."""

    def __call__(self, event: LifecycleEvent) -> None: ...


@final
class ActorSystem:
    """The registry of mailboxes by path, the kernel's settings, and event listeners.

    One per runtime. Paths are like registered names in Erlang: the same path always
    gets the same mailbox, so references survive restarts of the actor and its parents.
    """

    def __init__(self, *, mailbox_capacity: int = 1024, stash_limit: int = 256,
                 fairness_interval: int = 64, default_ask_timeout: float = 30.0) -> None:
        self.mailbox_capacity = mailbox_capacity
        self.stash_limit = min(stash_limit, mailbox_capacity)
        self.fairness_interval = fairness_interval
        self.default_ask_timeout = default_ask_timeout
        self._mailboxes: dict[str, Mailbox] = {}
        self._listeners: list[Listener] = []

    def mailbox(self, path: str) -> Mailbox:
        mailbox = self._mailboxes.get(path)
        if mailbox is None:
            mailbox = self._mailboxes[path] = Mailbox(
                path, capacity=self.mailbox_capacity, stash_limit=self.stash_limit)
        return mailbox

    def forget(self, path: str) -> None:
        """Drop a stopped path so the name can be reused by a fresh child."""
        mailbox = self._mailboxes.get(path)
        if mailbox is not None and mailbox.state is MailboxState.STOPPED:
            del self._mailboxes[path]

    def ref(self, path: str) -> ActorRef:
        return ActorRef(self.mailbox(path), self.default_ask_timeout)

    def paths(self) -> list[str]:
        return list(self._mailboxes)

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` with every lifecycle event; returns a function that removes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def emit(self, event: LifecycleEvent) -> None:
        fields: dict[str, Any] = {"actor": event.path}
        if event.reason is not None:
            fields["reason"] = event.reason.describe()
        if event.attempt:
            fields["attempt"] = event.attempt
        if event.delay_s:
            fields["delay_s"] = round(event.delay_s, 6)
        if event.kind in _ALARMING and (event.reason is None or event.reason.abnormal):
            log = _log.warning
        elif event.kind in _ROUTINE or event.kind in _ALARMING:
            log = _log.debug
        else:
            log = _log.info
        log(_EVENT_NAMES[event.kind], **fields)
        for listener in list(self._listeners):
            listener(event)
