"""Delivery agents: local Maildir now; remote SMTP with the relay issue."""
