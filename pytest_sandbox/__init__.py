"""pytest-sandbox: prove a Linux sandbox blocks what it claims to block."""
