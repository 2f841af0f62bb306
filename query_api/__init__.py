"""The query side of HelixNet Core: serves read tables and the audit trail."""
