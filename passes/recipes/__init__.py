"""Built-in recipes (TOML), a package so that the files ship with the wheel."""
