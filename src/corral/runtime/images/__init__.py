"""Container images: references, registry client, content-addressed store, unpacking."""
