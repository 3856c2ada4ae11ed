"""Dovecot IMAP fixtures (see MAILSTACK.md)."""
