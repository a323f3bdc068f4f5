"""Plots drawn from result tables, declared as config (`experiment.plots`), never by hand.

A plot spec maps these keys; only `table`, `x` and `y` are required:

- `table`: the name of one of the experiment's tables (`experiment.tables`)
- `x`, `y`: column names; rows where either is empty are left out
- `kind`: `line` (the default), `bar` or `scatter`. Bars, and a non-numeric x, put x's values
  on the axis as categories in natural order (gpt3-7b before gpt3-13b, 2b before 16b)
- `hue`: a column; one colour (and legend entry) per value
- `facet`: a column; one subplot per value
- `where`: a pandas query that selects the rows, as a table spec's `where`
- `logx`, `logy`: log axes (true/false); logx needs a numeric x and no bars
- `hline`: the y of a dashed reference line (1 for a speedup, 0 for an error)
- `title`, `xlabel`, `ylabel`: text; by default the plot's name and the column names

A line or bar plot takes at most one row per (facet, hue, x): a second one means the spec lacks
a `where`, a `hue` or a `facet`, and an error says so instead of drawing a zigzag or hiding a
row behind a bar. A table without rows (a smaller scale runs fewer runs, and such a table also
lacks its metric columns) or a selection without rows still gives a figure, one that says so,
so that every declared plot exists at every scale.
"""

from __future__ import annotations

import io
import math
import numbers
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, NullLocator

from gemvlab.errors import GemvlabError
from gemvlab.files import atomic_write_bytes
from gemvlab.results.tables import format_number, read_tables

KINDS = ("line", "bar", "scatter")
_TEXT_KEYS = ("table", "x", "y", "kind", "hue", "facet", "where", "title", "xlabel", "ylabel")
_FLAG_KEYS = ("logx", "logy")
KEYS = (*_TEXT_KEYS, *_FLAG_KEYS, "hline")
_REQUIRED = ("table", "x", "y")
DPI = 100
_PANEL = (4.2, 3.4)  # inches per facet subplot
_SINGLE = (6.4, 4.0)  # inches of a plot without facets
_LEGEND_W = 1.5  # inches the legend adds beside facets
_MARKERS = "osD^vPX*"
_NO_ROWS = "no rows at this scale"
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def check_spec(name: str, spec: Any) -> dict[str, Any]:
    """Refuse unknown keys and wrong types, so a typo fails instead of dropping an option."""
    if not name or "/" in name or name.startswith("."):
        raise GemvlabError(f"plot name {name!r} must be a plain file name")
    if not isinstance(spec, Mapping):
        raise GemvlabError(f"plot {name!r} must be a mapping with keys from {list(KEYS)}")
    unknown = sorted(str(key) for key in spec if key not in KEYS)
    if unknown:
        raise GemvlabError(f"plot {name!r}: unknown key(s) {unknown} (known: {list(KEYS)})")
    missing = [key for key in _REQUIRED if spec.get(key) is None]
    if missing:
        raise GemvlabError(f"plot {name!r}: key(s) {missing} are required")
    for key in _TEXT_KEYS:
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise GemvlabError(f"plot {name!r}: key {key!r} must be a string")
    for key in _FLAG_KEYS:
        if not isinstance(spec.get(key, False), bool):
            raise GemvlabError(f"plot {name!r}: key {key!r} must be true or false")
    hline = spec.get("hline")
    if hline is not None and (isinstance(hline, bool) or not isinstance(hline, int | float)):
        raise GemvlabError(f"plot {name!r}: key 'hline' must be a number")
    checked = {"kind": "line", **spec}
    if checked["kind"] not in KINDS:
        raise GemvlabError(f"plot {name!r}: kind {checked['kind']!r} is not one of {KINDS}")
    if checked.get("logx") and checked["kind"] == "bar":
        raise GemvlabError(f"plot {name!r}: logx does not apply to bars (x is categorical)")
    return checked


def select_rows(name: str, spec: Mapping[str, Any], tables: Mapping[str, pd.DataFrame]
                ) -> pd.DataFrame:
    """The rows to draw; the columns are checked whenever the table has rows to check."""
    table = spec["table"]
    if table not in tables:
        raise GemvlabError(f"plot {name!r}: table {table!r} is not among the tables "
                           f"{sorted(tables)}")
    df = tables[table]
    if df.empty:
        return df
    used = [spec[key] for key in ("x", "y", "hue", "facet") if spec.get(key)]
    for column in used:
        if column not in df.columns:
            raise GemvlabError(f"plot {name!r}: column {column!r} is not in table {table!r} "
                               f"(columns: {list(df.columns)})")
    if spec.get("where"):
        try:
            df = df.query(spec["where"], engine="python")
        except Exception as err:  # pandas raises many types for a bad query; all are spec errors
            raise GemvlabError(f"plot {name!r}: where {spec['where']!r} does not apply to "
                               f"table {table!r} (columns: {list(df.columns)}): {err}") from err
    df = df.dropna(subset=[spec["x"], spec["y"]]).reset_index(drop=True)
    _check_one_row_per_point(name, spec, df)
    return df


