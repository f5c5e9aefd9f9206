"""Durable acceptance (the spool), the queue of messages still to deliver, and its runner."""
