"""The teacher side: engines (one file per backend), decoding, prompts, parsing and labelling."""
