"""Stage 5: categories, evidence records, the scorecard, host facts and the report writers."""
