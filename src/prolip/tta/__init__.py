"""Test-time adaptation (paper §4.6): test-time ProLIP, batched across images, and the methods it is compared with
on the same views (TPT, ZERO, TDA, BoostAdapter, DPE, the no-update view ensemble, plain zero-shot), behind one
interface.

A new test-time method is one module: a :class:`PerImageMethod` or :class:`StreamMethod` subclass decorated with
:func:`register` (which refuses a taken name and a setting without a constraint); the bench's tta protocol, its
plan and the experiment files' ``tta: methods:`` list pick it up by name, and nothing outside ``prolip/tta/``
compares one.
"""

from __future__ import annotations

from prolip.tta.base import SECTION_SETTINGS, PerImageMethod, Scene, StreamMethod, TestTimeMethod
from prolip.tta.functional import batched_logits, marginal_entropy, select_confident
from prolip.tta.registry import available, create, method_class, register
from prolip.tta.views import tta_view_transform, view_features

# The built-in methods, imported in the order an experiment's flags list their rows (each registers itself).
from prolip.tta.prolip import TestTimeProLIP, TTAConfig, adapt_projection, tta_logits  # isort: skip
from prolip.tta.zeroshot import ZeroShotRow  # isort: skip
from prolip.tta.tpt import TPT, tpt_logits  # isort: skip
from prolip.tta.ensemble import ViewEnsemble, view_ensemble_logits  # isort: skip
from prolip.tta.zero import ZERO_GAMMA, Zero, zero_votes  # isort: skip
from prolip.tta.tda import (  # isort: skip
    MANY_VIEWS,
    TDA,
    TDA_POSITIVE,
    TDACache,
    TDAInputs,
    TDASettings,
    order_digest,
    stream_order,
    tda_inputs,
    tda_settings,
    tda_stream,
)
from prolip.tta.boostadapter import BoostAdapter, boost_stream  # isort: skip
from prolip.tta.dpe import DPE, dpe_stream  # isort: skip

# The test-time method every tta experiment runs from each of its methods' W: test-time ProLIP, the protocol's
# subject; the others run only when the experiment lists them.
PROTOCOL_METHOD = TestTimeProLIP.name

__all__ = [
    "DPE",
    "MANY_VIEWS",
    "PROTOCOL_METHOD",
    "SECTION_SETTINGS",
    "BoostAdapter",
    "TDA",
    "TDA_POSITIVE",
    "TPT",
    "TDACache",
    "TDAInputs",
    "TDASettings",
    "TTAConfig",
    "PerImageMethod",
    "Scene",
    "StreamMethod",
    "TestTimeMethod",
    "TestTimeProLIP",
    "ViewEnsemble",
    "ZERO_GAMMA",
    "Zero",
    "ZeroShotRow",
    "adapt_projection",
    "available",
    "boost_stream",
    "batched_logits",
    "create",
    "dpe_stream",
    "marginal_entropy",
    "method_class",
    "order_digest",
    "register",
    "select_confident",
    "stream_order",
    "tda_inputs",
    "tda_settings",
    "tda_stream",
    "tpt_logits",
    "tta_logits",
    "tta_view_transform",
    "view_ensemble_logits",
    "view_features",
    "zero_votes",
]
