-- Dashboard sessions, shared by every replica so a browser may land on any
-- of them (docs/dashboard.md#sessions): stored under the SHA-256 of the
-- cookie's value, holding the hash of the key they were opened with.
CREATE TABLE ui_sessions (
    id        TEXT PRIMARY KEY,
    key_hash  TEXT NOT NULL,
    csrf      TEXT NOT NULL,
    project   TEXT,
    created   BIGINT NOT NULL,
    last_seen BIGINT NOT NULL
);
CREATE INDEX ui_sessions_by_last_seen ON ui_sessions (last_seen);

-- Failed sign-ins per client address in one-minute windows, counted across
-- replicas (ten a minute in all, not ten on each).
CREATE TABLE ui_sign_in_failures (
    client       TEXT PRIMARY KEY,
    window_start BIGINT NOT NULL,
    failures     INTEGER NOT NULL
);
