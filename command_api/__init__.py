"""The command side of HelixNet Core: validates commands and appends events."""
