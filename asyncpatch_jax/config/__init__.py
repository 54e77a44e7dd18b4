"""The configuration: defaults of every key, saved config.json files, validation, and the key descriptions behind --help."""
