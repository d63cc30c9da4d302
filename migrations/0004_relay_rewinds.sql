-- `command-api republish` moves a topic's checkpoint back, and counts it
-- here. The active relay holds its cursor in memory and only ever saves it
-- forward, so it saves on the condition that this count is still the one it
-- loaded; when it is not, the relay starts over from the stored checkpoint.
-- The one publisher of the topic then sends everything again in commit
-- order, and a crash meanwhile resumes from the moved-back checkpoint.
ALTER TABLE relay_checkpoints
    ADD COLUMN rewinds bigint NOT NULL DEFAULT 0 CHECK (rewinds >= 0);
