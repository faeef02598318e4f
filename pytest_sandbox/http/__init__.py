"""HTTP/1.1 as pure functions over bytes (framing, fields, responses) and the async readers."""