def _check_one_row_per_point(name: str, spec: Mapping[str, Any], df: pd.DataFrame) -> None:
    """Two rows on one point of a line or bar would be drawn as nonsense: refuse them."""
    if spec["kind"] == "scatter" or df.empty:
        return
    keys = [spec[key] for key in ("facet", "hue", "x") if spec.get(key)]
    shared = df.duplicated(keys, keep=False)
    if shared.any():
        point = df.loc[shared, keys].iloc[0].to_dict()
        raise GemvlabError(f"plot {name!r}: {int(shared.sum())} rows share one point, e.g. "
                           f"{point}: narrow its `where` or add a `hue` or a `facet`")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def natural_key(value: Any) -> tuple:
    """Order numbers by value, also inside text: gpt3-7b < gpt3-13b, 2b < 16b."""
    if _is_number(value):
        return ((0, float(value), ""),)
    parts = re.split(f"({_NUMBER.pattern})", str(value))
    return tuple((0, float(p), "") if _NUMBER.fullmatch(p) else (1, 0.0, p) for p in parts if p)


def _label(value: Any) -> str:
    """A value as a tick or legend label: 2048 rather than 2048.0."""
    return format_number(value) if _is_number(value) else str(value)


def _ordered(values: pd.Series) -> list[Any]:
    return sorted(values.unique(), key=natural_key)


def _is_numeric(values: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)


def draw(name: str, spec: Any, tables: Mapping[str, pd.DataFrame]) -> Figure:
    """Draw one declared plot from the experiment's tables (name -> DataFrame)."""
    spec = check_spec(name, spec)
    df = select_rows(name, spec, tables)
    if df.empty:
        return _no_rows_figure(name, spec)
    categorical = spec["kind"] == "bar" or not _is_numeric(df[spec["x"]])
    if spec.get("logx") and categorical:
        raise GemvlabError(f"plot {name!r}: logx needs a numeric x, and {spec['x']!r} is not")
    hues = _ordered(df[spec["hue"]]) if spec.get("hue") else [None]
    facets = _ordered(df[spec["facet"]]) if spec.get("facet") else [None]
    fig, axes = _figure(len(facets), legend=bool(spec.get("hue")))
    for ax, facet in zip(axes, facets, strict=False):
        rows = df if facet is None else df[df[spec["facet"]] == facet]
        _draw_axes(ax, spec, rows, hues, categorical)
        if facet is not None:
            ax.set_title(f"{spec['facet']} = {_label(facet)}", fontsize="medium")
    for ax in axes[len(facets):]:
        ax.remove()
    if spec.get("hue"):
        fig.legend(handles=_legend_handles(spec, hues), title=spec["hue"],
                   loc="outside right center", fontsize="small")
    fig.suptitle(spec.get("title") or name, wrap=True)
    return fig


def _figure(panels: int, legend: bool) -> tuple[Figure, list[Any]]:
    """A grid of subplots: up to three across, two by two for four."""
    ncols = panels if panels <= 3 else math.ceil(math.sqrt(panels))
    nrows = math.ceil(panels / ncols)
    if panels == 1:
        size = _SINGLE
    else:
        size = (_PANEL[0] * ncols + (_LEGEND_W if legend else 0.0), _PANEL[1] * nrows + 0.5)
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    return fig, list(fig.subplots(nrows, ncols, squeeze=False).ravel())


def _draw_axes(ax: Any, spec: Mapping[str, Any], rows: pd.DataFrame, hues: list[Any],
               categorical: bool) -> None:
    """One subplot: one series per hue value, colours fixed across subplots by the hue's order."""
    x, y = spec["x"], spec["y"]
    cats = _ordered(rows[x]) if categorical else []
    index = {value: i for i, value in enumerate(cats)}
    offsets, width = _bar_slots(spec, rows, hues) if spec["kind"] == "bar" else (None, 0.0)
    for i, hue in enumerate(hues):
        part = rows if hue is None else rows[rows[spec["hue"]] == hue]
        if part.empty:
            continue
        part = part.sort_values(x, key=lambda col: col.map(natural_key))
        xs = part[x].map(index) if categorical else part[x]
        style = {"color": f"C{i % 10}"}
        if spec["kind"] == "bar":
            ax.bar(xs + offsets[part.index], part[y], width, **style)
        elif spec["kind"] == "scatter":
            ax.scatter(xs, part[y], marker=_MARKERS[i % len(_MARKERS)], **style)
        else:
            ax.plot(xs, part[y], marker=_MARKERS[i % len(_MARKERS)], **style)
    if categorical:
        labels = [_label(value) for value in cats]
        long = sum(map(len, labels)) > 40 or max(map(len, labels)) > 12
        ax.set_xticks(range(len(cats)), labels, rotation=30 if long else 0,
                      ha="right" if long else "center")
    _scale_axes(ax, spec, rows)
    if spec.get("hline") is not None:
        ax.axhline(spec["hline"], color="0.4", linestyle="--", linewidth=1)
    _label_axes(ax, spec)
    ax.grid(True, axis="y", alpha=0.3)


