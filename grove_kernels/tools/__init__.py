"""Command-line tools that maintain the package's measured tables."""
