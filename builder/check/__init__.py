"""Reading artifacts back: verify, rebuild, audit, sign, summarize."""
