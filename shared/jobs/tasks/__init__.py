"""Task types. Every module here is imported by `load_catalog()`."""
