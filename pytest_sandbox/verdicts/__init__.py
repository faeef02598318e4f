"""Stage 4: one Judgement type and the pure judges (BLOCKED / ALLOWED / INDETERMINATE)."""
