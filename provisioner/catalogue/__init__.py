"""The image catalogue: schema (model), loading and queries (store), atomic edits (edit)."""
