"""Code both sides of EdgeSpec use: protocol stubs, the token tree, fingerprints, metrics."""
