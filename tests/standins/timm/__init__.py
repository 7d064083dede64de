"""Stand-in for the timm names that mobilesam-mirror imports (tests only)."""
