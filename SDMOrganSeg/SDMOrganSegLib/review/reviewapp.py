"""``sdmorganseg review``: a browser page (trame + trame-slicer) to page through segmentation outputs.

The server holds one MRML scene and renders the four views (axial, coronal, sagittal, 3D) with Slicer's
displayable managers; the browser gets images (trame-rca). One case is open at a time: choosing another
removes the previous case's nodes. Cases are read in a thread, so the page keeps answering while a case
loads; the nodes are made on the server's event loop, where VTK is used.

Every browser connected to one server process shares its state (the same scene, case and toggles);
for one session per user, trame's launcher starts one process per user (README, "Review in a browser").
Needs the ``review`` extra.
"""

from __future__ import annotations

import asyncio
import math
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

from ..images.contours import level_color, level_tag
from ..common.errors import SDMOrganSegError
from .reviewcases import CaseData, ReviewCase, compare_dice, find_cases, load_case


def _hex(color: Any) -> str:
    return "#" + "".join(f"{int(round(max(0.0, min(1.0, float(c))) * 255)):02x}" for c in color[:3])


def _subtitle(case: ReviewCase) -> str:
    if case.error:
        return f"cannot open: {case.error}"
    parts = []
    if case.mean_dice is not None:
        hd95 = [m["hd95"] for m in case.metrics.values() if math.isfinite(m.get("hd95", math.nan))]
        parts.append(f"Dice {case.mean_dice:.3f}" + (f", HD95 {sum(hd95) / len(hd95):.1f} mm" if hd95 else ""))
    parts.append(", ".join(f"{name} {volume:.2f} ml" for name, volume in case.volumes_ml.items()))
    return "; ".join(parts)


