"""Offscreen trame-slicer views that render when asked, not on every request: for ``snapshot`` and the
review benchmark.

trame-slicer's ``DirectViewFactory`` renders a view each time one of its displayable managers asks for a
render: adding one hippocampus case to the scene and positioning the four views asked for about 530 full
renders by Mesa's llvmpipe (16 CPU-s), an axial slice step for 18. The review page does not pay this: its
RCA scheduler only sets a flag and renders once per frame. These views do the same: a request marks the
view, and the caller renders it (:func:`render_pending` renders what the page would render next).
Needs the ``review`` extra.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable

from slicer import vtkMRMLApplicationLogic, vtkMRMLScene
from trame_slicer.views import IViewFactory, SliceView, ThreeDView, ViewLayoutDefinition, ViewType
from trame_slicer.views.render_scheduler import ScheduledRenderStrategy

#: Each view's flag (trame-slicer keeps a view's strategy private).
_FLAGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class RenderOnRequestFlag(ScheduledRenderStrategy):
    """Remembers that a render was asked for since the view's last render; renders nothing itself."""

    def __init__(self) -> None:
        super().__init__()
        self.pending = False

    def schedule_render(self) -> None:
        self.pending = True

    def did_render(self) -> None:
        self.pending = False


class OffscreenViewFactory(IViewFactory):
    """Slice and 3D views rendered offscreen, each with a :class:`RenderOnRequestFlag`."""

    def can_create_view(self, view: ViewLayoutDefinition) -> bool:
        return view.view_type in (ViewType.SLICE_VIEW, ViewType.THREE_D_VIEW)

    def _create_view(self, view: ViewLayoutDefinition, scene: vtkMRMLScene, app_logic: vtkMRMLApplicationLogic) -> Any:
        view_class = SliceView if view.view_type == ViewType.SLICE_VIEW else ThreeDView
        flag = RenderOnRequestFlag()
        created = view_class(scene, app_logic, view.singleton_tag, scheduled_render_strategy=flag)
        _FLAGS[created] = flag
        created.render_window().SetOffScreenRendering(1)
        created.set_view_properties(view.properties)
        return created

    def _get_slicer_view(self, view: Any) -> Any:
        return view


def render_pending(views: Iterable[Any]) -> list[Any]:
    """Render each view that was asked to render since its last render (what the page's scheduler renders
    on its next frame); returns those views."""
    rendered = []
    for view in views:
        flag = _FLAGS.get(view)
        if flag is not None and flag.pending:
            view.render()
            rendered.append(view)
    return rendered
