"""Reports: results store -> tables, figures, Markdown and HTML. Reads only results.sqlite."""
