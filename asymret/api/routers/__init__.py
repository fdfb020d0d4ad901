"""One router per resource: galleries, items, search; ops (health, readiness, metrics); the web page."""
