"""Modal screens: help, one request's text, the load generator's settings."""
