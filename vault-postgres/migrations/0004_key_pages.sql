-- The key list's pages: newest first with the id breaking ties, per project
-- and across projects (docs/dashboard.md#api-keys). They extend the indexes
-- `list_keys` walks (ordered by `seq`), which stay.
CREATE INDEX keys_by_project_newest ON keys (project, created_at, id);
CREATE INDEX keys_by_created_newest ON keys (created_at, id);
