"""The network lab: a private namespace with a catch-all canary, public origins and DNS."""
