"""Writing an artifact: weights, config, release files, manifest, provenance."""
