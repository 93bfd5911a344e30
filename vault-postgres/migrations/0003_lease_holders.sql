-- Lease holders: the replicas holding budget leases, so that when one dies
-- without a word (`kill -9`, a lost host) the others close its leases
-- within seconds instead of waiting for them to expire
-- (docs/replicas.md#when-a-replica-dies). Numbered 3: migration 2 is the
-- audit chain's.

-- Milliseconds since the unix epoch by the database's clock: heartbeats
-- are compared on one clock, whatever the replicas' hosts say.
CREATE FUNCTION vg_now_ms() RETURNS BIGINT
    LANGUAGE sql VOLATILE PARALLEL SAFE
    AS $$ SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT $$;

-- One row per live holder (a `LeasedStore`, one per replica process),
-- refreshed by its maintenance heartbeat about every second.
CREATE TABLE lease_holders (
    id           TEXT PRIMARY KEY,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);
CREATE INDEX lease_holders_by_heartbeat ON lease_holders (heartbeat_at);

-- A lease is a reservation tagged with its holder. `cover` is the most its
-- calls may have charged, spent and held together since it was taken, as
-- the holder last recorded (it admits no call beyond it); `charged` is
-- what partial settlements charged so far. A dead holder's lease is
-- settled at LEAST(amount, cover - charged); the rest is released.
ALTER TABLE reservations
    ADD COLUMN holder  TEXT,
    ADD COLUMN cover   BIGINT CHECK (cover >= 0),
    ADD COLUMN charged BIGINT NOT NULL DEFAULT 0 CHECK (charged >= 0);
CREATE INDEX reservations_by_holder ON reservations (holder) WHERE holder IS NOT NULL;
