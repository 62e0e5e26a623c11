"""pytaskqml: ordered, crash-safe task orchestration over raw TCP."""
