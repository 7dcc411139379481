"""Writes the tutorial notebooks from the cell sources below, with no outputs.

The notebooks are generated so that they stay reviewable as plain Python in
one diff and never carry stale outputs. Edit the cells here, then run::

    python notebooks/build_notebooks.py          # rewrite both notebooks
    python notebooks/build_notebooks.py --check  # exit 1 if a notebook is out of date

``tests/test_notebooks.py`` executes every ``notebooks/*.ipynb`` top to bottom.

Example:
    >>> nb = quickstart()
    >>> nb.cells[0].cell_type
    'markdown'
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Callable

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).resolve().parent

_METADATA = {
    "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


def _notebook(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """A notebook from ``(kind, source)`` pairs, with stable cell ids (no id churn in diffs)."""
    nb = new_notebook(metadata=_METADATA)
    for i, (kind, source) in enumerate(cells):
        source = source.strip("\n")
        cell = new_markdown_cell(source) if kind == "md" else new_code_cell(source)
        cell.id = f"{name}-{i:02d}"
        if kind == "params":
            # The papermill convention: tools can override this cell's values.
            cell.metadata["tags"] = ["parameters"]
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def quickstart() -> nbformat.NotebookNode:
    """``01_quickstart.ipynb``: one run of plateau_escape around Adam, read from its state."""
    return _notebook("quickstart", [
        ("md", r"""
# Quickstart: a U-Net that escapes its own plateaus

`adaptive_optax.plateau_escape` is an optax transformation that wraps an optimizer (here
`optax.adam`). Every step it receives the monitored value (a loss), averages it over
*windows* of steps and, when windows stop improving, **intervenes inside the compiled
step**: it boosts the learning rate by a factor chosen from the gradient-norm EMA and switches
the loss mix. Everything it decides lives in the optimizer state, so every plot below is
read straight from that state, step by step.

This tour trains a small U-Net on synthetic shapes for 240 steps (about a minute on a laptop
CPU) and shows:

1. the monitored value with the non-improving (plateau) windows shaded,
2. the effective learning rate with each intervention annotated,
3. the loss-mix weights as a stacked area.
"""),
        ("code", r"""
import time

import jax
import matplotlib.pyplot as plt
import optax
from flax import nnx

import adaptive_optax as ao
from adaptive_optax.segmentation import plotting
from adaptive_optax.segmentation.data import load_dataset
from adaptive_optax.segmentation.loop import fit
from adaptive_optax.segmentation.policies import adaptive_mix_policy
from adaptive_optax.segmentation.train import (
    init_train_state,
    make_eval_step,
    make_train_step,
    opt_state_of,
)
from adaptive_optax.segmentation.unet import UNet, count_params

print("jax", jax.__version__, "on", jax.devices()[0].platform)
"""),
        ("md", r"""
## 1. Data

`load_dataset("shapes")` draws random ellipses and squares on a shaded, noisy background
(numpy only, fully determined by the seed). Each example has an image, a foreground mask and
an instance map (the instance map feeds the `variance` loss term). We keep it tiny: 64
training and 16 validation images of 32x32 pixels, batches of 8, so **one epoch is 8 steps**.
"""),
        ("code", r"""
SIZE, BATCH = 32, 8
train, val = load_dataset("shapes", num_train=64, num_val=16, size=SIZE, difficulty=0.5, seed=0)
STEPS_PER_EPOCH = train.images.shape[0] // BATCH

fig, axes = plt.subplots(2, 6, figsize=(9, 3.2), layout="constrained")
for i in range(6):
    axes[0, i].imshow(train.images[i, ..., 0], cmap="gray", vmin=0, vmax=1)
    axes[1, i].imshow(train.instances[i], cmap="tab20", interpolation="nearest")
for ax in axes.flat:
    ax.set_axis_off()
axes[0, 0].set_title("image", loc="left")
axes[1, 0].set_title("instances", loc="left")
plt.show()
"""),
        ("md", r"""
## 2. Model

A two-level U-Net with 8 channels at full resolution and GroupNorm. The `"rbg"` PRNG key makes
parameter initialisation fast on CPU (the default key compiles one random program per
parameter shape).
"""),
        ("code", r"""
