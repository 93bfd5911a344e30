-- vaultgate PostgreSQL schema, version 1. Applied once, in one transaction,
-- by `PostgresStore::migrate` (`vaultgate migrate`); never edit a released
-- migration, add the next file instead.
--
-- Money is BIGINT micro-dollars (never negative; saturating at 2^63-1),
-- times BIGINT unix milliseconds, hashes lowercase hex, policies, scopes and
-- id lists JSON text: the same encodings as the SQLite store.

-- a + b for b >= 0, saturating at the largest BIGINT instead of failing.
CREATE FUNCTION vg_sat_add(a BIGINT, b BIGINT) RETURNS BIGINT
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT CASE WHEN a > 9223372036854775807 - b THEN 9223372036854775807 ELSE a + b END $$;

CREATE TABLE keys (
    id                   TEXT PRIMARY KEY,
    -- Insertion order, breaking ties between keys created the same millisecond.
    seq                  BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    hash                 TEXT NOT NULL UNIQUE,
    prefix               TEXT NOT NULL,
    previous_hash        TEXT UNIQUE,
    previous_valid_until BIGINT,
    name                 TEXT NOT NULL,
    project              TEXT NOT NULL,
    env                  TEXT NOT NULL,
    scopes               TEXT NOT NULL,
    plan                 TEXT,
    policy               TEXT NOT NULL,
    parent               TEXT REFERENCES keys (id),
    provider_keys        TEXT NOT NULL,
    created_at           BIGINT NOT NULL,
    expires_at           BIGINT,
    last_used_at         BIGINT,
    request_count        BIGINT NOT NULL DEFAULT 0,
    status               TEXT NOT NULL,
    revoked_at           BIGINT,
    spend                BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX keys_by_project ON keys (project, created_at, seq);
CREATE INDEX keys_by_created ON keys (created_at, seq);
CREATE INDEX keys_by_parent ON keys (parent);
CREATE INDEX keys_by_expiry ON keys (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE provider_keys (
    id         TEXT PRIMARY KEY,
    seq        BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    project    TEXT NOT NULL,
    provider   TEXT NOT NULL,
    name       TEXT NOT NULL,
    sealed     BYTEA NOT NULL,
    hint       TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX provider_keys_by_project ON provider_keys (project, created_at, seq);

-- One row per budget line (key, period): what is settled and what is held
-- on it (every open reservation on the line plus every carve-out of a
-- child held on it). A reservation is one UPDATE of this row whose WHERE
-- clause checks that it fits, so racing reservations from any number of
-- connections never pass the limit. `last_grant` is what the latest
-- reservation on the line was granted: the reserving UPDATE sets it next to
-- `reserved` and returns it, computed from the row version it locked.
CREATE TABLE budget_lines (
    key_id       TEXT NOT NULL,
    period_start BIGINT NOT NULL,
    settled      BIGINT NOT NULL DEFAULT 0 CHECK (settled >= 0),
    reserved     BIGINT NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    last_grant   BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, period_start)
);

CREATE TABLE reservations (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_id       TEXT NOT NULL,
    period_start BIGINT NOT NULL,
    amount       BIGINT NOT NULL CHECK (amount >= 0),
    expires_at   BIGINT NOT NULL
);
CREATE INDEX reservations_by_key ON reservations (key_id, amount);
CREATE INDEX reservations_by_expiry ON reservations (expires_at);

-- A child key's carve-out on its parent's line. Open while `chargeable` is
-- NULL; once the child is revoked or expired it is closed: `amount` is then
-- what the child's open calls still hold and `chargeable` what they may
-- still charge the parent (vault-core's store/budget.rs).
CREATE TABLE carve_outs (
    child_id     TEXT PRIMARY KEY REFERENCES keys (id),
    parent_id    TEXT NOT NULL REFERENCES keys (id),
    period_start BIGINT NOT NULL,
    amount       BIGINT NOT NULL CHECK (amount >= 0),
    chargeable   BIGINT CHECK (chargeable >= 0)
);
CREATE INDEX carve_outs_by_parent ON carve_outs (parent_id, amount);

CREATE TABLE usage (
    id                 BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at                 BIGINT NOT NULL,
    key_id             TEXT NOT NULL,
    project            TEXT NOT NULL,
    provider           TEXT,
    endpoint           TEXT NOT NULL,
    model              TEXT,
    tokens_in          BIGINT NOT NULL,
    tokens_out         BIGINT NOT NULL,
    cost               BIGINT NOT NULL,
    latency_ms         BIGINT NOT NULL,
    status             INTEGER NOT NULL,
    denial             TEXT,
    shadow             BOOLEAN NOT NULL,
    cached_tokens      BIGINT NOT NULL DEFAULT 0,
    cache_write_tokens BIGINT NOT NULL DEFAULT 0,
    reasoning_tokens   BIGINT NOT NULL DEFAULT 0,
    audio_tokens       BIGINT NOT NULL DEFAULT 0,
    settlement         TEXT
);
CREATE INDEX usage_by_time ON usage (at, id);
CREATE INDEX usage_by_key ON usage (key_id, at, id);
CREATE INDEX usage_by_project ON usage (project, at, id);

CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
