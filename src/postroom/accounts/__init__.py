"""Domains, users and aliases (SQLite), and password hashes (argon2id)."""
