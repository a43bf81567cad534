"""Importance criteria: they read tensors and statistics, never change a model.

Channel criteria (:class:`ChannelImportance`) score the channels of a coupled group
for :class:`~secateurs.Channels`; element-wise criteria (:class:`ElementImportance`)
score single weights for :class:`~secateurs.Unstructured` and :class:`~secateurs.NM`.
Either kind is one class; registering an instance makes its name usable in configs,
recipes and ``--importance``.
"""

from .channel import (
    CHANNEL_IMPORTANCE,
    ChannelImportance,
    ScoringContext,
    channel_importance,
    register_channel_importance,
)
from .elementwise import (
    ELEMENT_IMPORTANCE,
    ElementContext,
    ElementImportance,
    element_importance,
    element_scores,
    register_element_importance,
)

__all__ = ["CHANNEL_IMPORTANCE", "ELEMENT_IMPORTANCE", "ChannelImportance", "ElementContext", "ElementImportance",
           "ScoringContext", "channel_importance", "element_importance", "element_scores",
           "register_channel_importance", "register_element_importance"]
