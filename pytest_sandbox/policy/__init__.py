"""Stage 1, what is enforced: the policy model, its TOML and OCI readers, the bundled policies."""