model = UNet(depth=2, base_width=8, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
print(f"{count_params(model):,} parameters")
"""),
        ("md", r"""
## 3. The optimizer: `plateau_escape` wrapping Adam

`plateau_escape(optax.adam, learning_rate, ...)` builds Adam with an injectable learning rate
and drives it. The knobs used here:

| argument | value | meaning |
|---|---|---|
| `accumulation_steps` | 8 | a window is one epoch; the detector compares window means |
| `rtol` | 0.02 | a window must beat the best mean so far by 2 % to count as an improvement |
| `patience` | 0 | the first non-improving window is a plateau (short run, eager detector) |
| `cooldown` | 1 | one window after an intervention in which no plateau is counted |
| `max_interventions` | 3 | at most three interventions |
| `boost_decay_steps` | 64 | each boost decays linearly back to the base rate over 8 epochs |
| `policy` | `adaptive_mix_policy()` | what an intervention does (below): the seed's boosts and loss mixes |

The adaptive policy picks the boost from the gradient-norm EMA (below 0.01 → x15,
0.01–0.1 → x10, 0.1–0.5 → x5, above → x3; small gradients get the big boosts), damped by 1.0,
0.7 and 0.5 for interventions 1, 2 and 3, and switches to a randomly picked loss mix (the last
intervention to a conservative Dice/focal mix).

`init_train_state` wraps the model in an `nnx.Optimizer` and splits both into a pytree the
jitted step can donate. The plateau-escape state sits inside the optimizer state, and
`optax.tree.get` reads its public fields by name (`learning_rate`, `intervention_count`,
`grad_norm_ema`, `best_value`, `plateau_count`, `loss_weights`; `ao.state_field` reads the
packed rest too), for instance the loss-mix weights the train step will use:
"""),
        ("code", r"""
policy = adaptive_mix_policy()
tx = ao.plateau_escape(
    optax.adam,
    learning_rate=1e-3,
    accumulation_steps=STEPS_PER_EPOCH,
    rtol=0.02,
    patience=0,
    cooldown=1,
    max_interventions=3,
    boost_decay_steps=8 * STEPS_PER_EPOCH,
    policy=policy,
)
graphdef, state = init_train_state(model, tx)
opt_state = opt_state_of(graphdef, state)
print("learning rate:", float(optax.tree.get(opt_state, "learning_rate")))
weights = optax.tree.get(opt_state, "loss_weights")
print("loss weights: ", {name: round(float(w), 2) for name, w in weights.items()})
"""),
        ("md", r"""
## 4. Train

`make_train_step` reads the loss mix from the optimizer state, differentiates the mixed loss
and calls `optimizer.update(model, grads, value=monitor)`. The monitored value is a
**fixed-weight reference loss** (the policy's initial mix): after a mix change the optimised
loss is on a different scale, so comparing it with the best of the old mix would fake
plateaus or improvements.

`fit` runs the epochs, evaluates Dice/IoU on the validation set after each, and records every
step's optimizer-state readings (learning rate, multiplier, gradient-norm EMA, window means,
weights...) in a `History`, plus one log entry per intervention. Everything stays on device
during an epoch; the history is fetched once per epoch.
"""),
        ("code", r"""
EPOCHS = 30
train_step = make_train_step(graphdef, reference_weights=policy.initial_mix)
eval_step = make_eval_step(graphdef)

start = time.perf_counter()
state, history = fit(train_step, eval_step, state, train, val, epochs=EPOCHS, batch_size=BATCH,
                     mix_label=policy.mix_label)
print(f"{len(history.steps['loss'])} steps in {time.perf_counter() - start:.1f} s "
      f"(compilation included); final validation Dice {history.evals['dice'][-1]:.3f}")

for event in history.interventions:
    print(f"{event['kind']} #{event['number']} at step {event['step']} (epoch {event['epoch']}): "
          f"grad-norm EMA {event['grad_norm_ema']:.3f}, "
          f"lr {event['lr_before']:.2e} -> {event['lr_after']:.2e}, "
          f"mix {event['mix_before']} -> {event['mix_after']}")
assert history.interventions, "no intervention happened: the plots below would have nothing to show"
"""),
        ("md", r"""
The history holds what the optimizer state said; the final state agrees with its last row:
"""),
        ("code", r"""
opt_state = opt_state_of(graphdef, state)
for name in ("learning_rate", "intervention_count", "grad_norm_ema", "best_value"):
    print(f"{name:20s} state {float(optax.tree.get(opt_state, name)):.6g}   "
          f"history {history.steps[name][-1]:.6g}")
"""),
        ("md", r"""
## 5. The monitored value and its plateau windows

Thin line: the reference loss of every step. Thick segments: the mean of each window (one
epoch), the number the detector compares. Shaded: windows that did **not** beat the best mean
by `rtol`. Triangles: interventions, placed at the window mean that triggered them.
"""),
        ("code", r"""
plotting.plot_monitor(history)
"""),
        ("md", r"""
## 6. The learning rate

The effective learning rate (log scale) against the base rate. Each intervention is labelled
with its boost (a multiple of the *base* rate: boosts never compound, so a damped later boost
can be smaller than the first) and the gradient-norm EMA that chose it. With
`boost_decay_steps` the boost fades back to the base rate.
"""),
        ("code", r"""
plotting.plot_learning_rate(history)
"""),
        ("md", r"""
## 7. The loss mix

The weights of the four loss terms (Dice, focal, BCE and the instance-variance term), stacked.
Each intervention switches to another mix; the last allowed one uses the conservative
Dice/focal mix.
"""),
        ("code", r"""
plotting.plot_loss_weights(history)
"""),
        ("md", r"""
## 8. Everything on one page

`plot_run` puts the panels above and the validation scores on a shared step axis (the demo
writes this figure to `run.png`).
"""),
        ("code", r"""
plotting.plot_run(history, title="plateau_escape(optax.adam) on synthetic shapes")
"""),
        ("md", r"""
## Next

* `02_strategy_lab.ipynb` compares the adaptive policy with the seed's legacy policy,
  reduce-on-plateau and a constant rate, and looks at the loss landscape around an
  intervention.
* Try `patience=1`, `rtol=0.01` or `boost_decay_steps=None` in section 3 and rerun from
  there. Within a run an intervention only changes array values in the state, so the
  compiled step is reused; a new optimizer configuration compiles a new step.
"""),
    ])


def strategy_lab() -> nbformat.NotebookNode:
    """``02_strategy_lab.ipynb``: four strategies side by side and a loss-landscape slice."""
    return _notebook("strategy_lab", [
        ("md", r"""
# Strategy lab

Same data, same initial weights, same detector settings; four answers to a plateau:

* **adaptive**: `plateau_escape` with the adaptive policy (boost from the gradient-norm EMA,
  damped, random loss mix), configured by the parameters below;
* **legacy**: the seed's deterministic policy (10x, 5x, 3x with fixed mix changes and an
  optimizer reset on the third);
