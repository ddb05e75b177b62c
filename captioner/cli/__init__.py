"""`captioner` commands: argument parsing and thin command functions over the packages."""
