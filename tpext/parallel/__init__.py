"""tpext.parallel: a dense model made tensor-parallel in place (`parallelize`), by a plan {pattern: style}.

    api.py        parallelize: finds each module's style, converts, ties, attaches the hooks
    styles.py     the styles (objects that convert one module and check it first) and their shorthands
    plans.py      plans as data, auto_plan (the model's own TP plan first, then module names)
    names.py      the plan read from module names and structure (auto_plan's second source)
    hf_plan.py    a Hugging Face model's own plan, translated into tpext styles
    structure.py  reading a model: attention, heads, packed layouts, norms, mixture-of-experts blocks
    mla.py        multi-head latent attention (DeepSeek-V2/V3's): its heads, and MLAKvAProj
    mamba.py      Mamba-2 mixers by heads (MambaMixer, GroupedNorm), and the entry points for all mixers
    mamba1.py     Mamba-1 mixers by channels (Mamba1Mixer, MambaXProj, SlicedRows)
    mixers.py     what both share: the sharded classes, slicing, the mixer check, MambaConv
    sequence.py   sequence parallelism: the split before the decoder layers, the gathers around attention
    full_sequence.py  blocks that run on the full sequence under SP (MoE, replicated), partial sums reduced once
    replicated.py which modules auto_plan replicates whole, and the checks that they run where that is right
    wrappers.py   the check that a DDP / FSDP2 wrapper holds no two ranks of the tensor-parallel group
    hf_hooks.py   for Hugging Face's model contracts: the vocab-parallel loss, dense save_pretrained, ALiBi

Imports run one way: api -> plans -> hf_plan / names -> mla, mamba -> mamba1 -> mixers -> styles -> structure -> tpext.nn /
tpext.sharding; plans -> replicated -> styles; api -> sequence -> full_sequence / replicated, mamba;
api -> hf_hooks / wrappers.
"""

from tpext.parallel import plans, styles
from tpext.parallel.api import parallelize
from tpext.parallel.plans import *  # noqa: F403 - the names of plans.__all__
from tpext.parallel.styles import *  # noqa: F403 - the names of styles.__all__

#: Names of plans.__all__ and styles.__all__ that tpext.parallel leaves in their modules (helpers of parallelize).
_NOT_EXPORTED = {"style_for", "REPLICATED", "as_style"}

__all__ = ["parallelize", *(name for name in plans.__all__ + styles.__all__ if name not in _NOT_EXPORTED)]