* **reduce-on-plateau**: `optax.contrib.reduce_on_plateau` (x0.1 per plateau);
* **constant**: no intervention.

Then a 1-D slice of the loss landscape through the parameters just before and some steps
after the adaptive run's first intervention, and the adaptive run again with a **lookahead**:
at each plateau it tries candidate interventions for a few steps and commits the best.

Edit the parameters in the next cell and rerun the notebook (one to two minutes on a laptop
CPU; most of it is compiling one train step per strategy).
"""),
        ("params", r"""
# Adaptive policy (adaptive_optax.segmentation.adaptive_mix_policy)
GRAD_NORM_THRESHOLDS = (0.01, 0.1, 0.5)  # bin edges of the gradient-norm EMA
GRAD_NORM_BOOSTS = (15.0, 10.0, 5.0, 3.0)  # one boost per bin: small gradients, big boost
DAMPING = (1.0, 0.7, 0.5)  # factor on the boost of interventions 1, 2, 3
MIXES = (  # candidate loss mixes; an intervention picks one at random
    {"dice": 0.6, "focal": 0.4, "variance": 0.0, "bce": 0.0},
    {"dice": 0.5, "focal": 0.5, "variance": 0.0, "bce": 0.0},
    {"dice": 0.4, "focal": 0.6, "variance": 0.0, "bce": 0.0},
    {"dice": 0.7, "focal": 0.3, "variance": 0.0, "bce": 0.0},
    {"dice": 0.5, "focal": 0.3, "variance": 0.2, "bce": 0.0},
)

