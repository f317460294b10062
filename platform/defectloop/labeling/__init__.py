"""Label Studio glue: mask codec, label config, event inbox (no Ray, no FastAPI)."""
