"""The ComfyUI frontend in a Playwright page, driven the way a user drives it.

Workflows are opened through the frontend's own file input (what "Open" and drag-and-drop
feed), runs start from the Run button, and everything the server pushes over the
websocket is recorded so a test can watch progress. Reading the graph goes through
`window.app` / `LiteGraph`, the objects the frontend itself renders from.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

APP_READY = "() => !!(window.app && window.app.graph && window.LiteGraph && window.app.canvas)"
STARTUP_SETTLE_MS = 2000  # the frontend keeps loading extensions/settings briefly after app is set
FINISHED = ("execution_success", "execution_error", "execution_interrupted")


@dataclass(frozen=True)
class NodeView:
    id: int
    type: str
    registered: bool
    has_errors: bool
    widgets: list[tuple[str, str, Any]]  # (name, widget type, value)
    images: int  # images the node displays (node.imgs)


class ComfyPage:
    def __init__(self, page, url: str) -> None:
        self.page, self.url = page, url
        self.page_errors: list[str] = []
        self.messages: list[dict] = []  # JSON websocket messages, in arrival order
        self.binary_frames = 0  # previews (e.g. the live loss plot) arrive as binary frames
        self._startup_errors = 0
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        page.on("websocket", self._watch_socket)

    def _watch_socket(self, socket) -> None:
        def received(payload) -> None:
            if isinstance(payload, str):
                self.messages.append(json.loads(payload))
            else:
                self.binary_frames += 1

        socket.on("framereceived", received)

    # --- opening -----------------------------------------------------------------------------

    def open(self, timeout_ms: int = 90_000) -> None:
        self.page.goto(self.url, timeout=timeout_ms)
        self.page.wait_for_function(APP_READY, timeout=timeout_ms)
        self.page.wait_for_timeout(STARTUP_SETTLE_MS)
        self._startup_errors = len(self.page_errors)

    @property
    def startup_errors(self) -> list[str]:
        """Script errors the frontend raised while starting (before any test action)."""
        return self.page_errors[: self._startup_errors]

    @property
    def errors_since_startup(self) -> list[str]:
        return self.page_errors[self._startup_errors :]

    def frontend_version(self) -> str:
        return self.page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")

    def load_workflow(self, path: Path, timeout_ms: int = 30_000) -> None:
        """Open a workflow file as a user does (file picker), and wait until its nodes are on the canvas."""
        count = len(json.loads(path.read_text(encoding="utf-8"))["nodes"])
        self.page.set_input_files("#comfy-file-input", str(path))
        self.page.wait_for_function("(n) => app.graph.nodes.length === n", arg=count, timeout=timeout_ms)
        self.page.wait_for_timeout(500)  # a few frames, so the canvas shows the new graph

    # --- reading the graph -------------------------------------------------------------------

    def nodes(self) -> list[NodeView]:
        rows = self.page.evaluate(
            """() => app.graph.nodes.map(n => ({
                id: n.id, type: n.type, registered: !!LiteGraph.registered_node_types[n.type],
                has_errors: !!n.has_errors,
                widgets: (n.widgets || []).map(w => [w.name, w.type, w.value]),
                images: (n.imgs || []).filter(i => i.complete && i.naturalWidth > 0).length }))"""
        )
        return [NodeView(**{**row, "widgets": [tuple(w) for w in row["widgets"]]}) for row in rows]

    def overlapping_nodes(self) -> list[tuple[str, str]]:
        """Pairs of node titles whose boxes (title bar included) overlap on the canvas."""
        return self.page.evaluate(
            """() => {
                const boxes = app.graph.nodes.map(n => [n.title, n.boundingRect]);
                const pairs = [];
                boxes.forEach(([a, r], i) => boxes.slice(i + 1).forEach(([b, q]) => {
                    if (r[0] < q[0] + q[2] && q[0] < r[0] + r[2] && r[1] < q[1] + q[3] && q[1] < r[1] + r[3])
                        pairs.push([a, b]);
                }));
                return pairs;
            }"""
        )

    def dialogs(self) -> list[str]:
        """Text of the dialogs that are open (missing nodes, execution errors, ...)."""
        return self.page.evaluate("() => [...document.querySelectorAll('.p-dialog')].map(d => d.innerText)")

    # --- editing -----------------------------------------------------------------------------

    def set_widgets(self, values: dict[str, dict[str, Any]]) -> None:
        """Set widget values by node type and widget name, through each widget's own callback."""
        missing = self.page.evaluate(
            """(values) => {
                const missing = [];
                for (const [type, widgets] of Object.entries(values)) {
                    const nodes = app.graph.nodes.filter(n => n.type === type);
                    if (!nodes.length) { missing.push(type); continue; }
                    for (const node of nodes) for (const [name, value] of Object.entries(widgets)) {
                        const w = (node.widgets || []).find(w => w.name === name);
                        if (!w) { missing.push(`${type}.${name}`); continue; }
                        w.value = value;
                        if (w.callback) w.callback(value, app.canvas, node);
                    }
                }
                app.graph.setDirtyCanvas(true, true);
                return missing;
            }""",
            values,
        )
        if missing:
            raise AssertionError(f"no such node/widget on the canvas: {missing}")

    def add_nodes(self, types: list[str], columns: int = 5) -> None:
        """Add one node of each type to an empty graph, laid out in a grid (as from the node library)."""
        self.page.evaluate(
            """([types, columns]) => {
                app.graph.clear();
                let x = 20, y = 40, rowHeight = 0;
                types.forEach((type, i) => {
                    const node = LiteGraph.createNode(type);
                    node.pos = [x, y];
                    app.graph.add(node);
                    rowHeight = Math.max(rowHeight, node.size[1]);
                    x += node.size[0] + 40;
                    if ((i + 1) % columns === 0) { x = 20; y += rowHeight + 80; rowHeight = 0; }
                });
                app.graph.setDirtyCanvas(true, true);
            }""",
            [types, columns],
        )
        self.page.wait_for_timeout(300)

    def hover_widget_tooltip(self, node_id: int, widget: str, timeout_ms: int = 5_000) -> str:
        """The tooltip the frontend shows when the mouse rests on a widget ('' if none appears)."""
        x, y = self.page.evaluate(
            """([id, name]) => {
                const node = app.graph.getNodeById(id);
                app.canvas.ds.scale = 1;
                app.canvas.ds.offset = [80 - node.pos[0], 120 - node.pos[1]];
                app.canvas.setDirty(true, true);
                const w = node.widgets.find(w => w.name === name);
                return app.canvasPosToClientPos([node.pos[0] + 40, node.pos[1] + w.y + 8]);
            }""",
            [node_id, widget],
        )
        self._park_mouse()
        self.page.wait_for_timeout(200)
        self.page.mouse.move(x, y)
        self.page.mouse.move(x + 2, y + 1)
        tooltip = self.page.locator(".node-tooltip")
        try:
            tooltip.wait_for(state="visible", timeout=timeout_ms)
        except Exception:
            return ""
        return tooltip.inner_text()

    # --- running -----------------------------------------------------------------------------

    def click_run(self) -> None:
        self.page.click('button[aria-label="Run"]')

    def wait_for_message(self, predicate, timeout_s: float, what: str) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = next((m for m in self.messages if predicate(m)), None)
            if found is not None:
                return found
            self.page.wait_for_timeout(500)
        raise TimeoutError(f"no {what} within {timeout_s:.0f} s")

    def wait_until_finished(self, timeout_s: float) -> dict:
        """The execution_success / _error / _interrupted message of the queued prompt."""
        return self.wait_for_message(lambda m: m["type"] in FINISHED, timeout_s, "end of execution")

    def progress(self, node_id: str) -> list[tuple[int, int]]:
        """(value, max) of every `progress` message for one node, in arrival order."""
        return [
            (m["data"]["value"], m["data"]["max"])
            for m in self.messages
            if m["type"] == "progress" and str(m["data"].get("node")) == node_id
        ]

    # --- looking -----------------------------------------------------------------------------

    def frame_graph(self, margin: int = 24) -> None:
        """Zoom and pan so every node fills the canvas area left free by the menus and side panel."""
        self.page.evaluate(
            """(margin) => {
                const rects = app.graph.nodes.map(n => n.boundingRect);
                if (!rects.length) return;
                const minX = Math.min(...rects.map(r => r[0])), minY = Math.min(...rects.map(r => r[1]));
                const maxX = Math.max(...rects.map(r => r[0] + r[2]));
                const maxY = Math.max(...rects.map(r => r[1] + r[3]));
                const rightOf = sel => Math.max(0, ...[...document.querySelectorAll(sel)]
                    .map(e => e.getBoundingClientRect().right));
                const left = margin + Math.max(rightOf('.side-tool-bar-container'),
                                               rightOf('.side-bar-panel'));
                const bar = document.querySelector('.comfyui-body-top');
                const top = (bar ? bar.getBoundingClientRect().bottom : 0) + margin;
                const scale = Math.min(1, (window.innerWidth - margin - left) / (maxX - minX),
                                       (window.innerHeight - margin - top) / (maxY - minY));
                const c = app.canvas.canvas.getBoundingClientRect();
                app.canvas.ds.scale = scale;
                app.canvas.ds.offset[0] = (left - c.x) / scale - minX;
                app.canvas.ds.offset[1] = (top - c.y) / scale - minY;
                app.canvas.setDirty(true, true);
            }""",
            margin,
        )
        self.page.wait_for_timeout(500)

    def open_queue_panel(self) -> None:
        self.page.click('button[aria-label^="Queue"]')
        self.page.wait_for_timeout(1000)

    def _park_mouse(self) -> None:
        """Rest the pointer on the canvas's bottom edge: no tab preview, node highlight or tooltip."""
        size = self.page.viewport_size
        self.page.mouse.move(size["width"] // 2, size["height"] - 4)

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._park_mouse()
        self.page.wait_for_timeout(300)
        self.page.screenshot(path=str(path))
        return path
