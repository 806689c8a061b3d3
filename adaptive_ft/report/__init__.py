"""The report stage: ``build_report`` turns the given artifacts into report.html / report.md / report.json.

- :mod:`.build`: the entry point and the page's assembly;
- :mod:`.inputs`: which artifacts were given, read and checked;
- :mod:`.page`: the building blocks (tables, figures, sections, the summary) and value formatting;
- :mod:`.sections`: one builder per section;
- :mod:`.render`: HTML, Markdown and JSON;
- :mod:`.plots`: the matplotlib figures.
"""

from adaptive_ft.report.build import build_report
from adaptive_ft.report.inputs import ReportInputs, read_metrics
from adaptive_ft.report.page import ReportResult

__all__ = ["ReportInputs", "ReportResult", "build_report", "read_metrics"]