# Plateau detector and interventions, shared by every strategy
PATIENCE = 0  # non-improving windows tolerated before a plateau
RTOL = 0.02  # relative improvement a window needs
COOLDOWN = 1  # windows after an intervention with no plateau counted
MAX_INTERVENTIONS = 3
BOOST_DECAY_STEPS = 64  # None: hold each boost until the next intervention

# Run
LEARNING_RATE = 1e-3
EPOCHS = 30
BATCH_SIZE = 8
NUM_TRAIN, NUM_VAL, IMAGE_SIZE = 64, 16, 32
SEED = 0

# Loss-landscape slice
SLICE_STEPS = 16  # parameters this many steps before and after the first intervention
SLICE_ALPHAS = (-0.5, 1.5, 41)  # linspace over the line; 0 and 1 are the two parameter sets

# Lookahead (adaptive_optax.Lookahead): trial length in steps, candidates (boost_scale, mix)
LOOKAHEAD_STEPS = 4
# The defaults: the policy's choice, no boost, half and twice its boost, its boost with the next
# planned mix. The first is the incumbent.
CANDIDATES = ((1.0, "policy"), (0.0, "current"), (0.5, "policy"), (2.0, "policy"), (1.0, "next"))
"""),
        ("code", r"""
import collections
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx
from IPython.display import Markdown, display

import adaptive_optax as ao
from adaptive_optax.segmentation import plotting
from adaptive_optax.segmentation.data import load_dataset
from adaptive_optax.segmentation.losses import loss_components, mixed_loss
from adaptive_optax.segmentation.loop import fit
from adaptive_optax.segmentation.policies import adaptive_mix_policy
from adaptive_optax.segmentation.strategies import make_optimizer, policy_for
from adaptive_optax.segmentation.train import init_train_state, make_eval_step, make_train_step
from adaptive_optax.segmentation.unet import UNet

train, val = load_dataset("shapes", num_train=NUM_TRAIN, num_val=NUM_VAL, size=IMAGE_SIZE,
                          difficulty=0.5, seed=SEED)
STEPS_PER_EPOCH = NUM_TRAIN // BATCH_SIZE
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH

# One initialisation shared by every run; each run trains its own copy.
model_graphdef, initial_params = nnx.split(
    UNet(depth=2, base_width=8, rngs=nnx.Rngs(jax.random.key(SEED, impl="rbg"))))
print(f"{TOTAL_STEPS} steps per run, windows of {STEPS_PER_EPOCH} steps (one epoch)")
"""),
        ("md", r"""
## Strategies

`strategies.make_optimizer` builds every named strategy the same way (a `plateau_escape`
around Adam, so every run records the same state fields); `policy=` swaps in the policy built
from the parameters above.
"""),
        ("code", r"""
adaptive = adaptive_mix_policy(grad_norm_thresholds=GRAD_NORM_THRESHOLDS,
                               grad_norm_boosts=GRAD_NORM_BOOSTS, damping=DAMPING, mixes=MIXES)
shared = dict(patience=PATIENCE, accumulation_steps=STEPS_PER_EPOCH, cooldown=COOLDOWN,
              rtol=RTOL, max_interventions=MAX_INTERVENTIONS, seed=SEED,
              boost_decay_steps=BOOST_DECAY_STEPS)


def build(strategy):
    # Returns (optimizer, policy); the policy defines the loss-mix table and the reference mix.
    policy = adaptive if strategy == "adaptive" else policy_for(strategy)
    tx = make_optimizer(strategy, LEARNING_RATE, total_steps=TOTAL_STEPS, policy=policy, **shared)
    return tx, policy


STRATEGY_NAMES = ("adaptive", "legacy", "reduce-on-plateau", "constant")
# Every policy starts from the same initial mix, which is also the monitored reference loss.
assert all(build(s)[1].initial_mix == adaptive.initial_mix for s in STRATEGY_NAMES)
"""),
        ("md", r"""
## Run them

To look at the loss landscape later, the adaptive run's train step is wrapped: it keeps
copies of the model parameters of the last `SLICE_STEPS + 1` steps and, once the first
intervention happens, of the next `SLICE_STEPS` steps. The intervention count comes straight
from the optimizer state (`StepMetrics.readings`).
"""),
        ("code", r"""
