"""KeysInOrder: each key reaches the widget that has focus once the keys before it have done their work.

Textual routes a key to the focused widget when the app reads it, but runs a non-priority binding (tab to
the next field, a key that opens a dialog) only when the key has bubbled back up to the app. Keys that
arrive together (typed fast, pasted by tmux, or queued while the UI was busy for a moment) are therefore
all routed before the first one has moved the focus: `path<tab>name` typed into a form put `name` in the
path field, and the first letters typed right after the key that opens a dialog landed on the screen
behind it (where a letter may be a binding). Here a key waits until the one before it has travelled up
to the app, its action has run and the screen it leaves behind has settled (a dialog it opened has
mounted and focused its first field). Keys are never dropped, only held for those few message turns;
a stuck widget holds them for at most SETTLE_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
from collections import deque

from textual import events
from textual.message_pump import MessagePump

SETTLE_TIMEOUT_S = 1.0
SETTLE_ROUNDS = 4  # a dialog mounts, then its on_mount focuses a field: a few turns of the queues


class KeysInOrder:
    """Mixed into the App (before App)."""

    _held_keys: deque[events.Key | events.Paste] | None = None
    _key_in_flight = False
    _settling: asyncio.Task | None = None  # kept: a task nobody holds may be collected mid-way

    async def on_event(self, event: events.Event) -> None:
        if not isinstance(event, events.Key | events.Paste) or event.is_forwarded:  # a paste keeps its place too
            await super().on_event(event)
            return
        if self._held_keys is None:
            self._held_keys = deque()
        self._held_keys.append(event)
        await self._next_key()

    async def _next_key(self) -> None:
        if self._key_in_flight or not self._held_keys:
            return
        event = self._held_keys.popleft()
        self._key_in_flight = True
        target = self.focused or self.screen  # where Textual forwards it (unless a priority binding takes it)
        screen = self.screen
        try:
            await super().on_event(event)
        finally:
            self._settling = asyncio.create_task(self._settle_then_release(event, target, screen))

    async def _settle_then_release(self, event: events.Key | events.Paste, target: MessagePump, screen) -> None:
        try:
            await asyncio.wait_for(self._settle(event, target, screen), SETTLE_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a timeout, a widget gone: never keep the keyboard waiting
            pass
        self._key_in_flight = False
        if self._held_keys:
            self.call_next(self._next_key)

    async def _settle(self, event: events.Key | events.Paste, target: MessagePump, screen) -> None:
        # Up the way the key bubbles, until a node stops it (a field took the letter): each node's queue is
        # waited on after the node below has handled the key, so the key is already in it.
        node: MessagePump | None = target
        while node is not None and not event._stop_propagation:  # Textual has no public name for it
            await _processed(node)
            node = node._parent
        await _processed(self)  # a focus() asked for on the way is run from the app's queue
        # A screen opened or closed: until it has mounted and its first field has focus.
        for _ in range(SETTLE_ROUNDS):
            if self.screen is screen and (self.focused is not None or not screen.focus_chain):
                return
            screen, focused = self.screen, self.focused
            await asyncio.gather(*(_processed(node) for node in [self, *screen.walk_children(with_self=True)]))
            if self.screen is screen and self.focused is focused and screen.is_mounted:
                return


async def _processed(node: MessagePump) -> None:
    """Once the node has handled every message queued before now (at once if it has stopped)."""
    done = asyncio.Event()
    if node.call_later(done.set):
        await done.wait()
