"""LiveTable: a keyed table drawn with Textual's Line API, built for live updates and fast filtering.

Only the visible lines are rendered (and cached per row), so 10,000 rows filter in milliseconds and a
cell update repaints one line. Rows are patched by key (`upsert`, `remove`); the filter is a predicate
over row keys that the owning screen supplies.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

Cell = str | Text
Key = Hashable


@dataclass(frozen=True)
class Column:
    label: str
    width: int = 0  # fixed width; 0 means flexible
    ratio: int = 1  # share of the leftover width among flexible columns
    min_width: int = 4
    cut_middle: bool = False  # a name whose end tells it apart (…-lora): cut in the middle, not at the end


class LiveTable(ScrollView, can_focus=True):
    DEFAULT_CSS = """
    LiveTable { height: 1fr; background: $surface; }
    LiveTable > .live-table--header { text-style: bold; color: $text-accent; background: $panel; }
    LiveTable > .live-table--cursor { background: $block-cursor-background; color: $block-cursor-foreground; text-style: bold; }
    LiveTable:blur > .live-table--cursor { background: $block-cursor-blurred-background; text-style: none; }
    LiveTable > .live-table--empty { color: $text-muted; }
    """
    COMPONENT_CLASSES = {"live-table--header", "live-table--cursor", "live-table--empty"}
    BINDINGS = [
        Binding("up,k", "cursor(-1)", "Up", show=False),
        Binding("down,j", "cursor(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home,g", "jump(0)", "First", show=False),
        Binding("end,G", "jump(-1)", "Last", show=False),
        Binding("enter", "select", "Select", show=False),
    ]

    cursor = reactive(0, always_update=True, init=False)

    class Highlighted(Message):
        def __init__(self, table: LiveTable, key: Key | None):
            super().__init__()
            self.table, self.key = table, key

        @property
        def control(self) -> LiveTable:
            return self.table

    class Selected(Message):
        def __init__(self, table: LiveTable, key: Key):
            super().__init__()
            self.table, self.key = table, key

        @property
        def control(self) -> LiveTable:
            return self.table

    def __init__(self, columns: Sequence[Column], empty_text: str = "Nothing here.", **kwargs):
        super().__init__(**kwargs)
        self.columns = list(columns)
        self.empty_text = empty_text
        self._rows: dict[Key, tuple[Cell, ...]] = {}
        self._visible: list[Key] = []
        self._position: dict[Key, int] = {}  # key → index in _visible; kept with it by _show()
        self._predicate: Callable[[Key], bool] | None = None
        self._widths: list[int] = []
        self._widths_for = 0  # the content width the column widths were computed for
        self._line_cache: dict[Key, Strip] = {}

    # -- data -------------------------------------------------------------------------------------

    @property
    def row_count(self) -> int:
        return len(self._rows)

    @property
    def visible_keys(self) -> list[Key]:
        return self._visible

    def cells(self, key: Key) -> tuple[Cell, ...]:
        return self._rows[key]

    def set_rows(self, rows: Iterable[tuple[Key, Sequence[Cell]]]) -> None:
        """Replace every row (first load); keeps the cursor on the same key when it survives."""
        current = self.cursor_key
        self._rows = {key: tuple(cells) for key, cells in rows}
        self._line_cache.clear()
        self._refilter(keep=current)

    def upsert(self, key: Key, cells: Sequence[Cell]) -> None:
        """Add or change one row; repaints only that line when it is on screen."""
        is_new = key not in self._rows
        self._rows[key] = tuple(cells)
        self._line_cache.pop(key, None)
        shown = self._predicate is None or self._predicate(key)
        if is_new:
            if shown:
                self._position[key] = len(self._visible)
                self._visible.append(key)
                self._resize()
                self.refresh()
        elif shown != (key in self._position):
            self._refilter(keep=self.cursor_key)
        elif shown:
            self._refresh_key(key)

    def remove(self, key: Key) -> None:
        if self._rows.pop(key, None) is None:
            return
        self._line_cache.pop(key, None)
        if key in self._position:
            current = self.cursor_key
            self._show([k for k in self._visible if k != key])
            self._resize()
            if current != key and current in self._position:
                self._move_cursor(self._position[current])
            else:
                self._move_cursor(min(self.cursor, len(self._visible) - 1))
            self.refresh()

    def set_filter(self, predicate: Callable[[Key], bool] | None) -> None:
        self._predicate = predicate
        self._refilter(keep=self.cursor_key)

    def _show(self, keys: list[Key]) -> None:
        """Set the visible rows, in order, with their positions (row updates look keys up per event)."""
        self._visible = keys
        self._position = {key: index for index, key in enumerate(keys)}

    def _refilter(self, keep: Key | None) -> None:
        predicate = self._predicate
        self._show(list(self._rows) if predicate is None else [k for k in self._rows if predicate(k)])
        self._resize()
        self._move_cursor(self._position.get(keep, 0))
        self.refresh()

    # -- cursor -----------------------------------------------------------------------------------

    @property
    def cursor_key(self) -> Key | None:
        if 0 <= self.cursor < len(self._visible):
            return self._visible[self.cursor]
        return None

    def move_to_key(self, key: Key) -> bool:
        if key in self._position:
            self._move_cursor(self._position[key])
            return True
        return False

    def _move_cursor(self, index: int) -> None:
        index = max(0, min(index, len(self._visible) - 1))
        old_key = self.cursor_key
        self.cursor = index
        self._scroll_to_cursor()
        if old_key is not None:
            self._refresh_key(old_key)
        if self.cursor_key is not None:
            self._refresh_key(self.cursor_key)
        self.post_message(self.Highlighted(self, self.cursor_key))

    def _scroll_to_cursor(self) -> None:
        body = max(self.size.height - 1, 1)
        top = round(self.scroll_y)
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False, immediate=True)
        elif self.cursor >= top + body:
            self.scroll_to(y=self.cursor - body + 1, animate=False, immediate=True)

    def action_cursor(self, delta: int) -> None:
        self._move_cursor(self.cursor + delta)

    def action_page(self, direction: int) -> None:
        self._move_cursor(self.cursor + direction * max(self.size.height - 2, 1))

    def action_jump(self, index: int) -> None:
        self._move_cursor(len(self._visible) - 1 if index < 0 else index)

    def action_select(self) -> None:
        if self.cursor_key is not None:
            self.post_message(self.Selected(self, self.cursor_key))

    def on_click(self, event: events.Click) -> None:
        if event.y == 0:
            return
        index = round(self.scroll_y) + event.y - 1
        if 0 <= index < len(self._visible):
            self._move_cursor(index)
            if event.chain == 2:
                self.action_select()

    # -- layout and drawing -----------------------------------------------------------------------

    def _resize(self) -> None:
        self.virtual_size = Size(self.size.width, len(self._visible) + 1)

    def on_resize(self, _event: events.Resize) -> None:
        self._resize()
        self._scroll_to_cursor()

    def _column_widths(self) -> list[int]:
        width = max(self.scrollable_content_region.width, 1)
        if width != self._widths_for:  # resized, or a scrollbar came or went
            self._widths = []
            self._widths_for = width
            self._line_cache.clear()
        if not self._widths:
            gaps = len(self.columns)  # one space before each column
            fixed = sum(c.width for c in self.columns if c.width)
            flexible = [c for c in self.columns if not c.width]
            spare = max(width - fixed - gaps, 0)
            # A column whose share falls below its minimum gets the minimum, and the others share
            # what is left, so the minimums never push the row past the width.
            floored: set[int] = set()
            while True:
                left = spare - sum(self.columns[i].min_width for i in floored)
                total_ratio = sum(c.ratio for i, c in enumerate(self.columns) if not c.width and i not in floored) or 1
                share = {i: max(left, 0) * c.ratio // total_ratio for i, c in enumerate(self.columns)
                         if not c.width and i not in floored}
                short = {i for i, w in share.items() if w < self.columns[i].min_width}
                if not short:
                    break
                floored |= short
            widths = [c.width or (c.min_width if i in floored else share[i]) for i, c in enumerate(self.columns)]
            if flexible:  # give rounding leftovers to the last flexible column
                last = max(i for i, c in enumerate(self.columns) if not c.width)
                widths[last] += max(width - gaps - sum(widths), 0)
            self._widths = widths
        return self._widths

    def _render_cells(self, cells: Sequence[Cell], style: Style) -> Strip:
        line = Text(no_wrap=True, end="")
        for cell, width, column in zip(cells, self._column_widths(), self.columns):
            text = cell.copy() if isinstance(cell, Text) else Text(str(cell))
            if column.cut_middle and text.cell_len > width > 4 and text.cell_len == len(text.plain):
                tail = max(4, (width - 1) // 3)  # enough of the end to tell -lora from -merged
                text = text[:width - 1 - tail] + Text("…") + text[len(text.plain) - tail:]
            text.truncate(width, overflow="ellipsis", pad=True)
            line.append(" ")
            line.append(text)
        segments = list(line.render(self.app.console))
        strip = Strip(segments, line.cell_len)
        return strip.apply_style(style) if style else strip

    def _refresh_key(self, key: Key) -> None:
        index = self._position.get(key)
        if index is None:
            return
        if 1 <= index - round(self.scroll_y) + 1 < self.size.height:  # on screen
            self.refresh_line(index + 1)  # a virtual line: refresh_line takes the scroll off itself

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        self._column_widths()  # drops cached lines drawn for another width
        if y == 0:
            style = self.get_component_rich_style("live-table--header")
            return self._render_cells([c.label for c in self.columns], style).extend_cell_length(width, style).crop(0, width)
        index = round(self.scroll_y) + y - 1
        if index >= len(self._visible):
            if not self._visible:  # the empty state, wrapped to the width
                lines = textwrap.wrap(self.empty_text, max(width - 2, 10))
                if y - 1 < len(lines):
                    style = self.get_component_rich_style("live-table--empty")
                    return Strip([Segment(" " + lines[y - 1], style)]).extend_cell_length(width).crop(0, width)
            return Strip.blank(width, self.rich_style)
        key = self._visible[index]
        if index == self.cursor:
            style = self.get_component_rich_style("live-table--cursor")
            return self._render_cells(self._rows[key], style).extend_cell_length(width, style).crop(0, width)
        strip = self._line_cache.get(key)
        if strip is None:
            base = self.rich_style
            strip = self._render_cells(self._rows[key], base).extend_cell_length(width, base).crop(0, width)
            self._line_cache[key] = strip
        return strip
