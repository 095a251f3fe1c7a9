"""ggn: jb.diag_ggn against BackPACK's DiagGGNExact, per call, on a softmax network.

784-100-10 with a softmax output and the log-likelihood cost, the pairing BackPACK's
``DiagGGNExact`` supports for several outputs (with ``CrossEntropyLoss``). The two GGN
diagonals are checked to agree before timing; calls alternate over six minibatches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jbackprop as jb
from scripts.bench import reference
from scripts.bench.context import Context
from scripts.bench.harness import clock, median
from scripts.bench.setting import BATCH_SIZES, N_TRAIN, SIZES
from scripts.bench.torch_runners import BACKPACK_MISSING, BackpackGGN, has_backpack


def run(ctx: Context) -> None:
    print("\n== ggn: jb.diag_ggn against BackPACK DiagGGNExact (softmax) ==", flush=True)
    s, report = ctx.setting, ctx.report
    if not has_backpack():
        report.note(f"ggn section skipped: {BACKPACK_MISSING}")
        return
    import torch

    model = jb.Model(SIZES, hidden="sigmoid", output="softmax", cost="log_likelihood")
    p = jb.init_params(jax.random.key(0), model)
    backpack_ggn = BackpackGGN(p, ctx.args.backpack_threads)
    ggn = jax.jit(lambda p, X, y: jb.diag_ggn(p, X, y, model))
    labels = jnp.argmax(s.Y, axis=1)
    rng = np.random.default_rng(1)
    for bs in BATCH_SIZES:
        batches = []
        for _ in range(6):
            ids = np.asarray(rng.choice(N_TRAIN, bs, replace=False))
            X, y = s.X[ids], labels[ids]
            tensors = (torch.from_numpy(np.array(X)), torch.from_numpy(np.array(y)).long())
            batches.append((jax.block_until_ready((X, y)), tensors))
        (X, y), (xt, yt) = batches[0]
        want = jax.tree.map(jnp.asarray, backpack_ggn(xt, yt))
        err = reference.max_rel_err(ggn(p, X, y), want)
        report.info.setdefault("ggn_vs_backpack_max_rel_err", {})[str(bs)] = err
        jb_s, bp_s = [], []
        for _ in range(3):
            for b in batches:
                jb_s.append(clock(ggn, p, *b[0])[1])
                bp_s.append(clock(backpack_ggn, *b[1])[1])
        t_jb, t_bp = median(jb_s), median(bp_s)
        for name, t in (("jb.diag_ggn", t_jb), ("BackPACK DiagGGNExact", t_bp)):
            report.add(
                {
                    "section": "ggn",
                    "approach": name,
                    "minibatch": bs,
                    "us_per_call": 1e6 * t,
                    "ratio_to_backpack": t / t_bp,
                }
            )
        print(
            f"  m={bs:<5} jb.diag_ggn {1e6 * t_jb:9.0f} us  BackPACK {1e6 * t_bp:9.0f} us "
            f"({t_bp / t_jb:.1f}x)  agreement max rel err {err:.1e}",
            flush=True,
        )
        report.check(f"diag_ggn faster than BackPACK at minibatch {bs}", t_bp / t_jb, ">=", 1.0)
