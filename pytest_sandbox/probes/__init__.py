"""Stage 3: the stdlib probe runner and the send/receive code of each category."""
