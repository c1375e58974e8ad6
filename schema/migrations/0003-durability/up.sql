-- Version 3.0.0:
-- - tuf_repo.time_last_uploaded: when the repository was last uploaded
--   (inserted, re-uploaded or unpruned); the pruner ranks by it, so a
--   re-uploaded old repository counts as new.
-- - inv_sled.ledger_damage: damaged config ledger copies a sled reported.

ALTER TABLE tuf_repo ADD COLUMN time_last_uploaded TIMESTAMPTZ;
UPDATE tuf_repo SET time_last_uploaded = time_created;
ALTER TABLE tuf_repo ALTER COLUMN time_last_uploaded SET NOT NULL;
CREATE INDEX tuf_repo_by_time_last_uploaded ON tuf_repo (time_last_uploaded, id);

ALTER TABLE inv_sled ADD COLUMN ledger_damage TEXT;
