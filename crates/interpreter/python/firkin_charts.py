"""Charts for E2B's code interpreter SDKs: a matplotlib figure's data as an `e2b/chart` result.

firkin-interpreter loads this into every Python kernel (`register`). It adds a display
formatter for matplotlib figures next to IPython's PNG one, so a displayed figure reaches the
SDK as `Result.png` and `Result.chart`, the schema of the SDKs' `charts.py`: `type`, `title`,
`elements`, plus labels, units, ticks and scales for charts with axes. A figure whose data
cannot be read gives no chart rather than a failed execution: the formatter never raises.
"""

import datetime
import math
import re

MIME = "e2b/chart"

# "Revenue (USD)" or "Temperature [°C]": the unit is the last bracketed part of a label.
_UNIT = re.compile(r"^(?P<label>.*?)\s*[\(\[](?P<unit>[^\(\)\[\]]+)[\)\]]\s*$")


def register(shell):
    """Adds the formatter to `shell` (an IPython InteractiveShell)."""
    from IPython.core.formatters import BaseFormatter
    from traitlets import Unicode

    class ChartFormatter(BaseFormatter):
        format_type = Unicode(MIME)
        _return_type = dict
        print_method = "_repr_e2b_chart_"

    formatters = shell.display_formatter.formatters
    if MIME not in formatters:
        formatters[MIME] = ChartFormatter(parent=shell.display_formatter)
    # `format` only runs the types listed here, fixed when the shell was made.
    active = shell.display_formatter.active_types
    if MIME not in active:
        shell.display_formatter.active_types = [*active, MIME]
    # By name, so matplotlib is imported only when user code imports it. On `FigureBase`:
    # IPython's `select_figure_formats`, which the inline backend runs when pyplot is imported
    # (and users run through `set_matplotlib_formats`), drops every formatter's `Figure`
    # printer; the base class's stays and the type lookup walks the MRO to it.
    formatters[MIME].for_type_by_name("matplotlib.figure", "FigureBase", figure_chart)
    formatters[MIME].for_type_by_name("matplotlib.figure", "Figure", figure_chart)


def figure_chart(figure):
    """The chart of a figure: one chart for one plot, a `superchart` for several."""
    try:
        axes = [a for a in figure.get_axes() if a.get_visible() and not _is_colorbar(a)]
        charts = [c for c in (_axes_chart(a) for a in axes) if c is not None]
    except Exception:  # noqa: BLE001 - a chart is extra; the PNG result must still arrive
        return None
    if not charts:
        return None
    if len(charts) == 1:
        return charts[0]
    title = figure._suptitle.get_text() if getattr(figure, "_suptitle", None) else None
    return {"type": "superchart", "title": title or None, "elements": charts}


def _is_colorbar(axes):
    return hasattr(axes, "_colorbar") or axes.get_label() == "<colorbar>"


def _axes_chart(axes):
    from matplotlib.container import BarContainer
    from matplotlib.patches import Wedge

    wedges = [p for p in axes.patches if isinstance(p, Wedge)]
    if wedges:
        return _pie(axes, wedges)
    bars = [c for c in axes.containers if isinstance(c, BarContainer)]
    if bars:
        return _bar(axes, bars)
    points = _point_sets(axes)
    if points:
        kind = "line" if any(k == "line" for k, _ in points) else "scatter"
        return dict(
            _two_d(axes, kind),
            **_ticks(axes),
            elements=[e for _, e in points],
        )
    return None


def _pie(axes, wedges):
    return {
        "type": "pie",
        "title": _text(axes.get_title()),
        "elements": [
            {
                "label": _public_label(w.get_label()),
                "angle": _number(abs(w.theta2 - w.theta1)),
                "radius": _number(w.r),
            }
            for w in wedges
        ],
    }


def _bar(axes, containers):
    elements = []
    for container in containers:
        horizontal = getattr(container, "orientation", None) == "horizontal"
        group = _public_label(container.get_label())
        ticks = axes.get_yaxis() if horizontal else axes.get_xaxis()
        names = _tick_names(axes, ticks)
        for patch in container.patches:
            if horizontal:
                at, value = patch.get_y() + patch.get_height() / 2, patch.get_width()
            else:
                at, value = patch.get_x() + patch.get_width() / 2, patch.get_height()
            elements.append(
                {"label": names.get(round(at, 6), str(_axis_value(ticks, at))),
                 "group": group, "value": _number(value)}
            )
    return dict(_two_d(axes, "bar"), elements=elements)


def _point_sets(axes):
    sets = []
    for line in axes.get_lines():
        if not line.get_visible():
            continue
        xs, ys = line.get_xdata(orig=False), line.get_ydata(orig=False)
        sets.append(("line", _points(axes, line.get_label(), zip(xs, ys))))
    from matplotlib.collections import PathCollection

    for collection in axes.collections:
        if isinstance(collection, PathCollection) and collection.get_visible():
            offsets = collection.get_offsets()
            sets.append(("scatter", _points(axes, collection.get_label(), offsets)))
    return sets