class AroundFirstIntervention:
    # Wraps a train step; records model parameters around the first intervention.

    def __init__(self, train_step, steps):
        self.train_step, self.steps = train_step, steps
        self.recent = collections.deque(maxlen=steps + 1)  # parameters *before* each step
        self.step, self.first, self.before_step = 0, None, None
        self.before = self.at = self.after = None

    def __call__(self, state, batch):
        if self.after is None:
            # Copies: the step donates (and so deletes) the buffers of its input state.
            self.recent.append(jax.tree.map(jnp.copy, state[0]))
        state, metrics = self.train_step(state, batch)
        if self.first is None and int(metrics.readings["intervention_count"]) > 0:
            self.first = self.step  # this step already used the boosted learning rate
            self.before, self.at = self.recent[0], self.recent[-1]
            self.before_step = self.step - (len(self.recent) - 1)
        last = self.first is not None and self.step == self.first + self.steps - 1
        if last and self.after is None:
            self.after = jax.tree.map(jnp.copy, state[0])
        self.step += 1
        return state, metrics


histories, seconds, recorder = {}, {}, None
for strategy in STRATEGY_NAMES:
    tx, policy = build(strategy)
    params = jax.tree.map(jnp.copy, initial_params)
    graphdef, state = init_train_state(nnx.merge(model_graphdef, params), tx)
    train_step = make_train_step(graphdef, reference_weights=policy.initial_mix)
    if strategy == "adaptive":
        train_step = recorder = AroundFirstIntervention(train_step, SLICE_STEPS)
    start = time.perf_counter()
    _, histories[strategy] = fit(train_step, make_eval_step(graphdef), state, train, val,
                                 epochs=EPOCHS, batch_size=BATCH_SIZE, seed=SEED,
                                 mix_label=policy.mix_label)
    seconds[strategy] = time.perf_counter() - start
    print(f"{strategy:18s} {seconds[strategy]:5.1f} s, "
          f"{len(histories[strategy].interventions)} interventions, "
          f"final Dice {histories[strategy].evals['dice'][-1]:.3f}")
"""),
        ("md", r"""
## Comparison

