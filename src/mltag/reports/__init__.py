"""The HTML reports, rendered from the Jinja2 templates beside this file."""
