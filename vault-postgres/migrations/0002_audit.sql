-- vaultgate PostgreSQL schema, version 2: the audit chain, shared by every
-- replica (docs/replicas.md#the-audit-chain). Never edit a released
-- migration, add the next file instead.
--
-- `entry` holds the exact bytes of the entry as the file format writes
-- them (one JSON line without its newline, `hash` included), so a chain
-- copied from a data directory's audit.jsonl verifies identically and
-- verifying needs no re-serialisation. `seq`, `prev`, `hash` and
-- `project` repeat fields of `entry` for ordering, filtering and
-- cross-checks; verify compares them with the entry's own.
CREATE TABLE audit_entries (
    seq     BIGINT PRIMARY KEY CHECK (seq >= 1),
    project TEXT,
    prev    TEXT NOT NULL,
    hash    TEXT NOT NULL,
    entry   TEXT NOT NULL
);
CREATE INDEX audit_entries_by_project ON audit_entries (project, seq);

-- The chain head: the last entry's seq and hash. An append locks this one
-- row (`SELECT … FOR UPDATE`) so appends from any number of replicas are
-- serialised, and verify compares it with the last entry (entries removed
-- from the end are found).
CREATE TABLE audit_head (
    id   BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),
    seq  BIGINT NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_head (seq, hash)
    VALUES (0, '0000000000000000000000000000000000000000000000000000000000000000');
