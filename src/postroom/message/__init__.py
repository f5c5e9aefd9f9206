"""Message-level definitions shared by the SMTP core, the router and delivery."""