def check_port(host: str, port: int) -> int:
    """The port to listen on (a free one for 0); a one-line error when it is taken or the host is wrong."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, port))
            return int(probe.getsockname()[1])
    except OSError as error:
        if error.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
            raise SDMOrganSegError(f"port {port} on {host} is in use; choose another with --port (0 picks a free one)") from None
        raise SDMOrganSegError(f"cannot listen on {host}:{port} ({error.strerror or error}); check --host and --port") from None


class ReviewApp:
    """The page's server side: cases, scene, views, toggles."""

    def __init__(self, server: Any, cases: list[ReviewCase], compare: list[ReviewCase] | None = None, model: str | None = None, compare_name: str = "") -> None:
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.core import LayoutManager
        from trame_slicer.rca_view import register_rca_factories

        from .reviewscene import PAGE_IMAGE_QUALITY, slicer_app, without_multisampling

        self.server = server
        self.cases = cases
        self.compare = {c.name: c for c in (compare or [])}
        self.model = model
        self.slicer = slicer_app()
        self.shown = None
        self.worker = None
        self.compare_problem = ""
        self.new_run = ""  # the name of a "Segment this volume" run while it is shown
        server.enable_module(trame_slicer_module)
        register_rca_factories(self.slicer.view_manager, server, interactive_quality=PAGE_IMAGE_QUALITY)
        self.layout_manager = LayoutManager(self.slicer.scene, self.slicer.view_manager, server)
        self.layout_manager.register_layout_dict(LayoutManager.default_grid_configuration())
        self.layout_manager.set_layout("Quad View")

        state = server.state
        state.trame__title = "SDMOrganSeg review"
        state.cases = [self._case_entry(i, c) for i, c in enumerate(cases)]
        state.selected_case = -1
        state.organs = []
        state.visible_organs = []
        state.levels = []
        state.visible_levels = []
        state.sdm_choices = []
        state.sdm_organ = None
        state.sdm_scale = ""
        state.compare_name = compare_name
        state.compare_dice = ""
        state.status = "choose a case"
        state.loading = False
        state.can_segment = bool(model)
        state.segment_running = False
        state.segment_progress = 0
        state.segment_message = ""
        state.change("visible_organs", "visible_levels")(self._on_toggles)
        state.change("sdm_organ")(self._on_sdm_organ)
        server.controller.select_case = self.select_case
        server.controller.segment_volume = self.segment_volume
        server.controller.cancel_segment = self.cancel_segment
        server.controller.on_server_ready.add(self._on_ready)
        self._build_ui()  # creates the layout's views; the first render waits for the server's loop
        without_multisampling(self.slicer.view_manager.get_slice_views())

    def _case_entry(self, index: int, case: ReviewCase) -> dict:
        return {"index": index, "name": case.name, "subtitle": _subtitle(case), "broken": bool(case.error)}

    # --- the page -------------------------------------------------------------------------------------

    def _build_ui(self) -> None:
        from trame.ui.vuetify3 import SinglePageWithDrawerLayout
        from trame.widgets import html
        from trame.widgets import vuetify3 as v

        with SinglePageWithDrawerLayout(self.server, full_height=True) as layout:
            layout.title.set_text("SDMOrganSeg review")
            layout.drawer.width = 360
            with layout.toolbar:
                v.VSpacer()
                html.Span("{{ status }}", id="status", classes="text-body-2 mr-4")
            with layout.drawer:
                with v.VList(density="compact", id="case-list"):
                    v.VListSubheader("Cases (worst first)")
                    v.VListItem(
                        v_for="c in cases", key="c.index",
                        title=("c.name",), subtitle=("c.subtitle",),
                        active=("selected_case === c.index",),
                        classes=("c.broken ? 'case-item case-broken text-error' : 'case-item'",),
                        click=(self.select_case, "[c.index]"),
                        lines="two",
                    )
                v.VDivider()
                with html.Div(classes="pa-2", v_show="organs.length"):
                    html.Div("Organs", classes="text-subtitle-2")
                    with html.Div(v_for="o in organs", key="o.name", classes="d-flex align-center"):
                        html.Span(classes="organ-swatch mr-2", style=("{background: o.color, width: '14px', height: '14px', display: 'inline-block', borderRadius: '3px'}",))
                        v.VCheckbox(v_model="visible_organs", value=("o.name",), label=("o.name",), density="compact", hide_details=True, classes="organ-toggle")
                    html.Div("SDM levels", classes="text-subtitle-2 mt-2")
                    with html.Div(v_for="l in levels", key="l.tag", classes="d-flex align-center"):
                        html.Span(classes="mr-2", style=("{background: l.color, width: '14px', height: '4px', display: 'inline-block'}",))
                        v.VCheckbox(v_model="visible_levels", value=("l.tag",), label=("'level ' + l.tag",), density="compact", hide_details=True,
                                    id=("'level-' + l.tag",), classes="level-toggle")
                    v.VSelect(label="SDM overlay", items=("sdm_choices",), v_model="sdm_organ", clearable=True, density="compact", hide_details=True, classes="mt-2", id="sdm-overlay")
                    html.Div("{{ sdm_scale }}", id="sdm-scale", classes="text-caption", v_show="sdm_scale")
                    html.Div("{{ compare_dice }}", id="compare-dice", classes="text-body-2 mt-2", v_show="compare_dice")
                    with html.Div(v_show="can_segment", classes="mt-2"):
                        v.VBtn("Segment this volume", click=self.segment_volume, disabled=("segment_running || selected_case < 0",), size="small", id="segment-button")
                        v.VBtn("Cancel", click=self.cancel_segment, v_show="segment_running", size="small", classes="ml-2")
                        v.VProgressLinear(model_value=("segment_progress",), v_show="segment_running", classes="mt-1")
                        html.Div("{{ segment_message }}", id="segment-message", classes="text-caption")
            with layout.content:
                with html.Div(style="height: calc(100vh - 92px); display: flex;"):  # minus the toolbar and the footer
                    self.layout_manager.initialize_layout_grid(layout)
        self.ui = layout

    # --- cases ----------------------------------------------------------------------------------------

    def _on_ready(self, **_: Any) -> None:
        from trame_server.utils.asynchronous import create_task

        create_task(self._open_first())

    async def _open_first(self) -> None:
        for index, case in enumerate(self.cases):
            if not case.error:
                await self.select_case(index)
                return
        with self.server.state as state:
            state.status = "no case can be opened; each one's reason is in the list"

    async def select_case(self, index: int) -> None:
        state = self.server.state
        case = self.cases[int(index)]
        if case.error or state.loading:
            with state:
                state.status = f"{case.name} cannot be opened: {case.error}" if case.error else state.status
            return
        self.new_run = ""
        with state:
            state.loading = True
            state.status = f"opening {case.name}..."
        try:
            data, compared = await asyncio.to_thread(self._read, case)
        except SDMOrganSegError as error:
            case.error = str(error).removeprefix(f"case {case.name}: ")
            with state:
                state.cases = [self._case_entry(i, c) for i, c in enumerate(self.cases)]
                state.status = f"{case.name} cannot be opened: {case.error}"
                state.loading = False
            return
        self._show(index, data, compared)

    def _read(self, case: ReviewCase) -> tuple[CaseData, CaseData | None]:
        data = load_case(case)
        other = self.compare.get(case.name)
        compared = load_case(other) if other is not None and not other.error else None
        return data, compared

    def _show(self, index: int, data: CaseData, compared: CaseData | None) -> None:
        from .reviewscene import remove_case, show_case

        scene = self.slicer.scene
        if self.shown is not None:
            remove_case(scene, self.shown)
            self.shown = None
        slice_views = self.slicer.view_manager.get_slice_views()
        try:
            self.shown = show_case(scene, data, compared, slice_views=slice_views)
        except SDMOrganSegError as error:  # the compared run's files do not fit this image: show the case alone
            self.shown = show_case(scene, data, None, slice_views=slice_views)
            compared = None
            self.compare_problem = str(error)
        from .reviewscene import slice_normal, slice_offset

        for view in self.slicer.view_manager.get_views():
            view.fit_view_to_content()
        for view in slice_views:  # each slice view through the organs' largest cross-section
            view.set_slice_value(slice_offset(data.computed.labels, slice_normal(view), None))
        state = self.server.state
        with state:
            state.selected_case = index
            state.organs = [{"name": o.name, "color": _hex(o.color)} for o in data.computed.organs]
            state.visible_organs = [o.name for o in data.computed.organs]
            state.levels = [{"tag": level_tag(l), "color": _hex(level_color(l))} for l in data.computed.levels]
            state.visible_levels = [level_tag(l) for l in data.computed.levels]
            state.sdm_choices = [o.name for o in data.computed.organs]
            state.sdm_organ = None
            state.sdm_scale = ""
            state.compare_dice = self._compare_text(data, compared)
            state.status = f"{data.case.name}: {_subtitle(data.case)}"
            state.loading = False
        self._render()

    def _compare_text(self, data: CaseData, compared: CaseData | None) -> str:
        if not self.compare and not self.new_run:
            return ""
        name = self.new_run or self.server.state.compare_name or "the compared run"
        if self.compare_problem:
            problem, self.compare_problem = self.compare_problem, ""
            return f"{name}: not shown ({problem})"
        if compared is None:
            other = self.compare.get(data.case.name)
            return f"{name}: " + (f"cannot open this case ({other.error})" if other is not None else "has no such case")
        try:
            scores = compare_dice(data, compared)
        except SDMOrganSegError as error:
            return f"{name}: {error}"
        text = ", ".join(f"{organ} {value:.3f}" for organ, value in scores.items())
        return f"Dice between the runs (blue contours: {name}): {text}"

    def _render(self) -> None:
        for view in self.slicer.view_manager.get_views():
            view.schedule_render()

    # --- toggles --------------------------------------------------------------------------------------

    def _on_toggles(self, visible_organs: list, visible_levels: list, **_: Any) -> None:
        from .reviewscene import set_visibility

        if self.shown is None:
            return
        set_visibility(self.shown, set(visible_organs or []), set(visible_levels or []))
        self._render()

    async def _on_sdm_organ(self, sdm_organ: str | None, **_: Any) -> None:
        from ..mrml.mrmlsegmentation import SDMSegmentationLogic
        from .reviewcases import read_sdm
        from .reviewscene import SDM_OVERLAY_OPACITY, sdm_range_mm

        shown = self.shown
        if shown is None:
            return
        node = shown.outputs.sdm_volumes.get(sdm_organ) if sdm_organ else None
        if sdm_organ and node is None:  # read when first shown, off the page's loop (a CT organ's: ~1 s)
            with self.server.state as state:
                state.sdm_scale = f"reading the SDM of {sdm_organ}..."
            try:
                sdm = await asyncio.to_thread(read_sdm, shown.data.case, sdm_organ)
            except SDMOrganSegError as error:
                with self.server.state as state:
                    state.sdm_scale = str(error)
                return
            if self.shown is not shown or self.server.state.sdm_organ != sdm_organ:
                return  # another case or organ was chosen meanwhile
            node = SDMSegmentationLogic(self.slicer.scene).add_sdm_volume(shown.outputs, sdm_organ, sdm)
        for view in self.slicer.view_manager.get_slice_views():
            view.set_foreground_volume_id(node.GetID() if node is not None else None)
            view.set_foreground_opacity(SDM_OVERLAY_OPACITY if node is not None else 0.0)
        levels_mm = shown.data.case.summary.get("sdm_levels_mm") if node is not None else None
        if node is not None and levels_mm:
            # A clip or tanh model: each level is a fixed distance from the surface (summary.json says which).
            outer = {level: mm for level, mm in levels_mm.items() if float(level) > 0}
            scale = (
                f"SDM of {sdm_organ}: blue inside, white on the surface, red outside; the contours "
                f"{' / '.join(outer)} lie {' / '.join(f'{mm:.1f}' for mm in outer.values())} mm outside the surface"
            )
        elif node is not None:
            inside, outside = sdm_range_mm(shown, sdm_organ)
            scale = (
                f"normalised SDM of {sdm_organ}: blue inside (-1 at its deepest point, {-inside:.1f} mm from the surface), "
                f"white on the surface, red outside (+1 at the farthest voxel, {outside:.1f} mm away)"
            )
        else:
            scale = ""
        with self.server.state as state:  # after an await the change must be flushed to the page
            state.sdm_scale = scale
        self._render()

    # --- segment this volume (with --model) -----------------------------------------------------------

    async def segment_volume(self) -> None:
        from ..mrml.mrmlsegmentation import BackgroundRun

        state = self.server.state
        if self.shown is None or self.worker is not None or not self.model:
            return
        case, index = self.shown.data.case, state.selected_case
        self.worker = BackgroundRun(self.shown.data.image, self.model)
        with state:
            state.segment_running, state.segment_progress, state.segment_message = True, 0, "starting the worker"
        try:
            self.worker.start()
            while True:
                status = self.worker.poll()
                with state:
                    state.segment_progress = round(100 * self.worker.progress[0])
                    state.segment_message = self.worker.progress[1]
                if status != "running":
                    break
                await asyncio.sleep(0.25)
            if status == "done":
                computed = await asyncio.to_thread(self.worker.result)
                # Read again: the shown case's nodes took its contours (reviewscene._drop_copies).
                reviewed = await asyncio.to_thread(load_case, case)
                self._show_new_run(index, reviewed, computed)
                message = f"segmented with {computed.model_name}: shown in blue over the reviewed run"
            else:
                message = self.worker.message or status
        except SDMOrganSegError as error:
            message = str(error)
        except Exception as error:  # the page must not keep "running" forever; the server log has the traceback
            traceback.print_exc()
            message = f"the new run could not be shown ({type(error).__name__}: {error})"
        finally:
            self.worker.cleanup()  # its temporary folder; nothing was written next to the reviewed case
            self.worker = None
        with state:
            state.segment_running = False
            state.segment_message = message

    def cancel_segment(self) -> None:
        if self.worker is not None:
            self.worker.cancel()

    def _show_new_run(self, index: int, data: CaseData, computed: Any) -> None:
        """The new run over the reviewed one, like a --compare run, until another case is chosen."""
        fresh = CaseData(ReviewCase(name=data.case.name, folder=data.case.folder), data.image, computed)
        self.new_run = f"new run of {computed.model_name}"
        self._show(index, data, fresh)


def serve(path: str | Path, compare: str | Path | None = None, model: str | None = None, port: int = 8080, host: str = "127.0.0.1",
          *, block: bool = True) -> int:
    """Check everything a user can get wrong first (each a one-line error), then serve until stopped."""
    cases = find_cases(path)
    compared = find_cases(compare) if compare else None
    if model:
        from ..formats.modelfiles import resolve_model

        model = str(resolve_model(model))
    port = check_port(host, port)
    from .reviewscene import choose_offscreen_backend, require_review_extra

    require_review_extra()
    choose_offscreen_backend()
    from trame.app import get_server

    server = get_server("sdmorganseg-review", client_type="vue3")
    ReviewApp(server, cases, compared, model, compare_name=Path(compare).name if compare else "")
    sys.argv = sys.argv[:1]  # trame reads its own options from the command line; ours are parsed already
    print(f"reviewing {len(cases)} case(s) of {path} at http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    # trame prints "App running at: ..." once it listens (the line trame's launcher waits for).
    server.start(port=port, host=host, open_browser=False, show_connection_info=True, exec_mode="main" if block else "task")
    return 0
