-- What the relay needs beside the log's own (tx_id, global_position) order.

-- Where the relay has published up to, per destination topic. Written only
-- after Kafka acknowledged every message up to this cursor, so a crash means
-- publishing again from here (at least once), never skipping.
CREATE TABLE relay_checkpoints
(
    topic           text        PRIMARY KEY,
    tx_id           xid8        NOT NULL,
    global_position bigint      NOT NULL,
    relay           text        NOT NULL, -- the process that wrote it
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Wakes the relay when events commit (notifications are delivered at commit),
-- so its latency is milliseconds rather than a poll interval. One per
-- statement, and Postgres folds identical ones of a transaction together.
CREATE FUNCTION events_wake_relay() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    PERFORM pg_notify('events_committed', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER events_wake_relay
    AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_wake_relay();
