"""Accounts (``--auth accounts``): users, groups, tokens, sessions, usage, in SQLite."""