def _bar_slots(spec: Mapping[str, Any], rows: pd.DataFrame, hues: list[Any]
               ) -> tuple[pd.Series, float]:
    """Each bar's offset from its category: the hues present there side by side, centred."""
    if not spec.get("hue"):
        return pd.Series(0.0, index=rows.index), 0.8
    rank = rows[spec["hue"]].map({hue: i for i, hue in enumerate(hues)})
    slot = rank.groupby(rows[spec["x"]]).rank(method="first") - 1
    count = rows.groupby(spec["x"])[spec["hue"]].transform("size")
    width = 0.8 / count.max()
    return (slot - (count - 1) / 2) * width, width


def _scale_axes(ax: Any, spec: Mapping[str, Any], rows: pd.DataFrame) -> None:
    """Log axes with plain tick labels; on a log x the ticks sit at the values (32 ... 512)."""
    if spec.get("logy"):
        ax.set_yscale("log")
        _plain_log_labels(ax.yaxis, rows[spec["y"]])
        positive = rows.loc[rows[spec["y"]] > 0, spec["y"]]
        if spec["kind"] == "bar" and len(positive):
            ax.set_ylim(bottom=positive.min() / 3)  # else the shortest bar has no height
    if spec.get("logx"):
        ax.set_xscale("log")
        _plain_log_labels(ax.xaxis, rows[spec["x"]])
        values = sorted(rows[spec["x"]].unique())
        if len(values) <= 12:
            ax.set_xticks(values, [_label(value) for value in values])
            ax.xaxis.set_minor_locator(NullLocator())


def _plain_log_labels(axis: Any, values: pd.Series) -> None:
    """200 rather than 2x10^2; minor ticks (2, 5) labelled only when under two decades show."""
    positive = values[values > 0]
    span = math.log10(positive.max() / positive.min()) if len(positive) else 0.0
    axis.set_major_formatter(FuncFormatter(lambda value, _: format_number(value)))
    axis.set_minor_formatter(FuncFormatter(
        lambda value, _: format_number(value) if span < 2 and f"{value:.0e}"[0] in "25" else ""))


def _label_axes(ax: Any, spec: Mapping[str, Any]) -> None:
    """Axis labels on the outer subplots only."""
    subplot = ax.get_subplotspec()
    if subplot.is_last_row():
        ax.set_xlabel(spec.get("xlabel") or spec["x"])
    if subplot.is_first_col():
        ax.set_ylabel(spec.get("ylabel") or spec["y"])


def _legend_handles(spec: Mapping[str, Any], hues: list[Any]) -> list[Any]:
    """One legend entry per hue value, whichever subplots it appears in."""
    handles: list[Any] = []
    for i, hue in enumerate(hues):
        color, label = f"C{i % 10}", _label(hue)
        if spec["kind"] == "bar":
            handles.append(Patch(color=color, label=label))
        else:
            handles.append(Line2D([], [], color=color, marker=_MARKERS[i % len(_MARKERS)],
                                  linestyle="-" if spec["kind"] == "line" else "", label=label))
    return handles


def _no_rows_figure(name: str, spec: Mapping[str, Any]) -> Figure:
    """The figure of a plot whose selection is empty: it exists and says why it is blank."""
    fig, (ax,) = _figure(1, legend=False)
    ax.text(0.5, 0.5, _NO_ROWS, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
    _label_axes(ax, spec)
    fig.suptitle(spec.get("title") or name, wrap=True)
    return fig


def save_png(fig: Figure, path: Path) -> None:
    """Write a PNG atomically, without the Software tag, so equal figures give equal bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    atomic_write_bytes(Path(path), buf.getvalue())


def write_plots(experiment: Mapping[str, Any], out_dir: Path) -> int:
    """Draw each declared plot into <out_dir>/<name>.png; returns how many were drawn.

    The plots read the declared tables back from their CSVs, as the claims do: in memory a
    pattern's placeholders (context, batch) are still strings, in the CSV they are numbers.
    """
    specs = experiment.get("plots")
    if not specs:
        return 0
    declared = set(experiment["tables"])
    tables = {name: df for name, df in read_tables(out_dir).items() if name in declared}
    for name, spec in specs.items():
        save_png(draw(str(name), spec, tables), out_dir / f"{name}.png")
    return len(specs)
