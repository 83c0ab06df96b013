"""Online migration: the source agent, the migration-mode receiver and their protocol."""
