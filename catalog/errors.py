class CatalogError(Exception):
    """A problem with the database or the catalog files, worded for the user."""
