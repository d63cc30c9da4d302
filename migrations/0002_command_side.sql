-- What the command side needs beside the log.

-- Locks the given streams for the rest of the transaction, always in
-- ascending key order, so that two commands wanting overlapping seats queue
-- instead of deadlocking. Keys are 64-bit hashes of "type:id"; a collision
-- only makes two unrelated streams queue behind each other.
CREATE FUNCTION lock_streams(keys bigint[]) RETURNS void
    LANGUAGE plpgsql AS
$$
DECLARE
    k bigint;
BEGIN
    FOR k IN SELECT DISTINCT x FROM unnest(keys) AS x ORDER BY x
        LOOP
            PERFORM pg_advisory_xact_lock(k);
        END LOOP;
END
$$;

-- Holds not yet confirmed, cancelled or expired, for the sweeper. Written in
-- the same transaction as the booking's events, so it never disagrees with
-- the log.
CREATE TABLE pending_holds
(
    booking_id uuid PRIMARY KEY,
    show_id    uuid        NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX pending_holds_by_expiry ON pending_holds (expires_at);

-- Idempotency-Key: the first answer to a (route, key), stored in the same
-- transaction as the events it describes. A retry arriving while the first
-- request is in flight waits on this row's uncommitted insert.
CREATE TABLE idempotency_keys
(
    route        text        NOT NULL,
    key          text        NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    request      bytea       NOT NULL, -- the canonical request, compared exactly
    status       smallint    NOT NULL,
    headers      jsonb       NOT NULL,
    body         bytea       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (route, key)
);
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
