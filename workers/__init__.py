"""shapstream TreeSHAP workers."""
