"""Stage 2a: a policy compiled to seccomp BPF, and the launcher that runs commands under it."""
