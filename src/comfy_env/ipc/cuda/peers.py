"""The CUDA plane's view of its peers: one :class:`PeerState` per link, and the links.

Owns: ``link.state["cuda"]`` of every link the plane met, and the set of those links
(weakly held: a link goes when its worker handle does).  The sending side reads and
writes ``pools_sent``, ``ipc_lent`` and ``verdicts``; the receiving side writes ``told``;
:meth:`Peers.newly_closed` writes ``gone``.
"""
from __future__ import annotations

import weakref

from ..lifetime import Link
from .paths import PeerVerdicts

__all__ = ["PeerState", "Peers"]


class PeerState:
    __slots__ = ("pools_sent", "ipc_lent", "verdicts", "told", "gone", "__weakref__")

    def __init__(self):
        self.pools_sent = set()       # our pool keys whose fd this peer has (sender)
        self.ipc_lent = False         # we lent it a storage by IPC handle: it may keep mappings (sender)
        self.verdicts = PeerVerdicts()  # its first import of each kind from us: ok? (sender)
        self.told = set()             # kinds whose import outcome we reported to it (receiver)
        self.gone = False             # its close was handled (Peers.newly_closed)


class Peers:
    """Every link the plane met, and its :class:`PeerState`."""

    def __init__(self, name):
        self.name = name              # the plane's name: its key in ``link.state``
        self._links = weakref.WeakSet()
        self._closes_seen = 0         # Link.closes when newly_closed last looked

    def of(self, link) -> PeerState:
        st = link.state.get(self.name)
        if st is None:
            st = link.state[self.name] = PeerState()
            self._links.add(link)
            if link.closed:
                self._closes_seen = None    # closed before we met it: the next look finds it
        return st

    def links(self):
        """A snapshot of the links (closed ones included)."""
        return list(self._links)

    def newly_closed(self):
        """Links that closed since the last call.

        Asked before every frame: it looks at the links only when some link of this
        process closed since it last looked (``Link.closes``)."""
        closes = Link.closes
        if closes == self._closes_seen:
            return ()
        self._closes_seen = closes    # read before looking: a close after it is seen next time
        out = []
        for link in list(self._links):
            if link.closed:
                st = link.state.get(self.name)
                if st is not None and not st.gone:
                    st.gone = True
                    out.append(link)
        return out
