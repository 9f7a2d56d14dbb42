"""mmkit's own pieces, registered through the same hooks third-party plugins use."""
