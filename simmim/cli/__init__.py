"""The command lines: recipes (one loader, one schema, one set of checks) and runs (run folders, resume, errors)."""