Top: the monitored reference loss, one point per window (epoch); middle: the effective
learning rate (reduce-on-plateau's scale folded in), markers at interventions; bottom:
validation Dice after every epoch.
"""),
        ("code", r"""
fig, (ax_loss, ax_lr, ax_dice) = plt.subplots(3, 1, figsize=(9, 9), sharex=True,
                                              layout="constrained")
for strategy, history in histories.items():
    steps = np.arange(len(history.steps["monitor"]))
    window_end = steps[STEPS_PER_EPOCH - 1::STEPS_PER_EPOCH]
    window_mean = history.array("monitor").reshape(-1, STEPS_PER_EPOCH).mean(axis=1)
    (line,) = ax_loss.plot(window_end, window_mean, "o-", markersize=3, label=strategy)
    ax_lr.plot(steps, history.array("learning_rate"), color=line.get_color())
    at = [e["step"] for e in history.interventions]
    ax_lr.plot(at, history.array("learning_rate")[at], "v", color=line.get_color(), markersize=8)
    ax_dice.plot(history.evals["step"], history.evals["dice"], "o-", markersize=3,
                 color=line.get_color())
ax_loss.set(ylabel="reference loss (window mean)", yscale="log", title="Monitored value")
ax_lr.set(ylabel="learning rate", yscale="log", title="Effective learning rate")
ax_dice.set(ylabel="Dice", xlabel="step", title="Validation Dice", ylim=(0, 1))
ax_loss.legend()
plt.show()
"""),
        ("code", r"""
def row(strategy):
    h = histories[strategy]
    window_mean = h.array("monitor").reshape(-1, STEPS_PER_EPOCH).mean(axis=1)
    lr = h.array("learning_rate")
    cuts = int(np.sum(lr[1:] < 0.5 * lr[:-1]))  # reduce-on-plateau's x0.1 steps
    return (f"| {strategy} | {len(h.interventions)} | {cuts} | {lr.min():.1e} – {lr.max():.1e} | "
            f"{window_mean[-1]:.3f} | {max(h.evals['dice']):.3f} | {h.evals['dice'][-1]:.3f} | "
            f"{seconds[strategy]:.1f} |")


display(Markdown("\n".join([
    "| strategy | interventions | lr cuts | learning rate range | final window loss | best Dice "
    "| final Dice | seconds |",
    "|---|---|---|---|---|---|---|---|",
    *(row(s) for s in STRATEGY_NAMES),
])))
"""),
        ("md", r"""
`interventions` counts `plateau_escape`'s interventions, `lr cuts` the x0.1 steps of
reduce-on-plateau; the loss is the mean of the last window (epoch) of the monitored reference
loss. What to look for: whether a plateau here is a *too-small step* (a boost helps, a cut
stalls the run) or a *too-large step* (the other way round), and what each policy's first
response costs in validation Dice right after it. With the default parameters the loss is
still falling slowly when the detector fires, so boosting helps and cutting stalls. The
legacy policy's third intervention resets Adam and trains on Dice alone; watch its
validation curve right after.

Each run in detail (`plotting.plot_run`), for the two intervening policies:
"""),
        ("code", r"""
plotting.plot_run(histories["adaptive"], title="adaptive")
"""),
        ("code", r"""
plotting.plot_run(histories["legacy"], title="legacy")
"""),
        ("md", r"""
## The loss landscape around the first intervention

A 1-D slice: the reference loss on the whole training set at
$\theta(\alpha) = (1-\alpha)\,\theta_a + \alpha\,\theta_b$, computed by
`plotting.loss_along_line` (one jitted `lax.map` over the alphas). Values of $\alpha$ outside
$[0, 1]$ extend the line beyond both ends.

* **left**: from `SLICE_STEPS` steps before the intervention to the step right before it, the
  direction the base learning rate was taking during the plateau;
* **right**: from right before the intervention to `SLICE_STEPS` boosted steps later.

How far the loss falls between $\alpha = 0$ and $\alpha = 1$ on each side compares the
progress of the same number of steps before and after the boost; the shape beyond
$\alpha = 1$ shows whether that direction still leads downhill.
"""),
        ("code", r"""
assert recorder.after is not None, "the adaptive run had no intervention early enough to slice"
everything = jax.tree.map(jnp.asarray, train)  # the whole training set as one batch


def reference_loss(params):
    model = nnx.merge(model_graphdef, params)
    logits = model(everything.images)
    components = loss_components(logits, everything.masks, everything.instances,
                                 names=tuple(adaptive.initial_mix))
    return mixed_loss(components, adaptive.initial_mix)


alphas = np.linspace(*SLICE_ALPHAS)
slices = {
    "plateau": plotting.loss_along_line(reference_loss, recorder.before, recorder.at, alphas),
    "boost": plotting.loss_along_line(reference_loss, recorder.at, recorder.after, alphas),
}
first = histories["adaptive"].interventions[0]
assert first["step"] == recorder.first
# Labels name the step whose *input* parameters each end point is.
start, first_step, end = recorder.before_step, recorder.first, recorder.first + SLICE_STEPS - 1
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True, layout="constrained")
plotting.plot_loss_slice(alphas, slices["plateau"], ax=left,
                         labels=(f"before step {start}", f"before step {first_step}"))
plotting.plot_loss_slice(alphas, slices["boost"], ax=right,
                         labels=(f"before step {first_step}", f"after step {end}"))
left.set_title(f"{first_step - start} steps at the base rate, up to the intervention")
right.set_title(f"{SLICE_STEPS} steps from intervention #1 on "
                f"(x{first['lr_after'] / first['lr_before']:.3g} lr)")
plt.show()
for name, losses in slices.items():
    i0, i1 = np.argmin(np.abs(alphas)), np.argmin(np.abs(alphas - 1))
    print(f"{name:8s} loss {losses[i0]:.4f} -> {losses[i1]:.4f} "
          f"(lowest {losses.min():.4f} at alpha {alphas[losses.argmin()]:.2f})")
"""),
        ("md", r"""
## Try before committing: the lookahead

