"""asyncio transports: listeners, sessions, limits and timeouts. Thin: the cores decide."""
