"""The HTML reports (prepare's data report, evaluate's error analysis) from Jinja2 templates.

Templates live in ``mltag/reports/templates`` and share ``base.html.j2``; every value is
autoescaped. Figures and thumbnails are inlined as ``data:`` URIs, so each report is
one self-contained file that MLflow and a Kubeflow HTML artifact can show as is.
"""

from __future__ import annotations

import base64
import functools
import io
from pathlib import Path


@functools.cache
def _environment():
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("mltag.reports", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


def render(template: str, **context) -> str:
    """Render ``mltag/reports/templates/<template>`` with ``context``."""
    return _environment().get_template(template).render(**context)


def script_json(obj) -> str:
    """JSON to embed in a ``<script type="application/json">``: ``<``, ``>`` and ``&`` escaped, so no value
    (an image path, a label) can close the element or open another."""
    import json

    return json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def new_axes(figsize: tuple[float, float]):
    """A figure and its axes drawn by the Agg backend directly: no pyplot (half a second to import),
    no global figure registry to close."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def figure_png(fig, dpi: int = 90) -> bytes:
    """A figure from ``new_axes`` as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def thumbnail(path: Path, size: int = 96) -> str:
    """A JPEG thumbnail as a data URI; "" when the image cannot be read."""
    from PIL import Image

    from mltag.data.images import ALLOWED_FORMATS, to_rgb

    try:
        with Image.open(path, formats=ALLOWED_FORMATS) as im:
            im = to_rgb(im)
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
        return data_uri(buf.getvalue(), "image/jpeg")
    except OSError:
        return ""
