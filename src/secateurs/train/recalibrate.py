"""BatchNorm recalibration after surgery: :func:`recalibrate_bn_`.

It lives in :mod:`secateurs.surgery.recalibrate` (the channel method runs it right after its
surgery, so it sits below the methods); this module keeps the old import path working.
"""

from ..surgery.recalibrate import recalibrate_bn_

__all__ = ["recalibrate_bn_"]
