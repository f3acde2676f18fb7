"""The HTML reports stay bounded at any dataset size."""

from __future__ import annotations


def test_the_data_report_lists_at_most_500_rejected_files_and_says_how_many_more():
    from mltag.steps.prepare.report import HTML_MAX_ROWS, report_html

    rejected = [{"path": f"images/bad-{i:06d}.jpg", "source": f"labels.csv:{i + 2}", "reason": "truncated"}
                for i in range(20000)]
    report = {"source": "labels.csv", "format": "csv", "labels": ["a", "b"], "cooccurrence": [[3, 1], [1, 2]], "rejected": rejected, "exact_duplicates": [],
              "near_duplicates_across_splits": [], "stratification_repairs": [], "images_listed": 20004,
              "images_used": 4, "images_per_split": {"train": 2, "val": 1, "test": 1},
              "examples_per_label": {}, "label_cardinality": {"mean": 1.0, "histogram": {}}, "dataset_version": None}
    html = report_html(report)
    assert html.count("bad-0") == HTML_MAX_ROWS == 500
    assert "images/bad-000499.jpg" in html and "images/bad-000500.jpg" not in html
    assert "and 19500 more: every one is in report.json." in html
    assert len(html) < 1_000_000