def _points(axes, label, pairs):
    return {
        "label": _public_label(label),
        "points": [
            [_axis_value(axes.xaxis, x), _axis_value(axes.yaxis, y)] for x, y in pairs
        ],
    }


def _two_d(axes, kind):
    x_label, x_unit = _label_and_unit(axes.get_xlabel())
    y_label, y_unit = _label_and_unit(axes.get_ylabel())
    return {
        "type": kind,
        "title": _text(axes.get_title()),
        "x_label": x_label,
        "y_label": y_label,
        "x_unit": x_unit,
        "y_unit": y_unit,
    }


def _ticks(axes):
    _ensure_drawn(axes)
    out = {}
    for name, axis in (("x", axes.xaxis), ("y", axes.yaxis)):
        # matplotlib keeps a tick either side of the view for panning; not on the plot.
        low, high = sorted(axis.get_view_interval())
        slack = (high - low) * 1e-9
        shown = [
            (loc, label)
            for loc, label in zip(axis.get_ticklocs(), axis.get_ticklabels())
            if low - slack <= loc <= high + slack
        ]
        out[f"{name}_ticks"] = [_axis_value(axis, loc) for loc, _ in shown]
        out[f"{name}_tick_labels"] = [_tick_text(label.get_text()) for _, label in shown]
        out[f"{name}_scale"] = _scale(axis)
    return out


_MATHDEFAULT = re.compile(r"^\$\\mathdefault\{(.*)\}\$$")


def _tick_text(text):
    # What the plot shows, as plain text: "−0.5" with an ASCII minus, "10^{3}" not mathtext.
    match = _MATHDEFAULT.match(text)
    if match is not None:
        text = match.group(1)
    return text.replace("\u2212", "-")


def _ensure_drawn(axes):
    # Tick labels are only filled in by a draw; the PNG formatter usually drew the figure
    # already, but a chart asked for on its own has not been.
    labels = axes.xaxis.get_ticklabels() + axes.yaxis.get_ticklabels()
    if labels and not any(t.get_text() for t in labels):
        axes.figure.canvas.draw()


def _scale(axis):
    if _is_dates(axis):
        return "datetime"
    if _categories(axis) is not None:
        return "categorical"
    return axis.get_scale()


def _is_dates(axis):
    from matplotlib import dates

    # The converter classes differ between matplotlib releases; take whichever exist.
    kinds = tuple(
        kind
        for kind in (
            getattr(dates, name, None)
            for name in ("DateConverter", "_SwitchableDateConverter", "ConciseDateConverter")
        )
        if isinstance(kind, type)
    )
    converter = axis.get_converter() if hasattr(axis, "get_converter") else axis.converter
    return bool(kinds) and isinstance(converter, kinds)


def _categories(axis):
    """Value → category name for a categorical axis, else None."""
    units = axis.get_units() if hasattr(axis, "get_units") else axis.units
    mapping = getattr(units, "_mapping", None)
    if mapping is None:
        return None
    return {float(v): str(k) for k, v in mapping.items()}


def _axis_value(axis, value):
    """A data coordinate as the user gave it: a date as ISO 8601, a category by name."""
    number = _number(value)
    if number is None:
        return None
    if _is_dates(axis):
        from matplotlib.dates import num2date

        return num2date(number).astimezone(datetime.timezone.utc).isoformat()
    categories = _categories(axis)
    if categories is not None and number in categories:
        return categories[number]
    return number


def _tick_names(axes, axis):
    _ensure_drawn(axes)
    names = {}
    for loc, label in zip(axis.get_ticklocs(), axis.get_ticklabels()):
        if label.get_text():
            names[round(float(loc), 6)] = label.get_text()
    return names


def _number(value):
    try:
        number = float(value)
    except (TypeError, ValueError):
        # Already a category name or a date the converter left alone.
        return value if isinstance(value, str) else None
    # JSON has no NaN or infinity; the SDK's parser would reject the whole line. Twelve
    # significant digits drop float noise (1.2000000000000002) a reader did not write.
    return float(f"{number:.12g}") if math.isfinite(number) else None


def _label_and_unit(text):
    text = _text(text)
    if text is None:
        return None, None
    match = _UNIT.match(text)
    if match is None or not match.group("label"):
        return text, None
    return match.group("label"), match.group("unit").strip()


def _public_label(label):
    # matplotlib names unlabelled artists "_child3", "_nolegend_": not the user's words.
    label = _text(label)
    return "" if label is None or label.startswith("_") else label


def _text(text):
    return str(text) if text else None
