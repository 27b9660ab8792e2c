"""What this process knows of each workspace, kept by version (issue 16).

Every change to a workspace bumps its `version` in the change's own transaction
(`fewshot.service.store.operations`), so the version names the workspace's whole state: its record
(name, key hash, settings, model) and its classes. A request reads the version (one indexed read),
and the record is read again only when the version moved; the recogniser is handed that record and
syncs its class memory to the record's version without another read (`Recogniser.classify(...,
current=record)`). A change committed by another process sharing the store (a replica on the same
PostgreSQL database, or a second process on the SQLite file) is therefore seen by the next request
here. The version is read even while a PostgreSQL listener is up (`fewshot.service.notify`): a
notification may arrive after the client's next request, and that request must see the change.
"""

from __future__ import annotations

import threading

from fewshot.service.store import Store, WorkspaceRecord


class WorkspaceViews:
    """The newest record seen of each workspace, keyed by its version; at most `max_workspaces`
    (past that the oldest is dropped: it is read again when next used)."""

    def __init__(self, store: Store, max_workspaces: int = 100_000) -> None:
        self.store, self.max_workspaces = store, max_workspaces
        self._records: dict[str, WorkspaceRecord] = {}
        self._lock = threading.Lock()

    def current(self, workspace_id: str) -> WorkspaceRecord | None:
        """The workspace as it is now (None: it does not exist): one version read, and the record
        read only when the version moved since it was last read here."""
        version = self.store.workspace_version(workspace_id)
        cached = self._records.get(workspace_id)
        if version is not None and cached is not None and cached.version == version:
            return cached
        record = None if version is None else self.store.get_workspace(workspace_id)
        with self._lock:
            if record is None:
                self._records.pop(workspace_id, None)
                return None
            if workspace_id not in self._records and len(self._records) >= self.max_workspaces:
                self._records.pop(next(iter(self._records)))
            self._records[workspace_id] = record
        return record
