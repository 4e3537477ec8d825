"""Resolution and identity: compose, validate and hash a release spec; pure (no torch)."""
