"""tpext.parallel: a dense model made tensor-parallel in place (`parallelize`), by a plan {pattern: style}.

    api.py        parallelize: finds each module's style, converts, ties, attaches the hooks
    styles.py     the styles (objects that convert one module and check it first) and their shorthands
    plans.py      plans as data, auto_plan (the model's own TP plan first, then module names)
    hf_plan.py    a Hugging Face model's own plan, translated into tpext styles
    structure.py  reading a model: attention, heads, packed layouts, norms, mixture-of-experts blocks
    mla.py        multi-head latent attention (DeepSeek-V2/V3's): its heads, and MLAKvAProj
    mamba.py      Mamba mixers: Mamba-2 by heads (MambaMixer, MambaConv, GroupedNorm), Mamba-1 by channels
    hooks.py      what parallelize attaches besides converted modules (SP hooks, the loss, save_pretrained)

Imports run one way: api -> plans -> hf_plan -> mla, mamba -> styles -> structure -> tpext.nn / tpext.sharding.
"""

from tpext.parallel import plans, styles
from tpext.parallel.api import parallelize
from tpext.parallel.plans import *  # noqa: F403 - the names of plans.__all__
from tpext.parallel.styles import *  # noqa: F403 - the names of styles.__all__

#: Names of plans.__all__ and styles.__all__ that tpext.parallel leaves in their modules (helpers of parallelize).
_NOT_EXPORTED = {"style_for", "REPLICATED", "as_style"}

__all__ = ["parallelize", *(name for name in plans.__all__ + styles.__all__ if name not in _NOT_EXPORTED)]
