"""Reports: results store -> tables, figures, Markdown and HTML. Reads only results.sqlite.

* `build_report(run_dirs, out_dir=None)` writes report.md, report.html and figures/ (`learnbench report`).
* `show_table(trials)` is the terminal summary of `learnbench show`.
* `readme_section(run_dirs)` and `update_readme(path, text)` regenerate the README's results section.
"""

from .build import build_report
from .summary import readme_section, show_table, update_readme

__all__ = ["build_report", "readme_section", "show_table", "update_readme"]