The gradient-norm bins are a prior. With `lookahead=ao.Lookahead(...)`, each intervention
first runs every candidate (a boost relative to the policy's and a mix) for `LOOKAHEAD_STEPS`
steps of Adam from the current parameters, inside the same jitted update, and commits the one
whose monitored loss is lowest at the end of its trial. The trials' parameters are thrown away.
`make_train_step` passes the update the `value_fn` that scores them (here on the batch being
trained on). The same adaptive run as above, with a lookahead:
"""),
        ("code", r"""
lookahead = ao.Lookahead(steps=LOOKAHEAD_STEPS, candidates=CANDIDATES)
tx = make_optimizer("adaptive", LEARNING_RATE, total_steps=TOTAL_STEPS, policy=adaptive,
                    lookahead=lookahead, **shared)
graphdef, state = init_train_state(nnx.merge(model_graphdef, jax.tree.map(jnp.copy,
                                                                          initial_params)), tx)
start = time.perf_counter()
_, histories["adaptive + lookahead"] = fit(
    make_train_step(graphdef, reference_weights=adaptive.initial_mix), make_eval_step(graphdef),
    state, train, val, epochs=EPOCHS, batch_size=BATCH_SIZE, seed=SEED,
    mix_label=adaptive.mix_label)
seconds["adaptive + lookahead"] = time.perf_counter() - start
trials = [e for e in histories["adaptive + lookahead"].interventions if e["kind"] == "intervention"]
labels = [c.label for c in lookahead.candidates]
display(Markdown("\n".join([
    "| intervention | step | " + " | ".join(labels) + " | committed | lr after |",
    "|---" * (len(labels) + 4) + "|",
    *(f"| {e['number']} | {e['step']} | "
      + " | ".join(f"{v:.4f}" for v in e["trial_values"])
      + f" | {labels[e['trial_choice']] if e['trial_choice'] >= 0 else 'none (all non-finite)'}"
      f" | {e['lr_after']:.2e} |" for e in trials),
])))
for name in ("adaptive", "adaptive + lookahead"):
    print(f"{name:22s} final Dice {histories[name].evals['dice'][-1]:.3f}, "
          f"{seconds[name]:.1f} s")
"""),
        ("md", r"""
The monitored (reference) loss of every candidate over its trial at the first intervention;
step 0 is the loss at the parameters the trials start from, the last step is the score. The
committed candidate is drawn thick.
"""),
        ("code", r"""
assert trials, "the lookahead run had no intervention"
first = trials[0]
curves = np.asarray(first["trial_curves"])  # [candidates, LOOKAHEAD_STEPS + 1]
fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
for i, (label, curve) in enumerate(zip(labels, curves)):
    won = i == first["trial_choice"]
    ax.plot(np.arange(len(curve)), curve, "o-", lw=3 if won else 1, markersize=6 if won else 3,
            label=label + (" (committed)" if won else ""), zorder=3 if won else 2)
ax.set(xlabel="trial step", ylabel="reference loss on the batch", xticks=range(curves.shape[1]),
       title=f"Lookahead trials at intervention 1 (step {first['step']})")
ax.legend()
plt.show()
"""),
        ("md", r"""
What to look for: candidates that differ only in their boost start at the same value and
fan out; a boost that pays off later may still lose a short trial (short-horizon bias, Wu et
al. 2018), which is why `benchmarks/lr_grid.py --trial-steps` compares trial lengths
(`docs/benchmarks.md`). A trial scored on the batch being trained on rewards fitting that
batch; pass `probe=` to the train step to score on held-out data instead.
"""),
    ])


NOTEBOOKS: dict[str, Callable[[], nbformat.NotebookNode]] = {
    "01_quickstart.ipynb": quickstart,
    "02_strategy_lab.ipynb": strategy_lab,
}


def _content(nb: nbformat.NotebookNode) -> tuple:
    """What a reviewer reads (cells and metadata), not how this nbformat version lays out JSON."""
    cells = tuple((c.cell_type, c.get("id"), c.source, repr(dict(c.metadata)),
                   repr(c.get("outputs", [])), c.get("execution_count")) for c in nb.cells)
    return cells, repr(dict(nb.metadata))


def main(argv: list[str] | None = None) -> int:
    """Writes (or with ``--check`` compares) every notebook; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a stored notebook differs from its generated version")
    args = parser.parse_args(argv)
    stale = []
    for filename, build in NOTEBOOKS.items():
        path = HERE / filename
        notebook = build()
        text = nbformat.writes(notebook) + "\n"
        if args.check:
            stored = nbformat.read(path, as_version=4) if path.exists() else None
            if stored is None or _content(stored) != _content(notebook):
                stale.append(filename)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date (run python notebooks/build_notebooks.py): {stale}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
